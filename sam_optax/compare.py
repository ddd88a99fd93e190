"""``sam-optax compare``: train real models with every method and measure what each buys.

For each method of :data:`sam_optax.registry.METHODS` and each seed, a small Flax
model is trained on built-in data (MNIST-1D, or scikit-learn's digits) with the
method chained in front of SGD with momentum, cosine learning-rate decay and
decoupled weight decay. Reported per method: test accuracy (mean and std over
seeds), final training loss, the top Hessian eigenvalue of the training loss on a
fixed batch, gradient evaluations per step (counted), the probe fraction, wall
time per step and cost relative to ``sgd`` (timed after training, each method's
steps right after as many of ``sgd``'s).

Counting gradient evaluations. The per-example losses pass through an identity
whose backward rule fires a host callback adding ``n / batch_size`` (``n``
examples in the pass) to a counter. It fires only when a backward pass really
runs (a probe skipped by ``lax.cond`` adds nothing; ESAM's sub-batch adds
``gamma``); forward-only passes are not gradient evaluations and are not counted.

Hooks for methods (no per-method code here): every ``update`` receives
``per_example_loss_fn(params, batch) -> [B]`` and ``batch = (x, y)`` as extra
arguments, and a registry entry with ``eval_params`` is evaluated (accuracy,
loss, sharpness) on ``eval_params(params, opt_state)``, called eagerly.

The models, datasets, progress bar and figure need the ``examples`` extra; they
are imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import _timing, _validate, registry
from sam_optax._state import probe_fraction
from sam_optax.sharpness import hessian_top_eigenvalue

DATASETS = ("mnist1d", "digits")
NUM_CLASSES = 10
BASELINE = "sgd"

DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 128
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
SHARPNESS_BATCH = 512
CURVE_POINTS = 15
TIMING_ROUNDS = 10


# --------------------------------------------------------------------------- data


@functools.cache
def _mnist1d() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # Generated locally from the package's templates (never its download path).
    data = make_dataset(get_dataset_args())
    return (
        np.asarray(data["x"], np.float32),
        np.asarray(data["y"], np.int32),
        np.asarray(data["x_test"], np.float32),
        np.asarray(data["y_test"], np.int32),
    )


@functools.cache
def _digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        (x / 16.0).astype(np.float32), y.astype(np.int32), test_size=0.2, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


_LOADERS: dict[str, Callable[[], tuple[np.ndarray, ...]]] = {
    "mnist1d": _mnist1d,
    "digits": _digits,
}


def _check_label_noise(label_noise: Any) -> None:
    if not (isinstance(label_noise, int | float) and 0.0 <= label_noise < 1.0):
        raise ValueError(f"label noise must be a fraction in [0, 1), got {label_noise!r}")


def add_label_noise(labels: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Flips ``round(fraction · n)`` labels, chosen at random, to another class.

    Each chosen label moves to a class drawn uniformly from the
    ``NUM_CLASSES - 1`` other classes, so exactly that fraction of labels is wrong.

    Args:
      labels: integer labels in ``[0, NUM_CLASSES)``.
      fraction: the fraction of labels to flip, in ``[0, 1)``.
      seed: the seed of the choice (fixed, so every method sees the same labels).

    Returns:
      A new label array.

    Examples:
      >>> import numpy as np
      >>> from sam_optax.compare import add_label_noise
      >>> y = np.zeros(10, np.int32)
      >>> int((add_label_noise(y, 0.4) != y).sum())
      4
    """
    _check_label_noise(fraction)
    rng = np.random.default_rng(seed)
    labels = np.array(labels, copy=True)
    flip = rng.choice(labels.shape[0], round(fraction * labels.shape[0]), replace=False)
    shift = rng.integers(1, NUM_CLASSES, flip.shape[0])
    labels[flip] = (labels[flip] + shift) % NUM_CLASSES
    return labels


