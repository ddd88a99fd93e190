r"""Perturbation pieces: how a sharpness-aware step climbs to ``w + e``.

Each piece receives the gradient ``g`` in float32 (zeros on the leaves that a
mask excludes) and returns ``e``. ``‖·‖`` is the global L2 norm over all leaves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate
from sam_optax.pieces import Perturbation, empty_init

PyTree = Any


def normalized_gradient() -> Perturbation:
    r"""SAM's perturbation: the gradient scaled to length ``rho``.

    .. math::

        e = \rho \, \frac{g}{\lVert g \rVert + \epsilon}

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.normalized_gradient()
      >>> ctx = Context(None, 0, 0.5, 1e-12, None, {})
      >>> e, _ = piece.perturb({"w": jnp.array([3.0, 4.0])}, piece.init(None), ctx)
      >>> e["w"].tolist()
      [0.30000001192092896, 0.4000000059604645]

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """

    def perturb(g, state, ctx):
        scale = ctx.rho / (_tree.global_norm(g) + ctx.eps)
        return jax.tree.map(lambda x: scale * x, g), state

    return Perturbation(empty_init, perturb)


def _is_bias(path: tuple) -> bool:
    return _tree.leaf_name(path) == "bias"


def adaptive_perturbation(eta: float | jax.Array = 0.01) -> Perturbation:
    r"""ASAM's scale-invariant perturbation.

    .. math::

        T = |w| + \eta \text{ on weight-like leaves}, \quad T = 1 \text{ on leaves named
        ``bias``}, \qquad e = \rho \, \frac{T^2 \odot g}{\lVert T \odot g \rVert + \epsilon}

    With ``eta = 0`` and no bias leaves this is davda54/sam's ``adaptive=True``
    (``T = |w|``); a weight that is exactly zero is then never perturbed.

    Args:
      eta: the offset added to ``|w|`` so that zero weights are perturbed.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> params = {"kernel": jnp.array([1.0, 0.0]), "bias": jnp.array([5.0])}
      >>> g = {"kernel": jnp.array([1.0, 1.0]), "bias": jnp.array([0.0])}
      >>> piece = sam_optax.adaptive_perturbation(eta=0.0)
      >>> e, _ = piece.perturb(g, piece.init(params), Context(params, 0, 2.0, 1e-12, None, {}))
      >>> e["kernel"].tolist(), e["bias"].tolist()
      ([2.0, 0.0], [0.0])

    References:
      Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
      Learning of Deep Neural Networks, ICML 2021, https://arxiv.org/abs/2102.11600
    """
    _validate.non_negative("eta", eta)

    def perturb(g, state, ctx):
        paths, treedef = jax.tree_util.tree_flatten_with_path(ctx.params)
        g_leaves = treedef.flatten_up_to(g)
        t = [
            jnp.ones_like(x) if _is_bias(path) else jnp.abs(w.astype(x.dtype)) + eta
            for (path, w), x in zip(paths, g_leaves, strict=True)
        ]
        # T g and T² g overflow float32 once |w| and |g| near 1e19; e does not depend
        # on the scale c of g (eps aside), so it is built from g / c, and T² g as
        # T (T g / ‖T g‖) so that no intermediate exceeds T.
        c = _tree.max_abs(g_leaves)
        c = jnp.where(c > 0, c, jnp.ones_like(c))
        tg = [ti * (x / c) for ti, x in zip(t, g_leaves, strict=True)]
        scale = ctx.rho / (_tree.global_norm(tg) + ctx.eps / c)
        e = [ti * (scale * x) for ti, x in zip(t, tg, strict=True)]
        return treedef.unflatten(e), state

    return Perturbation(empty_init, perturb)


def fisher_perturbation(eta: float | jax.Array = 1.0) -> Perturbation:
    r"""Fisher SAM's perturbation with the diagonal Fisher proxy ``F = 1 + eta g²``.

    Maximises :math:`e^\top g` subject to :math:`e^\top F e \le \rho^2`:

    .. math::

        F = 1 + \eta\, g^2, \qquad
        e = \rho \, \frac{g / F}{\sqrt{\sum g^2 / F + \epsilon}}

    ``eta = 0`` gives SAM's direction. ``F`` is not scale-invariant: unscale the
    gradient (loss scaling, accumulation) before it reaches the transformation.

    Args:
      eta: the weight of the squared gradient in the Fisher proxy.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.fisher_perturbation(eta=1.0)
      >>> e, _ = piece.perturb(jnp.array([1.0]), piece.init(None),
      ...                      Context(None, 0, 0.1, 0.0, None, {}))
      >>> round(float(e[0]), 6)  # (1/2) / sqrt(1/2) * 0.1
      0.070711

    References:
      Kim et al., Fisher SAM: Information Geometry and Sharpness Aware
      Minimisation, ICML 2022, https://arxiv.org/abs/2206.04920
    """
    _validate.non_negative("eta", eta)

    def perturb(g, state, ctx):
        # sqrt(F) as hypot(1, sqrt(eta) g): F itself overflows float32 once |g| nears 1e19.
        root_f = jax.tree.map(lambda x: jnp.hypot(1.0, jnp.sqrt(eta) * x), g)
        r = jax.tree.map(jnp.divide, g, root_f)  # g / sqrt(F)
        norm = _tree.global_norm(r)
        scale = ctx.rho / jnp.hypot(norm, jnp.sqrt(jnp.asarray(ctx.eps, norm.dtype)))
        return jax.tree.map(lambda x, s: scale * (x / s), r, root_f), state

    return Perturbation(empty_init, perturb)


class VaSSOState(NamedTuple):
    """State of :func:`vasso_perturbation`.

    Attributes:
      d: the exponential moving average of the gradient (float32 or wider,
        params-shaped; zeros on the leaves that a mask excludes).
      count: how many times ``d`` was updated (int32). The first update sets
        ``d = g``; counting here, not with the skeleton's step count, keeps that
        rule right when a policy or a ``rho`` schedule skips the first steps.
    """

    d: PyTree
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def vasso_perturbation(theta: float | jax.Array = 0.9) -> Perturbation:
    r"""VaSSO's perturbation: the normalised EMA of the gradient (variance suppression).

    .. math::

        d_0 = g_0, \qquad d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \qquad
        e = \rho \, \frac{d_t}{\lVert d_t \rVert + \epsilon}

    ``theta = 1`` gives SAM's perturbation; the first update equals SAM. ``d``
    is only updated on the steps that probe.

    Args:
      theta: the weight of the new gradient in the EMA, in ``(0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.vasso_perturbation(theta=0.5)
      >>> state = piece.init(jnp.zeros(2))
      >>> ctx = Context(None, 0, 1.0, 0.0, None, {})
      >>> e, state = piece.perturb(jnp.array([3.0, 0.0]), state, ctx)  # d = g
      >>> e, state = piece.perturb(jnp.array([0.0, 4.0]), state, ctx)  # d = (1.5, 2)
      >>> e.tolist(), state.d.tolist()
      ([0.6000000238418579, 0.800000011920929], [1.5, 2.0])

    References:
      Li & Giannakis, Enhancing Sharpness-Aware Optimization Through Variance
      Suppression, NeurIPS 2023, https://arxiv.org/abs/2309.15639
    """
    _validate.in_range("theta", theta, 0.0, 1.0, low_open=True)

    def init(params):
        return VaSSOState(d=_tree.zeros_like_accum(params), count=jnp.zeros([], jnp.int32))

    def perturb(g, state, ctx):
        first = state.count == 0
        d = jax.tree.map(
            lambda old, x: jnp.where(first, x, (1.0 - theta) * old + theta * x), state.d, g
        )
        scale = ctx.rho / (_tree.global_norm(d) + ctx.eps)
        e = jax.tree.map(lambda x: scale * x, d)
        return e, VaSSOState(d=d, count=optax.safe_increment(state.count))

    return Perturbation(init, perturb)


class FriendlyState(NamedTuple):
    """State of :func:`friendly_perturbation`.

    Attributes:
      m: the exponential moving average of the gradient, the estimate of the
        full-batch gradient (float32 or wider, params-shaped).
      count: how many times ``m`` was updated (int32); the first update sets
        ``m = g`` whether or not the skeleton probed on its first step.
    """

    m: PyTree
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def friendly_perturbation(
    sigma: float | jax.Array = 1.0, lmbda: float | jax.Array = 0.9
) -> Perturbation:
    r"""Friendly SAM's perturbation: the gradient minus its EMA (the batch noise).

    .. math::

        \text{first update: } m = g,\ d = g; \qquad
        \text{afterwards: } d = g - \sigma\, m_{\text{old}},\ \
        m = \lambda\, m_{\text{old}} + (1 - \lambda)\, g; \qquad
        e = \rho \, \frac{d}{\lVert d \rVert + \epsilon}

    ``sigma = 0`` gives SAM's perturbation. ``m`` is only updated on the steps
    that probe.

    Args:
      sigma: how much of the EMA (the full-gradient estimate) is removed.
      lmbda: the EMA decay of ``m``, in ``[0, 1)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.friendly_perturbation(sigma=1.0, lmbda=0.5)
      >>> state = piece.init(jnp.zeros(2))
      >>> ctx = Context(None, 0, 1.0, 0.0, None, {})
      >>> _, state = piece.perturb(jnp.array([1.0, 1.0]), state, ctx)  # m = g
      >>> e, state = piece.perturb(jnp.array([1.0, 2.0]), state, ctx)  # d = (0, 1)
      >>> e.tolist(), state.m.tolist()
      ([0.0, 1.0], [1.0, 1.5])

    References:
      Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024,
      https://arxiv.org/abs/2403.12350
    """
    _validate.non_negative("sigma", sigma)
    _validate.in_range("lmbda", lmbda, 0.0, 1.0, high_open=True)

    def init(params):
        return FriendlyState(m=_tree.zeros_like_accum(params), count=jnp.zeros([], jnp.int32))

    def perturb(g, state, ctx):
        first = state.count == 0
        d = jax.tree.map(lambda m, x: jnp.where(first, x, x - sigma * m), state.m, g)
        m = jax.tree.map(
            lambda m, x: jnp.where(first, x, lmbda * m + (1.0 - lmbda) * x), state.m, g
        )
        scale = ctx.rho / (_tree.global_norm(d) + ctx.eps)
        e = jax.tree.map(lambda x: scale * x, d)
        return e, FriendlyState(m=m, count=optax.safe_increment(state.count))

    return Perturbation(init, perturb)


class StochasticPerturbationState(NamedTuple):
    """State of :func:`stochastic_weight_perturbation`: the replicated PRNG key (``uint32[2]``)."""

    key: jax.Array


def stochastic_weight_perturbation(beta: float | jax.Array = 0.6, *, seed: int = 0) -> Perturbation:
    r"""ESAM's stochastic weight perturbation: SAM's ascent on a random subset of leaves.

    Each step draws one bit per leaf, :math:`m_j \sim \mathrm{Bernoulli}(\beta)`
    (the official code keeps or drops whole parameter tensors), and

    .. math::

        e = \frac{\rho}{\beta} \, \frac{m \odot g}{\lVert m \odot g \rVert + \epsilon}

    with the norm of the masked gradient (official code). The key lives in the
    state; step ``t`` draws its mask from ``fold_in(key, t)``, so a state
    initialised from the same ``seed`` draws the same mask on every device. ``beta = 1`` is SAM's
    perturbation. In JAX this saves no compute: it changes the perturbation only.

    Args:
      beta: the probability that a leaf is perturbed, in ``(0, 1]``.
      seed: the seed of the key (replicated: use the same seed on every device).

    Returns:
      A :class:`sam_optax.Perturbation` whose state is a
      :class:`StochasticPerturbationState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.stochastic_weight_perturbation(beta=0.5)
      >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
      >>> e, state = piece.perturb(g, piece.init(g), Context(None, 0, 0.1, 1e-12, None, {}))
      >>> # the kept leaves are rescaled so that ‖e‖ = rho / beta
      >>> round(float(jnp.sqrt(jnp.sum(e["a"] ** 2) + jnp.sum(e["b"] ** 2))), 4)
      0.2

    References:
      Du et al., Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks, ICLR 2022, https://arxiv.org/abs/2110.03141
    """
    _validate.in_range("beta", beta, 0.0, 1.0, low_open=True)
    if callable(beta):
        raise ValueError(f"`beta` must be a number in (0, 1], got the callable {beta!r}.")
    _validate.integer("seed", seed, None, static=True)

    def init(params):
        del params
        return StochasticPerturbationState(key=jax.random.PRNGKey(seed))

    def perturb(g, state, ctx):
        leaves, treedef = jax.tree.flatten(g)
        bits = jax.random.bernoulli(jax.random.fold_in(state.key, ctx.count), beta, (len(leaves),))
        masked = [jnp.where(bits[j], x, jnp.zeros_like(x)) for j, x in enumerate(leaves)]
        scale = ctx.rho / beta / (_tree.global_norm(masked) + ctx.eps)
        e = [scale * x for x in masked]
        return treedef.unflatten(e), state

    return Perturbation(init, perturb)
