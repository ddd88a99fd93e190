"""SAMPa: SAM whose two gradients do not depend on each other, so they run in parallel."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax.methods.sam import Mask
from sam_optax.pair import PairGradFn, pair_grad_fn
from sam_optax.skeleton import (
    ScalarOrSchedule,
    _check_probe,
    _fill,
    _missing,
    _on_whole_model,
    _prune,
    _whole_params,
    check_state,
)

PyTree = Any


class SAMPaState(NamedTuple):
    """State of :func:`sampa`.

    Attributes:
      count: updates taken so far (int32); drives ``rho`` schedules, and step 0
        (``G = 0``) takes no trial step.
      g: ``G``, the gradient at the last trial point ``y`` (float32 or wider,
        params-shaped; zeros at initialisation).
      base: the base optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    g: PyTree
    base: PyTree


def _lagged_missing() -> ValueError:
    return ValueError(
        "sam_optax.sampa: `update` needs the keyword argument `pair_grad_fn`. With "
        "same_batch=False (the official code) the gradient at the perturbed point is "
        "taken on the PREVIOUS batch, the one that produced G, and the gradient at the "
        "trial point on the current batch:\n"
        "    pair = sam_optax.pair_grad_fn(loss_fn, prev_batch, batch)\n"
        "    updates, opt_state = tx.update(grads, opt_state, params, pair_grad_fn=pair)\n"
        "(prev_batch = batch on the first step). Or build sampa(..., same_batch=True) "
        "and pass `grad_fn`."
    )


