"""Combine pieces: what a sharpness-aware step descends along."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax import _tree, _validate
from sam_optax.perturbations import normalized_gradient
from sam_optax.pieces import Combine, empty_init

PyTree = Any


def probe_gradient() -> Combine:
    """SAM's combine: descend along the probe gradient, ``out = grad_fn(w + e)``.

    On a skipped step the clean gradient ``g`` is used.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> piece = sam_optax.probe_gradient()
      >>> out, _ = piece.combine(jnp.ones(2), jnp.zeros(2), piece.init(None), None)
      >>> out.tolist()
      [0.0, 0.0]

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """

    def combine(g, g_p, state, ctx):
        del g, ctx
        return g_p, state

    def fallback(g, state, ctx):
        del ctx
        return g, state

    return Combine(empty_init, combine, fallback)


def _clean_gradient(g, state, ctx):
    """The fallback on a skipped step: the clean gradient ``g``."""
    del ctx
    return g, state


def surrogate_gap(alpha: float | jax.Array = 0.4) -> Combine:
    r"""GSAM's combine: the probe gradient minus ``alpha`` times the part of ``g`` orthogonal to it.

    .. math::

        g_\perp = g - \frac{\langle g, g_p \rangle}{\lVert g_p \rVert^2 + \epsilon}\, g_p,
        \qquad \mathrm{out} = g_p - \alpha\, g_\perp

    Descending along ``-g_perp`` lowers the surrogate gap
    ``L(w + e) - L(w)`` without changing the perturbed loss to first order.
    ``alpha = 0`` gives SAM. For complex leaves the dot product is its real part,
    :math:`\mathrm{Re}\langle g, g_p \rangle`. The coefficient is formed from unit
    vectors, so gradients near the top of the float32 range do not overflow.
    Where a mask is given, the dot product, the norm
    and ``g_perp`` live on the perturbed leaves only (the others descend along
    ``g_p``). The decomposition uses the gradients on this device; under
    ``axis_name`` the result is then averaged, as in both official codes. On a
    skipped step the clean gradient ``g`` is used.

    Args:
      alpha: the weight of the surrogate-gap direction.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.surrogate_gap(alpha=0.5)
      >>> ctx = Context(None, 0, 0.05, 0.0, None, {})
      >>> out, _ = piece.combine(jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0]),
      ...                        piece.init(None), ctx)
      >>> out.tolist()  # g_perp = (0, 1)
      [2.0, -0.5]

    References:
      Zhuang et al., Surrogate Gap Guided Sharpness-Aware Minimization,
      ICLR 2022, https://arxiv.org/abs/2203.08065
    """
    _validate.non_negative("alpha", alpha)

    def combine(g, g_p, state, ctx):
        g_m, g_p_m = _tree.apply_mask(g, ctx.mask), _tree.apply_mask(g_p, ctx.mask)
        coef, _ = _tree.projection(g_m, g_p_m, ctx.eps)
        g_perp = jax.tree.map(lambda a, b: a - coef * b, g_m, g_p_m)
        return jax.tree.map(lambda b, c: b - alpha * c, g_p, g_perp), state

    return Combine(empty_init, combine, _clean_gradient)


def weighted_sharpness(gamma: float | jax.Array = 0.9) -> Combine:
    r"""WSAM's combine: the clean gradient plus the weighted sharpness gradient.

    The gradient of ``L(w) + alpha [L(w + e) - L(w)]`` with
    ``alpha = gamma / (1 - gamma)``:

    .. math::

        \alpha = \frac{\gamma}{1 - \gamma}, \qquad
        \mathrm{out} = g + \alpha\, (g_p - g)

    ``gamma = 0.5`` gives SAM (``out = g_p``), ``gamma = 0`` the clean gradient.
    On a skipped step the clean gradient ``g`` is used.

    Args:
      gamma: the weight of the sharpness term, in ``[0, 1)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> piece = sam_optax.weighted_sharpness(gamma=0.75)  # alpha = 3
      >>> out, _ = piece.combine(jnp.array([1.0]), jnp.array([2.0]), piece.init(None), None)
      >>> out.tolist()
      [4.0]

    References:
      Yue et al., Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
      Regularization Term, KDD 2023, https://arxiv.org/abs/2305.15817
    """
    _validate.in_range("gamma", gamma, 0.0, 1.0, high_open=True)

    def combine(g, g_p, state, ctx):
        del ctx
        alpha = gamma / (1.0 - gamma)
        return jax.tree.map(lambda a, b: a + alpha * (b - a), g, g_p), state

    return Combine(empty_init, combine, _clean_gradient)


class LookSAMState(NamedTuple):
    """State of :func:`looksam_reuse`.

    Attributes:
      g_v: the stored orthogonal part of the last probe gradient (float32).
      g_v_norm: its norm, float32 of shape ``[1]``, or ``[leaves]`` per leaf with
        ``layerwise=True``; stored so that a skipped step does not recompute it.
    """

    g_v: PyTree
    g_v_norm: jax.Array


def _groups(tree: PyTree, layerwise: bool) -> list[PyTree]:
    """The pieces over which LookSAM's norms and projections run: all leaves, or each leaf."""
    return jax.tree.leaves(tree) if layerwise else [tree]


