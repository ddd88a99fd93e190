"""Weight averaging: SWA behind any optimizer, and WASAM (SAM in front, SWA behind)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax._state import find_state
from sam_optax.methods.sam import sam
from sam_optax.skeleton import ScalarOrSchedule, check_state

PyTree = Any


class SWAState(NamedTuple):
    """State of :func:`swa`.

    Attributes:
      count: updates seen so far (int32).
      averaged: how many parameter values the average holds (int32).
      mean: the running equal-weight average, with the structure and shapes of
        the params (dtype: the params', or ``accumulator_dtype``).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    averaged: jax.Array
    mean: PyTree


def swa(
    start_step: int | jax.Array = 0,
    every: int | jax.Array = 1,
    *,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic Weight Averaging, placed last in a chain.

    The updates pass through unchanged. The transformation folds the parameter
    value *after* this step's update, ``w_new = params + updates``, into an
    equal-weight running average when the update's index ``t`` (0 for the
    first update) satisfies ``t >= start_step`` and
    ``(t - start_step) mod every == 0``:

    .. math::

        \bar w \leftarrow \bar w + \frac{w_{\mathrm{new}} - \bar w}{n + 1},
        \qquad n \leftarrow n + 1

    so after ``n`` folds :math:`\bar w` is the mean of the ``n`` averaged
    parameter values. Read it with :func:`swa_params`. Because it sees the final
    updates, SWA must be the last member of ``optax.chain``; inside
    ``optax.MultiSteps`` it sees one update per completed accumulation.

    ``start_step`` and ``every`` are integers (give them as ``static_args`` to
    ``optax.inject_hyperparams`` if they must stay Python numbers). The official
    WASAM protocol averages once per epoch from 50-90 % of training.

    Args:
      start_step: index of the first update whose result is averaged (>= 0).
      every: average every ``every`` updates from ``start_step`` on (>= 1).
      accumulator_dtype: dtype of the stored average; ``None`` keeps the
        params' dtype. The fold is computed in float32 (or wider) in any case;
        with bfloat16 params over many folds pass ``jnp.float32`` so that small
        increments are not rounded away.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``params`` and accepts (and ignores) every other extra argument,
      ``grad_fn`` included.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> params = jnp.array([0.0, 0.0])
      >>> tx = optax.chain(optax.sgd(1.0), sam_optax.swa(start_step=1))
      >>> state = tx.init(params)
      >>> for _ in range(3):  # w after each update: -1, -2, -3; averaged: -2, -3
      ...     updates, state = tx.update(jnp.ones(2), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> sam_optax.swa_params(state)
      Array([-2.5, -2.5], dtype=float32)

    References:
      Izmailov et al., Averaging Weights Leads to Wider Optima and Better
      Generalization, UAI 2018, https://arxiv.org/abs/1803.05407
    """
    _validate.integer("start_step", start_step, 0)
    _validate.integer("every", every, 1)
    _validate.dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params):
        _validate.floating_params("swa", params)

        def zeros(p):  # zeros_like: the average is sharded like the params
            p = jnp.asarray(p)
            return jnp.zeros_like(p, p.dtype if accumulator_dtype is None else accumulator_dtype)

        return SWAState(
            count=jnp.zeros([], jnp.int32),
            averaged=jnp.zeros([], jnp.int32),
            mean=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "sam_optax.swa: `update` needs `params`: the average is taken over the "
                "parameters after the update, `params + updates`."
            )
        check_state(state, jax.eval_shape(init_fn, params), "swa")
        t = state.count
        take = jnp.logical_and(t >= start_step, (t - start_step) % every == 0)
        new_params = optax.apply_updates(params, updates)
        n = state.averaged.astype(jnp.float32)

        def fold(mean, w):
            m = mean.astype(_tree.accum_dtype(mean.dtype))
            w = w.astype(_tree.accum_dtype(w.dtype))
            folded = m + (w - m) / (n + 1).astype(m.dtype)
            return jnp.where(take, folded, m).astype(mean.dtype)

        new_state = SWAState(
            count=optax.safe_increment(t),
            averaged=state.averaged + take.astype(jnp.int32),
            mean=jax.tree.map(fold, state.mean, new_params),
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa_params(opt_state: PyTree) -> PyTree:
    r"""The SWA average held anywhere inside a (nested) optimizer state.

    .. math::

        \bar w = \frac{1}{n} \sum_{k=1}^{n} w_{t_k}

    over the ``n`` parameter values that :func:`swa` has averaged.

    Args:
      opt_state: the state of an optimizer that contains :func:`swa` once, at
        any depth: ``optax.chain``, ``optax.inject_hyperparams``,
        ``optax.MultiSteps`` and their combinations.

    Returns:
      The average, with the structure and shapes of the params and the dtype of
      the SWA accumulator (the params' dtype by default).

    Raises:
      ValueError: if ``opt_state`` holds no SWA state (or more than one), or
        if no step has been averaged yet (``start_step`` not reached).

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> tx = optax.MultiSteps(optax.chain(optax.sgd(0.5), sam_optax.swa()), 2)
      >>> params = jnp.array([1.0])
      >>> state = tx.init(params)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.array([2.0]), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> sam_optax.swa_params(state)
      Array([0.], dtype=float32)

    References:
      Izmailov et al., Averaging Weights Leads to Wider Optima and Better
      Generalization, UAI 2018, https://arxiv.org/abs/1803.05407
    """
    state = find_state(opt_state, SWAState, "swa_params")
    if not isinstance(state.averaged, jax.core.Tracer) and int(state.averaged) == 0:
        raise ValueError(
            "sam_optax.swa_params: no step has been averaged yet (averaged count 0, "
            f"updates seen {int(state.count)}); the average starts at `start_step`."
        )
    return state.mean


def wasam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    start_step: int | jax.Array = 0,
    every: int | jax.Array = 1,
    *,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    axis_name: str | None = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""WASAM: SAM in front of the base optimizer, SWA behind it.

    .. math::

        \mathrm{out} = \mathrm{base}\big(\mathrm{grad\_fn}(w + \rho\,g/(\lVert g\rVert
        + \epsilon))\big), \qquad
        \bar w \leftarrow \bar w + \frac{(w + \mathrm{out}) - \bar w}{n + 1}
        \text{ on averaged steps}

    This is ``optax.chain(sam(rho), base_optimizer, swa(start_step, every))``,
    the recipe of Kaddour et al.; averaging works the same behind any other
    method (chain :func:`swa` last). Evaluate :func:`swa_params` after
    recomputing the BatchNorm statistics of the averaged weights
    (``sam_optax.flax.recompute_batch_stats_linen`` / ``..._nnx``).

    Args:
      base_optimizer: the optimizer that follows SAM (e.g. ``optax.sgd``).
      rho: SAM's perturbation radius, a number or an optax schedule.
      start_step: index of the first update whose result is averaged (the
        paper starts at 50-90 % of training).
      every: average every ``every`` updates (the paper: once per epoch).
      mask: SAM's mask of perturbed leaves (see :func:`sam_optax.sam`).
      axis_name: SAM's mapped axis (see :func:`sam_optax.sam`).
      accumulator_dtype: dtype of the stored average (see :func:`swa`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` needs
      ``params`` and ``grad_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2)
      >>> params = jnp.zeros(2)
      >>> tx = sam_optax.wasam(optax.sgd(0.1), rho=0.05, start_step=2)
      >>> state = tx.init(params)
      >>> for _ in range(4):
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                                grad_fn=jax.grad(loss))
      ...     params = optax.apply_updates(params, updates)
      >>> sam_optax.swa_params(state).shape
      (2,)

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss (same data, same dropout key) as ``updates``.

    References:
      Kaddour et al., When Do Flat Minima Optimizers Work?, NeurIPS 2022,
      https://arxiv.org/abs/2202.00661
    """
    _validate.transformation("base_optimizer", base_optimizer)
    return optax.chain(
        sam(rho, mask=mask, axis_name=axis_name),
        base_optimizer,
        swa(start_step, every, accumulator_dtype=accumulator_dtype),
    )