def load_dataset(name: str, *, label_noise: float = 0.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Loads a built-in dataset, generated or read locally with no network.

    ``mnist1d``: the MNIST-1D generator's default dataset (4000 train and 1000
    test sequences of length 40, 10 classes), generated once per process.
    ``digits``: scikit-learn's bundled 8×8 digits, scaled to ``[0, 1]`` and split
    80/20 (stratified, fixed). Label noise touches training labels only.

    Args:
      name: one of :data:`DATASETS`.
      label_noise: the fraction of training labels flipped to another class
        (see :func:`add_label_noise`), in ``[0, 1)``.
      seed: the seed of the label noise.

    Returns:
      ``dict(x_train, y_train, x_test, y_test)`` of NumPy arrays (float32 inputs
      ``[N, features]``, int32 labels).

    Examples:
      >>> from sam_optax.compare import load_dataset
      >>> data = load_dataset("digits", label_noise=0.1)
      >>> data["x_train"].shape, data["x_test"].shape
      ((1437, 64), (360, 64))

    References:
      Greydanus & Kobak, Scaling Down Deep Learning with MNIST-1D, ICML 2024,
      https://arxiv.org/abs/2011.14439
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    _check_label_noise(label_noise)
    x_train, y_train, x_test, y_test = _LOADERS[name]()
    if label_noise > 0:
        y_train = add_label_noise(y_train, label_noise, seed=seed)
    return {
        "x_train": x_train.copy(),
        "y_train": np.array(y_train, copy=True),
        "x_test": x_test.copy(),
        "y_test": y_test.copy(),
    }


# --------------------------------------------------------------------------- models