def looksam_reuse(
    alpha: float | jax.Array = 0.7,
    *,
    layerwise: bool = False,
) -> Combine:
    r"""LookSAM's combine: store the orthogonal part of the probe, reuse it on skipped steps.

    On a probing step, with ``g_s = grad_fn(w + e)``:

    .. math::

        g_v = g_s - \frac{\langle g, g_s \rangle}{\lVert g \rVert^2 + \epsilon}\, g
        \ \text{(stored)}, \qquad \mathrm{out} = g_s

    and on a skipped step (one gradient evaluation):

    .. math::

        \mathrm{out} = g + \alpha \, \frac{\lVert g \rVert}{\lVert g_v \rVert + \epsilon}\, g_v

    With ``layerwise=True`` the projection and both norms are taken per leaf
    instead of over the whole tree. For complex leaves the dot product is its real
    part; the coefficient is formed from unit vectors, so it does not overflow.
    Before the first probe ``g_v = 0`` and a skipped step returns ``g``. Where the
    method has a mask (``ctx.mask``, the leaves that are perturbed) the
    decomposition runs over the masked leaves only: the others get ``g_s`` on a
    probing step and ``g`` on a skipped one.

    Args:
      alpha: the weight of the reused ``g_v`` (paper: 0.7).
      layerwise: decompose per leaf instead of globally.

    Returns:
      A :class:`sam_optax.Combine` whose state is a :class:`LookSAMState`.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.looksam_reuse(alpha=1.0)
      >>> g = jnp.array([1.0, 0.0])
      >>> ctx = Context(g, 0, 0.1, 0.0, None, {})
      >>> out, state = piece.combine(g, jnp.array([2.0, 3.0]), piece.init(g), ctx)
      >>> state.g_v.tolist()  # the part of g_s orthogonal to g
      [0.0, 3.0]
      >>> out, _ = piece.fallback(jnp.array([0.0, 2.0]), state, ctx)
      >>> out.tolist()  # g + ‖g‖ g_v / ‖g_v‖
      [0.0, 4.0]

    References:
      Liu et al., Towards Efficient and Scalable Sharpness-Aware Minimization,
      CVPR 2022, https://arxiv.org/abs/2203.02714
    """
    _validate.non_negative("alpha", alpha)

    def init(params):
        groups = len(jax.tree.leaves(params)) if layerwise else 1
        return LookSAMState(_tree.zeros_like_accum(params), jnp.zeros([groups], jnp.float32))

    def combine(g, g_p, state, ctx):
        g_m, s_m = _tree.apply_mask(g, ctx.mask), _tree.apply_mask(g_p, ctx.mask)
        parts = []
        for g_i, s_i in zip(_groups(g_m, layerwise), _groups(s_m, layerwise), strict=True):
            coef, _ = _tree.projection(s_i, g_i, ctx.eps)
            parts.append(jax.tree.map(lambda s, x, c=coef: s - c * x, s_i, g_i))
        g_v = jax.tree.unflatten(jax.tree.structure(g), parts) if layerwise else parts[0]
        g_v = _tree.cast_like(g_v, state.g_v)
        norms = jnp.stack([_tree.global_norm(v_i) for v_i in _groups(g_v, layerwise)])
        return g_p, LookSAMState(g_v, norms.astype(jnp.float32))

    def fallback(g, state, ctx):
        g_m = _tree.apply_mask(g, ctx.mask)
        scales = [
            alpha * _tree.global_norm(g_i) / (state.g_v_norm[i] + ctx.eps)
            for i, g_i in enumerate(_groups(g_m, layerwise))
        ]
        if not layerwise:
            scales = scales * len(jax.tree.leaves(g))
        leaves, treedef = jax.tree.flatten(g)
        out = [
            x + c * v.astype(x.dtype)
            for x, v, c in zip(leaves, jax.tree.leaves(state.g_v), scales, strict=True)
        ]
        return treedef.unflatten(out), state

    return Combine(init, combine, fallback)


