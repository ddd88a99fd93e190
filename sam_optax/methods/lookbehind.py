"""Lookbehind-SAM: k ascent and descent steps on one minibatch, then a look back."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax.methods.sam import Mask
from sam_optax.perturbations import adaptive_perturbation, normalized_gradient
from sam_optax.pieces import Perturbation
from sam_optax.skeleton import ScalarOrSchedule, check_state, sharpness_aware

PyTree = Any


class LookbehindState(NamedTuple):
    """State of :func:`lookbehind_sam`.

    Attributes:
      count: outer steps taken so far (int32); drives ``rho`` schedules.
      base: the base optimizer's state, carried across outer steps (it takes
        ``k`` steps per outer step).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    base: PyTree


def _climb_on(perturbation: Perturbation) -> Perturbation:
    """``perturbation`` taken at the last perturbed point ``w + E``; returns ``E + e``.

    Its state is the displacement ``E`` reached so far (float32), so that each
    call of the skeleton probes one step further from the slow weights ``w``.
    """

    def perturb(g, climbed, ctx):
        at = jax.tree.map(lambda w, d: w + d, ctx.params, climbed)  # ASAM's |w| is read here
        e, _ = perturbation.perturb(g, optax.EmptyState(), ctx._replace(params=at))
        climbed = jax.tree.map(lambda d, x: d + x.astype(d.dtype), climbed, e)
        return climbed, climbed

    return Perturbation(_tree.zeros_like_accum, perturb)