def sampa(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.1,
    lam: float | jax.Array = 0.2,
    *,
    eps: float | jax.Array = 1e-12,
    same_batch: bool = False,
    mask: Mask = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SAMPa (SAM parallelised): wraps the base optimizer; its two gradients are independent.

    With ``G`` the gradient at the previous trial point (stored, zero at step 0)
    and ``base`` the base optimizer:

    .. math::

        \tilde x_t = x_t + \rho \, \frac{G}{\lVert G \rVert + \epsilon}, \qquad
        y_{t+1} = x_t + \mathrm{base}(G, S_t, x_t) \ \text{(trial step, state discarded)},

        \mathrm{out} = (1 - \lambda)\, \nabla f(\tilde x_t; B_{t-1})
            + \lambda\, \nabla f(y_{t+1}; B_t), \qquad
        x_{t+1} = x_t + \mathrm{base}(\mathrm{out}, S_t, x_t), \qquad
        G \leftarrow \nabla f(y_{t+1}; B_t)

    Both gradients depend only on ``x_t`` and ``G``, so they are one pair of
    independent evaluations (:func:`sam_optax.pair_grad_fn`), concurrent on two
    device groups; SAMPa never evaluates the gradient at ``x_t`` and ignores the
    incoming ``updates``. At step 0, ``x̃ = y = x``.

    We follow the official code, not the paper's equations (plain gradient
    descent on one ``f``): ``y`` is the base optimizer's own trial step (momentum
    and weight decay included; the official code hand-codes it for SGD with
    momentum, which this generalises), and ``∇f(x̃)`` is taken on the batch that
    produced ``G`` (``same_batch=False``). ``G`` is carried explicitly: the
    official code recovers it as ``(agg - pert) / λ``, which breaks at ``λ = 0``.

    ``rho = 0`` is NOT the base optimizer in general: with ``λ > 0`` part of the
    step is the gradient at the trial point, and with the lagged batch the
    gradient at ``x`` is the previous batch's. With ``same_batch=True``,
    ``rho = 0`` and ``lam = 0`` give the base optimizer exactly.

    Args:
      base_optimizer: the optimizer that takes the trial step and the real step
        (it receives every extra argument of ``update`` on the real step).
      rho: the perturbation radius (official code: 0.1), a number or an optax
        schedule.
      lam: ``λ``, the weight of the trial-point gradient, in ``[0, 1]``
        (official flag ``--og``; the paper's "SAMPa-0.2": 0.2).
      eps: added to ``‖G‖``.
      same_batch: take both gradients on the current batch; ``update`` then
        accepts ``grad_fn`` instead of ``pair_grad_fn``.
      mask: pytree of booleans (or a function of the params): leaves that ``x̃``
        perturbs; ``‖G‖`` runs over them only. The trial step moves every leaf.

    Returns:
      A complete optimizer, an ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, pair_grad_fn=None, grad_fn=None)``
      needs ``params`` and ``pair_grad_fn`` (or, with ``same_batch=True``,
      ``grad_fn``); its state is a :class:`SAMPaState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda x, b: 0.5 * jnp.mean(b) * jnp.sum(x ** 2)
      >>> tx = sam_optax.sampa(optax.sgd(0.1), rho=0.1, lam=0.2)
      >>> x, state, prev = jnp.array([1.0]), None, None
      >>> state = tx.init(x)
      >>> for batch in (jnp.ones(4), jnp.ones(4)):
      ...     prev = batch if prev is None else prev
      ...     pair = sam_optax.pair_grad_fn(loss, prev, batch)
      ...     updates, state = tx.update(None, state, x, pair_grad_fn=pair)
      ...     x, prev = optax.apply_updates(x, updates), batch
      >>> round(float(x[0]), 6), round(float(state.g[0]), 6)
      (0.804, 0.8)

    Note:
      ``pair_grad_fn(x̃, y) -> (g_x̃, g_y)`` takes ``x̃`` on the previous batch
      and ``y`` on the current one (build it with :func:`sam_optax.pair_grad_fn`);
      with ``same_batch=True``, ``grad_fn(params) -> grads`` on the current batch
      is enough (or a pair oracle on ``(batch, batch)`` for the parallel form).
      The gradients must already be averaged over any data-parallel devices.

    References:
      Xie, Pethick & Cevher, SAMPa: Sharpness-aware Minimization Parallelized,
      NeurIPS 2024, https://arxiv.org/abs/2410.10683
    """
    _validate.transformation("base_optimizer", base_optimizer)
    _validate.non_negative("rho", rho)
    _validate.in_range("lam", lam, 0.0, 1.0)
    _validate.non_negative("eps", eps)
    _validate.not_static("same_batch", same_batch, "a bool")
    if not isinstance(same_batch, bool):
        raise ValueError(f"`same_batch` must be a bool, got {same_batch!r}.")
    _validate.mask(mask)
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params):
        _tree.resolve_mask(mask, params)  # a mask that does not fit fails here, not later
        return SAMPaState(
            count=jnp.zeros([], jnp.int32), g=_tree.zeros_like_accum(params), base=base.init(params)
        )

    def update_fn(updates, state, params=None, *, pair_grad_fn=None, grad_fn=None, **extra_args):
        if params is None:
            raise _missing("`params`", "sampa")
        if pair_grad_fn is None and not same_batch:
            raise _lagged_missing()
        if pair_grad_fn is None and grad_fn is None:
            raise _missing("the keyword argument `grad_fn`", "sampa")
        oracle = grad_fn if pair_grad_fn is None else pair_grad_fn
        if not callable(oracle):
            raise ValueError(
                f"sam_optax.sampa: `{'grad_fn' if pair_grad_fn is None else 'pair_grad_fn'}` "
                f"must be a function, got {oracle!r} of type {type(oracle).__name__}."
            )
        full_params = _whole_params(params, extra_args, "sampa")
        check_state(state, jax.eval_shape(init_fn, params), "sampa")
        floating = _tree.floating_flags(params)
        flags = [k and f for k, f in zip(_tree.resolve_mask(mask, params), floating, strict=True)]
        w_leaves, treedef = jax.tree.flatten(params)
        # The incoming updates are not used; they give the output its dtypes (and the
        # integer leaves their float0 updates). None stands for zeros.
        like = jax.tree.map(jnp.zeros_like, params) if updates is None else updates
        big_g = state.g
        rho_t = rho(state.count) if callable(rho) else rho

        def moved(d, keep):
            """``w + d`` on the leaves of ``keep`` (in float32 or wider), ``w`` elsewhere."""
            return treedef.unflatten(
                [
                    (w.astype(_tree.accum_dtype(w.dtype)) + x).astype(w.dtype) if k else w
                    for w, x, k in zip(w_leaves, treedef.flatten_up_to(d), keep, strict=True)
                ]
            )

        g_m = _tree.apply_mask(big_g, flags)
        scale = rho_t / (_tree.global_norm(g_m) + eps)
        x_tilde = moved(jax.tree.map(lambda x: scale * x, g_m), flags)
        # The trial step on G, in the dtype of the updates (its state is discarded).
        g_in = _tree.pass_through(big_g, like, floating)
        trial, _ = base.update(g_in, state.base, params, **extra_args)
        first = state.count == 0
        trial = jax.tree.map(
            lambda d, keep: jnp.where(first, jnp.zeros_like(d), d) if keep else d,
            _tree.as_float(trial, params, floating),
            treedef.unflatten(floating),
        )
        y = moved(trial, floating)

        def evaluate(pair):
            if pair_grad_fn is None:
                return [_on_whole_model(oracle, p, full_params) for p in pair]
            if full_params is None:
                return oracle(*pair)
            # Inside optax.masked: both points of the whole model, cut back to the part.
            outs = oracle(*(_fill(p, full_params) for p in pair))
            return [_prune(o, p) for o, p in zip(outs, pair, strict=True)]

        grads = evaluate((x_tilde, y))
        if not (isinstance(grads, tuple | list) and len(grads) == 2):
            raise ValueError(
                "sam_optax.sampa: `pair_grad_fn` must return a pair (grads_a, grads_b), "
                f"got {type(grads).__name__}."
            )
        for g in grads:
            _check_probe(g, like, "sampa")
        g_tilde, g_y = (_tree.as_float(g, params, floating) for g in grads)
        out = jax.tree.map(lambda a, b: (1.0 - lam) * a + lam * b, g_tilde, g_y)
        out = _tree.pass_through(out, like, floating)
        direction, b_state = base.update(out, state.base, params, **extra_args)
        new_state = SAMPaState(
            count=optax.safe_increment(state.count),
            g=_tree.cast_like(g_y, state.g),
            base=b_state,
        )
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _PreviousBatchState(NamedTuple):
    """State of :func:`previous_batch_oracle`: SAMPa's and the last batch seen."""

    inner: SAMPaState
    prev_batch: PyTree
    seen: jax.Array


def previous_batch_oracle(
    tx: optax.GradientTransformationExtraArgs, batch_like: PyTree
) -> optax.GradientTransformationExtraArgs:
    """Lagged SAMPa from the extra arguments ``per_example_loss_fn`` and ``batch``.

    Keeps the last batch in its state (zeros of ``batch_like``'s shapes before the
    first step, when the current batch stands in for it) and builds the pair oracle
    ``pair_grad_fn(mean of per_example_loss_fn, prev_batch, batch)`` for each
    ``update``; the registry and ``sam-optax compare`` build lagged SAMPa so.

    Args:
      tx: :func:`sampa` with ``same_batch=False``.
      batch_like: a pytree of arrays or ``jax.ShapeDtypeStruct`` with the batch's
        structure, shapes and dtypes.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
      ``per_example_loss_fn(params, batch) -> [B]`` and ``batch``.
    """
    _validate.transformation("tx", tx)

    def init_fn(params):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_like)
        return _PreviousBatchState(tx.init(params), zeros, jnp.zeros([], jnp.bool_))

    def update_fn(updates, state, params=None, *, per_example_loss_fn=None, batch=None, **extra):
        if per_example_loss_fn is None or batch is None:
            raise ValueError(
                "sam_optax.sampa (lagged, built by the registry) needs the keyword arguments "
                "`per_example_loss_fn(params, batch) -> [B]` and `batch`."
            )
        prev = jax.tree.map(lambda p, b: jnp.where(state.seen, p, b), state.prev_batch, batch)
        loss: Callable[[PyTree, PyTree], jax.Array] = lambda p, b: jnp.mean(  # noqa: E731
            per_example_loss_fn(p, b)
        )
        pair: PairGradFn = pair_grad_fn(loss, prev, batch)
        out, inner = tx.update(updates, state.inner, params, pair_grad_fn=pair, **extra)
        return out, _PreviousBatchState(inner, batch, jnp.ones([], jnp.bool_))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
