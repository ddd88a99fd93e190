"""The main job of ``sam-optax compare``: every method trained, timed and reported."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np

from sam_optax import _validate
from sam_optax.compare.data import check_dataset, check_label_noise
from sam_optax.compare.report import CompareResult, environment, prepare_out
from sam_optax.compare.specs import MethodSpec, resolve_methods
from sam_optax.compare.timing import time_runs
from sam_optax.compare.training import (
    CURVE_POINTS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_STEPS,
    Setup,
    check_base,
    train,
)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:  # no tqdm at all: tqdm.auto warns in a notebook even when disabled
        return nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step")


def run_compare(
    dataset: str = "mnist1d",
    methods: str | Sequence[str | MethodSpec] | None = None,
    seeds: int = 3,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    label_noise: float = 0.0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    sweep: str | Sequence[str] | None = None,
    base: str = "sgd",
    timing: bool = True,
) -> CompareResult:
    r"""Trains a model with each method and seed, and measures what each buys.

    The base optimizer is SGD with momentum 0.9, a cosine learning-rate decay
    from 0.1 to 0 over ``steps`` and decoupled weight decay 5e-4
    (``w ← w − lr_t (m + wd·w)``), or AdamW (``base="adamw"``, see
    :data:`sam_optax.compare.BASES`); each method is built by
    :func:`sam_optax.registry.make_optimizer` in front of it, with its registry
    defaults and the specification's overrides (``"looksam:alpha=0.3:k=10"``),
    and trained with :func:`sam_optax.flax.linen_step`. Seeds change the
    initialisation and the batch order; every method sees the same batches for
    a given seed.

    The cost is measured after training, side by side: each method's compiled
    curve-point chunk (``ceil(steps / 15)`` steps), with the gradient
    counter's host callbacks switched off, runs from the state its last seed
    ended in, right after ``sgd`` has run as many steps, in 10 rounds whose
    order rotates. ``time_per_step`` is the median over rounds and ``rel_cost``
    the median of a method's time over ``sgd``'s just before. A method whose
    probe rate changes over training (AE-SAM's threshold schedule) is timed at
    its end-of-training rate; ``probe_fraction`` is its average over training.

    Every argument, the method specifications and ``out`` are checked before
    anything is trained.

    Args:
      dataset: ``"mnist1d"`` or ``"digits"``.
      methods: specifications: registry names with optional ``:key=value``
        overrides, as a list or a comma-separated string; ``None`` runs every
        registered method at its defaults (or only the sweep, when one is
        given). ``sgd`` is always included, first.
      seeds: the number of seeds per method.
      steps: training steps per run.
      batch_size: examples per step.
      label_noise: the fraction of training labels flipped, in ``[0, 1)``.
      out: a directory for ``results.json``, ``compare.png`` and a figure per
        sweep; ``None`` writes nothing.
      progress: show a progress bar (tqdm, on stderr).
      sweep: one or more grids such as ``"looksam:alpha=0,0.3,0.7"``
        (:func:`sam_optax.compare.expand_sweep`), run after ``methods``.
      base: the base optimizer, ``"sgd"`` or ``"adamw"``.
      timing: measure the cost columns (``False`` leaves them NaN and saves
        the timed rounds, for sweeps that only need accuracy).

    Returns:
      A :class:`CompareResult`.

    Examples:
      >>> from sam_optax.compare import run_compare
      >>> result = run_compare("digits", methods="sam:rho=0.1", seeds=1, steps=5, progress=False)
      >>> [r["method"] for r in result.rows], result.rows[1]["grads_per_step"]
      (['sgd', 'sam:rho=0.1'], 2.0)

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    check_dataset(dataset)
    check_base(base)
    specs = resolve_methods(methods, sweep)
    _validate.integer("seeds", seeds, 1, static=True)
    _validate.integer("steps", steps, 1, static=True)
    _validate.integer("batch_size", batch_size, 1, static=True)
    check_label_noise(label_noise)
    if out is not None:
        out = prepare_out(out)
    setup = Setup(dataset, label_noise, steps, batch_size, base)

    rows, runs = [], []
    with _progress_bar(len(specs) * seeds * steps, progress) as bar:

        def advance(n: int, description: str) -> None:
            if bar is not None:
                bar.set_postfix_str(description, refresh=False)
                bar.update(n)

        for spec in specs:
            row, timed = train(setup, spec, seeds, advance)
            rows.append(row)
            runs.append(timed)
        if timing:
            if bar is not None:
                bar.set_postfix_str("timing")
            times = time_runs(runs, setup.chunk)
    for row in rows:
        row["time_per_step"], row["rel_cost"] = times[row["method"]] if timing else (np.nan,) * 2
    config = {
        "dataset": dataset,
        "methods": [spec.label for spec in specs],
        "seeds": seeds,
        "steps": steps,
        "batch_size": batch_size,
        "label_noise": label_noise,
        "base": base,
        "base_description": setup.base.describe,
        "learning_rate": setup.base.learning_rate,
        "weight_decay": setup.base.weight_decay,
        "curve_points": CURVE_POINTS,
        "sharpness_batch": setup.sharpness_batch,
        "timed": timing,
    }
    result = CompareResult(rows, setup.bounds[1:], config, environment())
    if out is not None:
        result.save(out)
    return result