def lookbehind_sam(
    base_optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    k: int = 2,
    alpha: float | jax.Array | None = None,
    perturbation: str = "normalized",
    eta: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-12,
    mask: Mask = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Lookbehind-SAM: wraps the base optimizer; ``k`` ascent and descent steps per minibatch.

    With slow weights ``φ = w``, fast weights ``f_0 = w`` and ``g_1 = g``, on
    one minibatch:

    .. math::

        p_i = p_{i-1} + \rho \frac{g_i}{\lVert g_i \rVert + \epsilon}\ (p_0 = w), \quad
        g_{i+1} = \nabla L(p_i), \quad
        f_i = f_{i-1} + \mathrm{base}(g_{i+1};\ f_{i-1}), \qquad i = 1 \dots k

    .. math::

        \mathrm{out} = \alpha\, (f_k - w), \qquad
        \alpha_\ell = \tfrac{1}{2}\big(1 + \cos(f_{1,\ell} - w_\ell,\ f_{k,\ell} - w_\ell)\big)
        \ \text{(adaptive, per leaf)}

    The ascent accumulates from the slow weights (``p`` is never reset, so the
    last probe lies up to ``k ρ`` from ``w``); each descent is a step of the
    base optimizer (momentum, Adam, weight decay) at the fast weights, along
    the gradient at the current perturbed point; the base state is carried
    across outer steps. The output is a displacement of the parameters, not
    a gradient: ``lookbehind_sam`` must be the last member of a chain.

    This follows the official code (``lookbehind.py``). Its loop evaluates the
    gradient at ``p_i`` twice, once for the descent and once for the next
    ascent; under the ``grad_fn`` contract (same minibatch, same dropout key)
    both are the same gradient, so it is evaluated once: ``k + 1`` gradient
    evaluations per step (the incoming ``g`` and ``k`` calls of ``grad_fn``),
    where the official code pays ``2k``. The adaptive ``α`` is a cosine per
    leaf (per tensor, as the code's), taken from unit vectors; a leaf that
    did not move gets ``α = 1/2`` of a zero displacement. With ``k = 1`` the
    adaptive ``α`` is 1 and the method is SAM (or ASAM).

    ``rho = 0`` gives the base optimizer only for ``k = 1`` with ``α = 1``
    (adaptive or given). For ``k > 1`` it gives ``k`` base steps along the
    same gradient ``g`` followed by the interpolation, by design.

    Args:
      base_optimizer: the optimizer of the fast weights (it receives every
        extra argument of ``update``, as in ``optax.chain``).
      rho: the radius of each ascent step, a number or an optax schedule of
        the outer step count (official: 0.05 for SAM, 0.5 for ASAM).
      k: the ascent and descent steps per minibatch, a Python integer >= 1
        (official README: 2; the loop is unrolled). The registry keeps 2 with
        ``rho = 0.05`` and the adaptive ``alpha``: on MNIST-1D (3 seeds, SGD with
        learning rate 0.1 and momentum 0.9) 93.8 % clean and 72.0 % with noisy
        labels, against SGD's 93.3 % and 60.5 %; ``k = 3`` and ``k = 5``
        diverge there (``k`` base steps on one minibatch act as a ``k`` times
        larger step): lower the learning rate for a larger ``k``.
      alpha: the interpolation ``w + α (f_k - w)``, in ``[0, 1]``, or ``None``
        for the adaptive per-leaf ``α`` (the official README's ``--alpha -1``;
        the paper also reports 0.2, 0.5 and 0.8).
      perturbation: ``"normalized"`` (SAM's ascent) or ``"adaptive"`` (ASAM's,
        ``T = |p| + eta`` on the weight tensors, at the current perturbed point
        ``p``, as :func:`sam_optax.adaptive_perturbation`).
      eta: ASAM's offset (``perturbation="adaptive"`` only; the official class
        default 0.01, its script's 0).
      eps: added to every norm that is divided by.
      mask: pytree of booleans (or a function of the params): leaves to
        perturb; every leaf takes the base steps and the interpolation.
      axis_name: under ``pmap``/``shard_map``, the axis over which each probe
        gradient is averaged before its base step; the ascents use the
        gradients on each device, as the incoming ``g``.

    Returns:
      A complete optimizer, an ``optax.GradientTransformationExtraArgs`` whose
      ``update`` needs ``params`` and ``grad_fn``; its state is a
      :class:`LookbehindState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w: 0.5 * jnp.sum(w ** 2)
      >>> w = jnp.array([1.0])
      >>> tx = sam_optax.lookbehind_sam(optax.sgd(0.1), rho=0.1, k=2, alpha=0.5)
      >>> updates, state = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))
      >>> round(float(optax.apply_updates(w, updates)[0]), 6)  # fast: 0.89, then 0.77
      0.885

    Note:
      ``grad_fn(params) -> grads`` must return the gradient of the same
      minibatch loss (same data, same dropout key) as ``updates``; it is
      called ``k`` times per step.

    References:
      Mordido et al., Lookbehind-SAM: k steps back, 1 step forward, ICML 2024,
      https://arxiv.org/abs/2307.16704
    """
    _validate.transformation("base_optimizer", base_optimizer)
    k = _validate.integer("k", k, 1, static=True)
    if alpha is not None:
        _validate.in_range("alpha", alpha, 0.0, 1.0)
    _validate.one_of("perturbation", perturbation, ("normalized", "adaptive"))
    _validate.non_negative("eta", eta)
    climb = normalized_gradient() if perturbation == "normalized" else adaptive_perturbation(eta)
    name = "lookbehind_sam"
    # The probes go through the skeleton (masks, full_params, casts); its radius is rho.
    probe = sharpness_aware(_climb_on(climb), rho=rho, eps=eps, mask=mask, name=name)
    _validate.axis_name(axis_name)
    base = optax.with_extra_args_support(base_optimizer)

    def init_fn(params):
        probe.init(params)  # a mask that does not fit fails here
        return LookbehindState(count=jnp.zeros([], jnp.int32), base=base.init(params))

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is not None:  # without params, the probe below says what is missing
            check_state(state, jax.eval_shape(init_fn, params), name)
        p_state = probe.init(params)._replace(count=state.count)
        floating = _tree.floating_flags(updates)
        b_state, grads, moved, first = state.base, updates, None, None
        for i in range(k):
            grads, p_state = probe.update(grads, p_state, params, grad_fn=grad_fn, **extra_args)
            p_state = p_state._replace(count=state.count)  # one radius per outer step
            step = jax.lax.pmean(grads, axis_name) if axis_name is not None else grads
            fast = params if moved is None else _shifted(params, moved, floating)
            d, b_state = base.update(step, b_state, fast, grad_fn=grad_fn, **extra_args)
            d = _tree.as_float(d, updates, floating)
            moved = d if moved is None else jax.tree.map(jnp.add, moved, d)
            first = moved if i == 0 else first
        out = moved if alpha is None and k == 1 else _look_back(moved, first, alpha)
        return _tree.pass_through(out, updates, floating), LookbehindState(
            count=optax.safe_increment(state.count), base=b_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _shifted(params: PyTree, moved: PyTree, floating: list[bool]) -> PyTree:
    """The fast weights ``w + moved``, formed in the accumulation dtype, in the params' dtypes."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [
            (w.astype(_tree.accum_dtype(w.dtype)) + d).astype(w.dtype) if keep else w
            for w, d, keep in zip(leaves, treedef.flatten_up_to(moved), floating, strict=True)
        ]
    )


def _look_back(moved: PyTree, first: PyTree, alpha: Any) -> PyTree:
    """``α (f_k - w)``: a given ``α``, or per leaf ``(1 + cos(f_1 - w, f_k - w)) / 2``."""
    if alpha is not None:
        return jax.tree.map(lambda d: alpha * d, moved)

    def leaf(d, d_1):
        unit, unit_1 = (_tree.scale_tree(x, _tree.inverse(_tree.global_norm(x))) for x in (d, d_1))
        return 0.5 * (1.0 + _tree.real_vdot(unit_1, unit)) * d

    return jax.tree.map(leaf, moved, first)
