r"""Perturbation pieces: how a sharpness-aware step climbs to ``w + e``.

Each piece receives the gradient ``g`` in float32 (zeros on the leaves that a
mask excludes) and returns ``e``. ``‖·‖`` is the global L2 norm over all leaves.
"""

from __future__ import annotations

from collections.abc import Callable
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


# The names under which Flax and Haiku store the parameters that PyTorch calls ``weight``
# (Dense/Conv kernels, embedding tables, normalisation scales) and ``bias``.
_WEIGHT_NAMES = frozenset({"kernel", "embedding", "scale", "w", "embeddings"})
_BIAS_NAMES = frozenset({"bias", "b", "offset"})


def _is_weight(path: tuple, leaf: Any) -> bool:
    """ASAM's default rule: a weight tensor by its Flax or Haiku name, else by ``ndim >= 2``."""
    name = _tree.leaf_name(path)
    if name in _WEIGHT_NAMES:
        return True
    if name in _BIAS_NAMES:
        return False
    return jnp.ndim(leaf) >= 2


def adaptive_leaves(params: PyTree) -> PyTree:
    r"""ASAM's default choice of the leaves that get ``T = |w| + eta``: the weight tensors.

    The official ASAM code applies :math:`T_w = |w| + \eta` to the parameters whose
    PyTorch name contains ``weight`` (linear and convolution weights, embedding
    tables, normalisation scales) and :math:`T = 1` to every other one (biases,
    and custom parameters such as positional embeddings). In JAX the same tensors
    are recognised by the last name on their path:

    - ``True`` for ``kernel``, ``embedding``, ``scale`` (Flax: ``Dense``, ``Conv``,
      ``Embed``, ``BatchNorm``/``LayerNorm``) and ``w``, ``embeddings``, ``scale``
      (Haiku);
    - ``False`` for ``bias`` (Flax) and ``b``, ``offset`` (Haiku);
    - for any other name, or a leaf with no name: ``True`` when the leaf has at
      least two dimensions (a matrix or a convolution kernel), ``False`` otherwise.

    Args:
      params: the parameters (any pytree; names are read from dict keys and
        attribute names, skipping Flax NNX's ``value`` wrapper).

    Returns:
      A pytree of Python booleans with the structure of ``params``, as
      :func:`adaptive_perturbation`'s ``adaptive_mask`` takes it.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
      ...           "norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
      ...           "pos_embed": jnp.ones((4, 2)), "temperature": jnp.ones(())}
      >>> sam_optax.adaptive_leaves(params)  # doctest: +NORMALIZE_WHITESPACE
      {'dense': {'bias': False, 'kernel': True}, 'norm': {'bias': False, 'scale': True},
       'pos_embed': True, 'temperature': False}

    References:
      Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
      Learning of Deep Neural Networks, ICML 2021, https://arxiv.org/abs/2102.11600
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not (hasattr(leaf, "shape") or _tree.is_python_number(leaf)):
            raise ValueError(
                f"`params` leaves must be arrays, got {leaf!r} at {jax.tree_util.keystr(path)}."
            )
    return jax.tree_util.tree_map_with_path(_is_weight, params)


def adaptive_perturbation(
    eta: float | jax.Array = 0.01,
    *,
    adaptive_mask: PyTree | Callable[[PyTree], PyTree] | bool | None = None,
) -> Perturbation:
    r"""ASAM's scale-invariant perturbation.

    .. math::

        T = |w| + \eta \text{ on the leaves of } \texttt{adaptive\_mask}, \quad
        T = 1 \text{ elsewhere}, \qquad
        e = \rho \, \frac{T^2 \odot g}{\lVert T \odot g \rVert + \epsilon}

    By default ``T = |w| + eta`` applies to the weight tensors and ``T = 1`` to the
    biases and other vectors, as in the official code (see :func:`adaptive_leaves`
    for the rule). ``adaptive_mask=True`` applies it to every leaf; with ``eta = 0``
    that is davda54/sam's ``adaptive=True`` exactly (``T = |w|`` everywhere), and a
    weight that is exactly zero is then never perturbed.

    Args:
      eta: the offset added to ``|w|`` so that zero weights are perturbed.
      adaptive_mask: the leaves that get ``T = |w| + eta``: a pytree of booleans
        with the structure of the params, a function of the params returning
        one, ``True`` (every leaf) or ``None`` (:func:`adaptive_leaves`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> from sam_optax.pieces import Context
      >>> params = {"kernel": jnp.array([1.0, 0.0]), "bias": jnp.array([5.0])}
      >>> g = {"kernel": jnp.array([1.0, 1.0]), "bias": jnp.array([0.0])}
      >>> piece = sam_optax.adaptive_perturbation(eta=0.0)
      >>> e, _ = piece.perturb(g, piece.init(params), Context(params, 0, 2.0, 1e-12, None, {}))
      >>> [round(float(x), 6) for x in e["kernel"]], e["bias"].tolist()
      ([2.0, 0.0], [0.0])

    References:
      Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
      Learning of Deep Neural Networks, ICML 2021, https://arxiv.org/abs/2102.11600
    """
    _validate.non_negative("eta", eta)
    if adaptive_mask is not True:
        _validate.mask(adaptive_mask, "adaptive_mask")

    def resolve(params):
        if adaptive_mask is True:
            return [True] * len(jax.tree.leaves(params))
        rule = adaptive_leaves if adaptive_mask is None else adaptive_mask
        return _tree.resolve_mask(rule, params, "adaptive_mask")

    def init(params):
        resolve(params)  # an adaptive_mask that does not fit fails here, not later
        return optax.EmptyState()

    def perturb(g, state, ctx):
        g_leaves, treedef = jax.tree.flatten(g)
        w_leaves = treedef.flatten_up_to(ctx.params)
        t = [
            jnp.abs(w).astype(jnp.real(x).dtype) + eta if adaptive else None
            for w, x, adaptive in zip(w_leaves, g_leaves, resolve(ctx.params), strict=True)
        ]
        # T g and T² g overflow float32 once |w| and |g| near 1e19; e does not depend on
        # the scale of g (eps aside), so it is built from u = g / ‖g‖, and T² g as
        # T (T u / ‖T u‖), so that no intermediate exceeds T.
        norm_g = _tree.global_norm(g_leaves)
        u = _tree.scale_tree(g_leaves, _tree.inverse(norm_g))
        tu = [x if ti is None else ti * x for ti, x in zip(t, u, strict=True)]
        safe = jnp.where(norm_g > 0, norm_g, 1.0)
        scale = ctx.rho / (_tree.global_norm(tu) + ctx.eps / safe)
        e = [scale * x if ti is None else ti * (scale * x) for ti, x in zip(t, tu, strict=True)]
        return treedef.unflatten(e), state

    return Perturbation(init, perturb)


def fisher_perturbation(eta: float | jax.Array = 1.0) -> Perturbation:
    r"""Fisher SAM's perturbation with the diagonal Fisher proxy ``F = 1 + eta |g|²``.

    Maximises :math:`e^\top g` subject to :math:`e^\top F e \le \rho^2`:

    .. math::

        F = 1 + \eta\, |g|^2, \qquad
        e = \rho \, \frac{g / F}{\sqrt{\sum |g|^2 / F + \epsilon}}

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
        # |g| (not g): F = 1 + eta |g|² is real for complex leaves too.
        root_f = jax.tree.map(lambda x: jnp.hypot(1.0, jnp.sqrt(eta) * jnp.abs(x)), g)
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
    # An integer array is accepted too (optax.inject_hyperparams turns the default into one).
    _validate.integer("seed", seed, None, static=not isinstance(seed, jax.Array))

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


# ----- Random weight perturbation (RWP, m-RWP) -----


class FilterwiseGaussianState(NamedTuple):
    """State of :func:`filterwise_gaussian`: the replicated PRNG key (``uint32[2]``)."""

    key: jax.Array


def _filter_scale(w: jax.Array) -> jax.Array:
    """``‖w_f‖`` per output filter (Flax: last axis) of a kernel; ``‖w‖ + 1e-16`` for a vector."""
    if jnp.ndim(w) < 2:
        return _tree.global_norm(w) + 1e-16
    a = jnp.abs(w).astype(_tree.accum_dtype(jnp.real(w).dtype))
    # Scaled by the filter's largest entry, so that weights near 1e19 do not overflow.
    axes = tuple(range(a.ndim - 1))
    top = jnp.max(a, axis=axes, keepdims=True)
    safe = jnp.where(top > 0, top, 1.0)
    return top * jnp.sqrt(jnp.sum(jnp.square(a / safe), axis=axes, keepdims=True))


def filterwise_gaussian(*, seed: int = 0) -> Perturbation:
    r"""Random weight perturbation: Gaussian noise scaled per output filter, independent of ``g``.

    For a leaf with two or more dimensions, each output filter ``f`` (the LAST
    axis, as Flax stores a ``kernel``: ``[..., in, out]``; PyTorch's dim 0) gets

    .. math::

        e_f \sim \mathcal{N}\bigl(0, (\sigma \lVert w_f \rVert)^2\bigr), \qquad
        \sigma = \rho

    and a leaf with fewer dimensions (bias, normalisation scale) gets
    :math:`e \sim \mathcal{N}(0, (\sigma (\lVert w \rVert + 10^{-16}))^2)`, the norm
    of the whole vector, as in the official code. A filter whose weights are all
    zero gets no noise. The skeleton's ``rho`` is ``σ``, so ``rho = 0`` is the
    base optimizer exactly. ``g`` is ignored: the noise needs no gradient, so the
    two gradients of RWP do not depend on each other.

    The key lives in the state; step ``t`` draws from ``fold_in(key, t)``, one
    subkey per leaf, so a state initialised from the same ``seed`` draws the same
    noise on every device.

    Args:
      seed: the seed of the key (replicated: use the same seed on every device).

    Returns:
      A :class:`sam_optax.Perturbation` whose state is a
      :class:`FilterwiseGaussianState`.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> from sam_optax.pieces import Context
      >>> piece = sam_optax.filterwise_gaussian()
      >>> w = {"kernel": jnp.array([[3.0, 0.0], [0.0, 4.0]])}
      >>> ctx = Context(w, 0, 0.1, 1e-12, None, {})
      >>> e, _ = piece.perturb(w, piece.init(w), ctx)
      >>> z = e["kernel"] / jnp.array([0.3, 0.4])  # column j has std 0.1 · ‖w[:, j]‖
      >>> z.shape
      (2, 2)

    References:
      Li et al., Efficient Generalization Improvement Guided by Random Weight
      Perturbation, arXiv 2022, https://arxiv.org/abs/2211.11489
    """
    _validate.integer("seed", seed, None, static=not isinstance(seed, jax.Array))

    def init(params):
        del params
        return FilterwiseGaussianState(key=jax.random.PRNGKey(seed))

    def perturb(g, state, ctx):
        leaves, treedef = jax.tree.flatten(g)
        w_leaves = treedef.flatten_up_to(ctx.params)
        keys = jax.random.split(jax.random.fold_in(state.key, ctx.count), max(len(leaves), 1))
        e = [
            ctx.rho * _filter_scale(w).astype(x.dtype) * jax.random.normal(k, x.shape, x.dtype)
            for x, w, k in zip(leaves, w_leaves, keys, strict=False)
        ]
        return treedef.unflatten(e), state

    return Perturbation(init, perturb)