# ----- Random weight perturbation (RWP, m-RWP) -----


def interpolate(lam: float | jax.Array = 0.5) -> Combine:
    r"""RWP's combine: a convex mix of the clean and the probe gradient.

    .. math::

        \mathrm{out} = (1 - \lambda)\, g + \lambda\, g_p

    ``lam = 1`` descends along the probe gradient alone (SAM's combine),
    ``lam = 0`` along ``g`` (the base optimizer, exactly). On a skipped step the
    clean gradient ``g`` is used.

    Args:
      lam: the weight of the probe gradient, in ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> piece = sam_optax.interpolate(0.5)
      >>> out, _ = piece.combine(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
      ...                        piece.init(None), None)
      >>> out.tolist()
      [0.5, 0.5]

    References:
      Li et al., Efficient Generalization Improvement Guided by Random Weight
      Perturbation, arXiv 2022, https://arxiv.org/abs/2211.11489
    """
    _validate.in_range("lam", lam, 0.0, 1.0)

    def combine(g, g_p, state, ctx):
        del ctx
        return jax.tree.map(lambda a, b: (1.0 - lam) * a + lam * b, g, g_p), state

    return Combine(empty_init, combine, _clean_gradient)


# ----- GAM: a combine that takes two further probes (Combine.probes) -----