def make_model(dataset: str) -> Any:
    """The Flax Linen model of a dataset: a 1-D CNN (MNIST-1D) or an MLP (digits).

    The CNN has three convolutions (32 channels, kernels 5, 3, 3, stride 2, ReLU)
    and a dense classifier, as MNIST-1D's reference CNN. Its convolutions are
    written as patch extraction and one contraction (same maths as
    ``nn.Conv``), which XLA runs about ten times faster on a CPU for channels
    this narrow. No BatchNorm, so averaged weights need no statistics.

    Args:
      dataset: one of :data:`DATASETS`.

    Returns:
      A ``flax.linen.Module`` mapping ``[B, features]`` to ``[B, 10]`` logits.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax.compare import make_model
      >>> model = make_model("mnist1d")
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"]
      >>> model.apply({"params": params}, jnp.zeros((2, 40))).shape
      (2, 10)
    """
    import flax.linen as nn

    class Conv1D(nn.Module):
        features: int
        kernel_size: int
        stride: int = 2
        padding: int = 1

        @nn.compact
        def __call__(self, x):
            k, s = self.kernel_size, self.stride
            x = jnp.pad(x, ((0, 0), (self.padding, self.padding), (0, 0)))
            length = (x.shape[1] - k) // s + 1
            patches = jnp.stack([x[:, j : j + s * (length - 1) + 1 : s] for j in range(k)], 2)
            kernel = self.param(
                "kernel", nn.initializers.lecun_normal(), (k, x.shape[-1], self.features)
            )
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
            return jnp.einsum("blkc,kcf->blf", patches, kernel) + bias

    class CNN1D(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x[..., None]
            for k in (5, 3, 3):
                x = nn.relu(Conv1D(32, k)(x))
            return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(NUM_CLASSES)(x)

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return CNN1D() if dataset == "mnist1d" else MLP()


# --------------------------------------------------------------------------- counting


class _GradCounter:
    """Counts backward passes, in units of one full batch, from inside compiled code.

    ``tap(losses, counting)`` is the identity; its backward pass adds to the count
    when the traced boolean ``counting`` is true, and skips the host callback
    otherwise, so one compiled program serves both training and timing.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.value = 0.0

        @jax.custom_vjp
        def tap(losses, counting):
            return losses

        def fwd(losses, counting):
            return losses, (losses.shape[0], counting)

        def bwd(residuals, cotangent):
            n, counting = residuals

            def add():
                jax.debug.callback(self._add, n / self.batch_size)

            jax.lax.cond(counting, add, lambda: None)
            return cotangent, None

        tap.defvjp(fwd, bwd)
        self.tap = tap

    def _add(self, amount: float) -> None:
        self.value += float(amount)

    def take(self) -> float:
        """Waits for pending callbacks, returns the count and resets it."""
        jax.effects_barrier()
        value, self.value = self.value, 0.0
        return value


# --------------------------------------------------------------------------- timing


class _TimedRun:
    """One method's compiled training chunk, run with the counter off, for the timing.

    Each call runs the chunk's steps over a fixed batch order from the state the
    last call left, and blocks on the result.
    """

    def __init__(self, label: str, compiled: Callable, state: Any, data: tuple) -> None:
        self.label, self._compiled, self._state, self._data = label, compiled, state, data

    def __call__(self) -> None:
        self._state, losses = self._compiled(self._state, *self._data)
        jax.block_until_ready(losses)


# --------------------------------------------------------------------------- results


def _environment() -> dict[str, Any]:
    import flax

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "optax": optax.__version__,
            "flax": flax.__version__,
            "sam_optax": sam_optax.__version__,
        },
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else "–"


@dataclasses.dataclass
class CompareResult:
    """The outcome of :func:`run_compare`.

    Attributes:
      rows: one dict per method, in run order, with ``method``, ``paper``,
        ``test_acc_mean`` and ``test_acc_std`` (fractions; std over seeds with
        ``ddof=1``, 0 for one seed), ``test_acc`` (per seed), ``train_loss``,
        ``sharpness`` (top Hessian eigenvalue), ``grads_per_step`` (measured),
        ``expected_grads_per_step`` (the registry's), ``probe_fraction``,
        ``time_per_step`` (seconds), ``rel_cost`` (time over ``sgd``'s, paired:
        see :func:`run_compare`),
        ``compile_s`` and ``curves`` (per seed, the test accuracy at ``curve_steps``).
      curve_steps: the steps at which the curves were measured.
      config: the run's settings.
      environment: device, versions and date.

    Examples:
      >>> from sam_optax.compare import CompareResult
      >>> row = dict(method="sgd", test_acc_mean=0.9, test_acc_std=0.01, train_loss=0.1,
      ...            sharpness=2.0, grads_per_step=1.0, probe_fraction=0.0,
      ...            time_per_step=0.002, rel_cost=1.0, curves=[[0.9]])
      >>> print(CompareResult([row], [10], {}, {}).to_markdown().splitlines()[-1])
      | sgd | 90.00 ± 1.00 | 0.1000 | 2.00 | 1.00 | 0.00 | 2.00 | 1.00 |
    """

    rows: list[dict[str, Any]]
    curve_steps: list[int]
    config: dict[str, Any]
    environment: dict[str, Any]

    def to_markdown(self) -> str:
        """The results as a Markdown table, one line per method."""
        lines = [
            "| method | test acc. (%) | train loss | λ_max | grads / step | probe frac. "
            "| ms / step | rel. cost |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r['method']} | {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} "
                f"| {_fmt(r['train_loss'], '.4f')} | {_fmt(r['sharpness'], '.2f')} "
                f"| {r['grads_per_step']:.2f} | {r['probe_fraction']:.2f} "
                f"| {1e3 * r['time_per_step']:.2f} | {_fmt(r['rel_cost'], '.2f')} |"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything, as a JSON-ready dict (the content of ``results.json``)."""
        return {
            "config": self.config,
            "environment": self.environment,
            "curve_steps": self.curve_steps,
            "rows": self.rows,
        }

    def figure(self) -> Any:
        """A matplotlib figure: accuracy against relative cost, and accuracy curves."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(13, 5), layout="constrained")
        ax_cost, ax_curve = fig.subplots(1, 2)
        for i, r in enumerate(self.rows):
            color = f"C{i % 10}"
            x = r["rel_cost"]
            ax_cost.errorbar(
                x,
                100 * r["test_acc_mean"],
                yerr=100 * r["test_acc_std"],
                fmt="o",
                color=color,
                capsize=3,
            )
            ax_cost.annotate(
                r["method"],
                (x, 100 * r["test_acc_mean"]),
                fontsize=8,
                xytext=(4, 4),
                textcoords="offset points",
            )
            curves = 100 * np.asarray(r["curves"])
            ax_curve.plot(
                self.curve_steps,
                curves.mean(0),
                color=color,
                label=r["method"],
                linestyle="-" if i < 10 else "--",
            )
        ax_cost.set_xlabel(f"cost relative to {BASELINE} (wall time per step)")
        ax_cost.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel("test accuracy (%), mean over seeds")
        ax_curve.legend(fontsize=7, ncol=2)
        c = self.config
        fig.suptitle(
            f"{c['dataset']}, label noise {c['label_noise']:g}, {c['seeds']} seed(s), "
            f"{c['steps']} steps"
        )
        return fig

    def save(self, out: str | os.PathLike) -> dict[str, str]:
        """Writes ``results.json`` and ``compare.png`` into ``out`` (created if needed)."""
        os.makedirs(out, exist_ok=True)
        paths = {
            "json": os.path.join(out, "results.json"),
            "figure": os.path.join(out, "compare.png"),
        }
        with open(paths["json"], "w") as f:
            json.dump(self.to_json(), f, indent=1)
        self.figure().savefig(paths["figure"], dpi=120)
        return paths


# --------------------------------------------------------------------------- training


def resolve_methods(methods: str | Sequence[str] | None) -> list[str]:
    """Validates a list of method names (or a comma-separated string).

    ``None`` means every registered method. The baseline ``sgd`` is always run
    (first), since costs are relative to it.

    Args:
      methods: names of :data:`sam_optax.registry.METHODS`, or ``None``.

    Returns:
      The names to run, ``sgd`` first, without repeats.

    Examples:
      >>> from sam_optax.compare import resolve_methods
      >>> resolve_methods("sam,asam")
      ['sgd', 'sam', 'asam']
    """
    if methods is None:
        names = list(registry.METHODS)
    else:
        names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else methods
        names = [m for m in names if m]
    unknown = [m for m in names if m not in registry.METHODS]
    if unknown or not names:
        raise ValueError(
            f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from: {', '.join(registry.METHODS)}"
        )
    return list(dict.fromkeys([BASELINE, *names]))


def _batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Indices ``[steps, batch_size]``: epochs of shuffled, full batches."""
    rng = np.random.default_rng(seed)
    per_epoch = max(1, n // batch_size)
    epochs = -(-steps // per_epoch)
    order = [rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(order).reshape(-1, batch_size)[:steps].astype(np.int32)


def run_compare(
    dataset: str = "mnist1d",
    methods: str | Sequence[str] | None = None,
    seeds: int = 3,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    label_noise: float = 0.0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> CompareResult:
    r"""Trains a model with each method and seed, and measures what each buys.

    The base optimizer is SGD with momentum 0.9, a cosine learning-rate decay
    from 0.1 to 0 over ``steps`` and decoupled weight decay 5e-4
    (``w ← w − lr_t (m + wd·w)``); each method is built by
    :func:`sam_optax.registry.make_optimizer` in front of it, with its paper
    defaults, and trained with :func:`sam_optax.flax.linen_step`. Seeds change
    the initialisation and the batch order; every method sees the same batches
    for a given seed. Each training run is one compiled ``lax.scan`` per curve
    point. Seeds are not ``vmap``-ed: under ``vmap`` a skipped probe would run
    anyway.

    The cost is measured after training, side by side: each method's compiled
    curve-point chunk (``ceil(steps / CURVE_POINTS)`` steps), with the gradient
    counter's host callbacks switched off, runs from the state its last seed
    ended in, right after ``sgd`` has run as many steps, in ``TIMING_ROUNDS``
    rounds whose order rotates. ``time_per_step`` is the median over rounds of
    a method's time per step and ``rel_cost`` the median of its time over
    ``sgd``'s just before
    (``sam_optax._timing.paired_times``). A method whose probe rate changes over
    training (AE-SAM's threshold schedule) is timed at its end-of-training rate;
    ``probe_fraction`` is its average over training.

    Args:
      dataset: ``"mnist1d"`` or ``"digits"``.
      methods: registry names (a list or a comma-separated string); ``None``
        runs every method. ``sgd`` is always included.
      seeds: the number of seeds per method.
      steps: training steps per run.
      batch_size: examples per step.
      label_noise: the fraction of training labels flipped, in ``[0, 1)``.
      out: a directory for ``results.json`` and ``compare.png``; ``None``
        writes nothing.
      progress: show a progress bar (tqdm, on stderr).

    Returns:
      A :class:`CompareResult`.

    Examples:
      >>> from sam_optax.compare import run_compare
      >>> result = run_compare("digits", methods="sgd", seeds=1, steps=5, progress=False)
      >>> [r["method"] for r in result.rows], result.rows[0]["grads_per_step"]
      (['sgd'], 1.0)

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    from tqdm.auto import tqdm

    from sam_optax.flax import TrainState, linen_step

    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    names = resolve_methods(methods)
    _validate.integer("seeds", seeds, 1, static=True)
    _validate.integer("steps", steps, 1, static=True)
    _validate.integer("batch_size", batch_size, 1, static=True)
    _check_label_noise(label_noise)

    data = load_dataset(dataset, label_noise=label_noise)
    n_train = data["x_train"].shape[0]
    if batch_size > n_train:
        raise ValueError(f"batch size must be at most {n_train} for {dataset}, got {batch_size}")
    arrays = {k: jnp.asarray(v) for k, v in data.items()}
    model = make_model(dataset)
    schedule = optax.cosine_decay_schedule(LEARNING_RATE, steps)
    base = optax.chain(
        optax.trace(decay=MOMENTUM),
        optax.add_decayed_weights(WEIGHT_DECAY),
        optax.scale_by_learning_rate(schedule),
    )

    def xent(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    sharp_x = arrays["x_train"][:SHARPNESS_BATCH]
    sharp_y = arrays["y_train"][:SHARPNESS_BATCH]

    @jax.jit
    def evaluate(params):
        logits = model.apply({"params": params}, arrays["x_test"])
        return jnp.mean(jnp.argmax(logits, -1) == arrays["y_test"])

    @jax.jit
    def final_metrics(params):
        loss = jnp.mean(xent(params, arrays["x_train"], arrays["y_train"]))
        lam = hessian_top_eigenvalue(
            lambda p: jnp.mean(xent(p, sharp_x, sharp_y)), params, key=jax.random.key(0)
        )
        return loss, lam

    counter = _GradCounter(batch_size)

    def train_chunk(state, x_train, y_train, order, counting):
        def per_example_loss_fn(params, batch):
            return counter.tap(xent(params, *batch), counting)

        def body(state, idx):
            batch = (x_train[idx], y_train[idx])
            state, loss = linen_step(
                state,
                lambda logits: jnp.mean(
                    counter.tap(
                        optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]), counting
                    )
                ),
                batch[0],
                update_kwargs={"per_example_loss_fn": per_example_loss_fn, "batch": batch},
            )
            return state, loss

        return jax.lax.scan(body, state, order)

    chunk = max(1, -(-steps // CURVE_POINTS))
    bounds = [*range(0, steps, chunk), steps]
    # The timing reuses the compiled training chunk, with the counter switched off.
    timing_order = _batch_order(n_train, batch_size, chunk, seed=0)
    counting, timing = jnp.asarray(True), jnp.asarray(False)
    runners = []
    init_x = arrays["x_train"][:1]
    bar = tqdm(total=len(names) * seeds * steps, unit="step", disable=not progress)
    rows = []
    try:
        for name in names:
            method = registry.METHODS[name]
            tx = registry.make_optimizer(name, base, learning_rate=schedule, total_steps=steps)
            jitted = jax.jit(train_chunk)
            compiled: dict[int, Any] = {}
            compile_s = 0.0
            runs = []
            for seed in range(seeds):
                bar.set_postfix_str(f"{name}, seed {seed}")
                params = model.init(jax.random.key(seed), init_x)["params"]
                state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
                order = _batch_order(n_train, batch_size, steps, seed)
                curve = []
                counter.take()
                for a, b in itertools.pairwise(bounds):
                    if b - a not in compiled:
                        t0 = time.perf_counter()
                        compiled[b - a] = jitted.lower(
                            state, arrays["x_train"], arrays["y_train"], order[a:b], counting
                        ).compile()
                        compile_s += time.perf_counter() - t0
                    state, _ = compiled[b - a](
                        state, arrays["x_train"], arrays["y_train"], order[a:b], counting
                    )
                    eval_params = (
                        state.params
                        if method.eval_params is None
                        else method.eval_params(state.params, state.opt_state)
                    )
                    curve.append(float(evaluate(eval_params)))
                    bar.update(b - a)
                loss, lam = final_metrics(eval_params)
                runs.append(
                    {
                        "test_acc": curve[-1],
                        "train_loss": float(loss),
                        "sharpness": float(lam),
                        "grads_per_step": counter.take() / steps,
                        "probe_fraction": probe_fraction(state.opt_state),
                        "curve": curve,
                    }
                )
            runners.append(
                _TimedRun(
                    name,
                    compiled[chunk],
                    state,
                    (arrays["x_train"], arrays["y_train"], timing_order, timing),
                )
            )
            acc = np.array([r["test_acc"] for r in runs])
            rows.append(
                {
                    "method": name,
                    "paper": method.paper,
                    "test_acc_mean": float(acc.mean()),
                    "test_acc_std": float(acc.std(ddof=1)) if seeds > 1 else 0.0,
                    "test_acc": acc.tolist(),
                    **{
                        k: float(np.mean([r[k] for r in runs]))
                        for k in (
                            "train_loss",
                            "sharpness",
                            "grads_per_step",
                            "probe_fraction",
                        )
                    },
                    "expected_grads_per_step": method.grads_per_step,
                    "compile_s": compile_s,
                    "curves": [r["curve"] for r in runs],
                }
            )
        bar.set_postfix_str("timing")
        times = _timing.paired_times(runners[0], runners[1:], TIMING_ROUNDS, steps=chunk, warmup=1)
    finally:
        bar.close()
    for row in rows:
        row["time_per_step"], row["rel_cost"] = times[row["method"]]
    config = {
        "dataset": dataset,
        "methods": names,
        "seeds": seeds,
        "steps": steps,
        "batch_size": batch_size,
        "label_noise": label_noise,
        "learning_rate": LEARNING_RATE,
        "momentum": MOMENTUM,
        "weight_decay": WEIGHT_DECAY,
        "sharpness_batch": min(SHARPNESS_BATCH, n_train),
    }
    result = CompareResult(rows, bounds[1:], config, _environment())
    if out is not None:
        result.save(out)
    return result