def gradient_norm_aware(
    rho: float | jax.Array | Callable[[jax.Array], jax.Array] = 0.2,
    alpha: float | jax.Array = 0.1,
    beta: float | jax.Array = 0.1,
    gamma: float | jax.Array = 0.05,
    h_minus: str = "code",
) -> Combine:
    r"""GAM's combine: climb the gradient norm, probe twice more, and decompose.

    With ``g_1 = g_p`` the skeleton's probe at ``w + e`` (``e = ρ' g / (‖g‖ + ε)``,
    ``ρ'`` the skeleton's ``rho``), two further probes through ``ctx.evaluate``:

    .. math::

        h_0 = g_1 - g, \quad
        e_2 = \rho \frac{h_0}{\lVert h_0 \rVert + \epsilon}, \quad
        g_2 = \nabla L(w + e_2), \quad
        g_3 = \nabla L\Big(w + e_2 + \rho' \frac{g_2}{\lVert g_2 \rVert + \epsilon}\Big)

    .. math::

        h_+ = \alpha g_1 + (1 - \alpha) g_3, \quad
        h_- = \begin{cases} g + |1 - \beta|\, g_2 & \text{code} \\
                            \beta g + (1 - \beta) g_2 & \text{paper} \end{cases}, \quad
        \mathrm{out} = h_+ - \gamma \Big(h_- - \frac{\langle h_-, h_+ \rangle}
                       {\lVert h_+ \rVert^2 + \epsilon} h_+\Big)

    ``h_0`` is a finite-difference estimate of the Hessian-vector product that
    raises the gradient norm, so ``w + e_2`` is where the first-order flatness
    is worst. Norms, the dot product and the projection run over the
    perturbed leaves (``ctx.mask``); the others descend along ``h_+``. The
    dot product is the real part for complex leaves and is formed from unit
    vectors (no overflow). On a skipped step the clean gradient ``g`` is used.

    Args:
      rho: the radius of the gradient-norm ascent (the official ``grad_norm_rho``),
        a number or an optax schedule of the step count.
      alpha: the weight of ``g_1`` in ``h_+`` (``grad_beta_1``), in ``[0, 1]``.
      beta: the weight of ``g`` in ``h_-`` (``grad_beta_0``), in ``[0, 1]``.
      gamma: the weight of the part of ``h_-`` orthogonal to ``h_+``
        (``grad_gamma``); ``gamma = 0`` descends along ``h_+``.
      h_minus: ``"code"`` (the official code's ``g + |1 - β| g_2``, with which
        its published defaults were tuned) or ``"paper"`` (Algorithm 2's
        convex combination).

    Returns:
      A :class:`sam_optax.Combine` with ``probes = 2``.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> piece = sam_optax.gradient_norm_aware(rho=0.2, alpha=0.5, beta=0.5, gamma=0.1)
      >>> piece.probes
      2
      >>> grad = jax.grad(lambda w: 0.5 * (w[0] ** 2 + 4 * w[1] ** 2))
      >>> tx = sam_optax.sharpness_aware(sam_optax.normalized_gradient(), piece, rho=0.1)
      >>> w = jnp.ones(2)
      >>> out, _ = tx.update(grad(w), tx.init(w), w, grad_fn=grad)
      >>> [round(x, 4) for x in out.tolist()]
      [1.0161, 4.7916]

    References:
      Zhang et al., Gradient Norm Aware Minimization Seeks First-Order Flatness
      and Improves Generalization, CVPR 2023, https://arxiv.org/abs/2303.03108
    """
    _validate.non_negative("rho", rho)
    _validate.in_range("alpha", alpha, 0.0, 1.0)
    _validate.in_range("beta", beta, 0.0, 1.0)
    _validate.non_negative("gamma", gamma)
    _validate.one_of("h_minus", h_minus, ("code", "paper"))

    ascent = normalized_gradient()  # both climbs are SAM's: radius * v / (‖v‖ + eps)

    def combine(g, g_1, state, ctx):
        rho_t = rho(ctx.count) if callable(rho) else rho
        h_0 = _tree.apply_mask(jax.tree.map(jnp.subtract, g_1, g), ctx.mask)
        e_2, _ = ascent.perturb(h_0, state, ctx._replace(rho=rho_t))
        g_2 = ctx.evaluate(e_2)
        climb, _ = ascent.perturb(_tree.apply_mask(g_2, ctx.mask), state, ctx)
        g_3 = ctx.evaluate(jax.tree.map(jnp.add, e_2, climb))
        h_plus = jax.tree.map(lambda a, b: alpha * a + (1.0 - alpha) * b, g_1, g_3)
        if h_minus == "code":
            h_low = jax.tree.map(lambda a, b: a + jnp.abs(1.0 - beta) * b, g, g_2)
        else:
            h_low = jax.tree.map(lambda a, b: beta * a + (1.0 - beta) * b, g, g_2)
        h_low_m, h_plus_m = _tree.apply_mask(h_low, ctx.mask), _tree.apply_mask(h_plus, ctx.mask)
        coef, _ = _tree.projection(h_low_m, h_plus_m, ctx.eps)
        h_perp = jax.tree.map(lambda a, b: a - coef * b, h_low_m, h_plus_m)
        return jax.tree.map(lambda a, b: a - gamma * b, h_plus, h_perp), state

    return Combine(empty_init, combine, _clean_gradient, probes=2)
