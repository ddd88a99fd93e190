r"""Gradient centralisation (GC) and the two GCSAM pieces built on it.

GC (Yong et al., ECCV 2020) removes from each weight tensor's gradient its mean over
every axis except the output axis. In Flax the output axis of a ``Dense`` or ``Conv``
kernel is the last one (``[in, out]``, ``[kh, kw, in, out]``), so by default the mean
is taken over all the other axes, for the leaves named ``kernel`` only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _tree, _validate
from sam_optax.pieces import Combine, Perturbation, empty_init

PyTree = Any
Axes = Callable[[tuple, Any], "tuple[int, ...] | None"]

_NORMS = ("centralized", "raw")


def kernel_axes(path: tuple, leaf: Any) -> tuple[int, ...] | None:
    """GCSAM's default rule: every axis but the last, for a leaf named ``kernel``.

    A Flax ``Dense`` kernel ``[in, out]`` or ``Conv`` kernel ``[kh, kw, in, out]`` is
    centralised over all its axes but the output one; every other leaf (biases,
    normalisation scales, embedding tables ``[vocab, features]``) is left alone.

    Args:
      path: the leaf's key path (``jax.tree_util`` path entries).
      leaf: the leaf.

    Returns:
      The axes to average over, or ``None`` for a leaf that is not centralised.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
      >>> jax.tree_util.tree_map_with_path(sam_optax.kernel_axes, params)
      {'dense': {'bias': None, 'kernel': (0,)}}

    References:
      Yong et al., Gradient Centralization: A New Optimization Technique for Deep
      Neural Networks, ECCV 2020, https://arxiv.org/abs/2004.01461
    """
    if _tree.leaf_name(path) == "kernel" and jnp.ndim(leaf) >= 2:
        return tuple(range(jnp.ndim(leaf) - 1))
    return None


def _check_axes(found: Any, path: tuple, leaf: Any) -> tuple[int, ...] | None:
    if found is None:
        return None
    ndim = jnp.ndim(leaf)
    ok = isinstance(found, tuple) and all(
        isinstance(a, int) and not isinstance(a, bool) and -ndim <= a < ndim for a in found
    )
    if not ok or not found:
        raise ValueError(
            f"`axes` must return None or a non-empty tuple of axes of the leaf, got {found!r} "
            f"for the leaf {jax.tree_util.keystr(path)} of shape {jnp.shape(leaf)}."
        )
    return found


def centralize(tree: PyTree, axes: Axes | None = None) -> PyTree:
    r"""Gradient centralisation: each selected leaf minus its mean over its reduced axes.

    .. math::

        \mathrm{GC}(g)_{\dots, j} = g_{\dots, j} - \operatorname{mean}_{\text{axes}} g

    Args:
      tree: a pytree of arrays (a gradient).
      axes: ``(path, leaf) -> axes or None``, the axes to average over for each leaf
        (``None``: the leaf is returned unchanged). Default :func:`kernel_axes`.

    Returns:
      The centralised pytree, leaf dtypes unchanged.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> g = {"kernel": jnp.array([[1.0, 2.0], [3.0, 6.0]]), "bias": jnp.array([1.0, 2.0])}
      >>> out = sam_optax.centralize(g)
      >>> out["kernel"].tolist(), out["bias"].tolist()
      ([[-1.0, -2.0], [1.0, 2.0]], [1.0, 2.0])

    References:
      Yong et al., Gradient Centralization: A New Optimization Technique for Deep
      Neural Networks, ECCV 2020, https://arxiv.org/abs/2004.01461
    """
    _check_rule(axes)
    rule = kernel_axes if axes is None else axes

    def one(path, x):
        if not hasattr(x, "shape"):
            raise ValueError(
                f"`tree` leaves must be arrays, got {x!r} at {jax.tree_util.keystr(path)}."
            )
        found = _check_axes(rule(path, x), path, x)
        return x if found is None else x - jnp.mean(x, axis=found, keepdims=True)

    return jax.tree_util.tree_map_with_path(one, tree)


def _check_rule(axes: Any) -> None:
    if axes is not None:
        _validate.function("axes", axes)


def centralized_gradient(axes: Axes | None = None, *, norm: str = "centralized") -> Perturbation:
    r"""GCSAM's perturbation: the centralised gradient scaled to length ``rho``.

    .. math::

        e = \rho \, \frac{\mathrm{GC}(g)}{\lVert \mathrm{GC}(g) \rVert + \epsilon}
        \ \ (\texttt{norm="centralized"}), \qquad
        e = \rho \, \frac{\mathrm{GC}(g)}{\lVert g \rVert + \epsilon}
        \ \ (\texttt{norm="raw"})

    ``norm="raw"`` divides by the norm taken before centralising (pytorch_optimizer's
    ``SAM(use_gc=True)``), so ``‖e‖ ≤ rho``. A model with no centralised leaf gets
    SAM's perturbation in both forms.

    Args:
      axes: ``(path, leaf) -> axes or None`` (default :func:`kernel_axes`).
      norm: ``"centralized"`` or ``"raw"``: which norm normalises ``e``.

    Returns:
      A stateless :class:`sam_optax.Perturbation`.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> from sam_optax.pieces import Context
      >>> g = {"kernel": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
      >>> piece = sam_optax.centralized_gradient()
      >>> e, _ = piece.perturb(g, piece.init(g), Context(None, 0, 1.0, 0.0, None, {}))
      >>> [round(float(x) * 10**0.5, 6) for x in e["kernel"].ravel()]  # GC(g) / sqrt(10)
      [-1.0, -2.0, 1.0, 2.0]

    References:
      Hassan et al., GCSAM: Gradient Centralized Sharpness Aware Minimization,
      IEEE Access 2025, https://arxiv.org/abs/2501.11584
    """
    _check_rule(axes)
    if norm not in _NORMS:
        raise ValueError(f"`norm` must be one of {_NORMS}, got {norm!r}.")

    def perturb(g, state, ctx):
        c = centralize(g, axes)
        scale = ctx.rho / (_tree.global_norm(c if norm == "centralized" else g) + ctx.eps)
        return jax.tree.map(lambda x: scale * x, c), state

    return Perturbation(empty_init, perturb)


def centralized_probe(axes: Axes | None = None) -> Combine:
    r"""GCSAM's combine: descend along the centralised probe gradient, ``out = GC(g_p)``.

    On a step that a policy skips the clean gradient ``g`` is used, uncentralised,
    so that ``rho = 0`` (or a policy that never probes) is the base optimizer exactly.

    Args:
      axes: ``(path, leaf) -> axes or None`` (default :func:`kernel_axes`).

    Returns:
      A stateless :class:`sam_optax.Combine`.

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> piece = sam_optax.centralized_probe()
      >>> g_p = {"kernel": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
      >>> out, _ = piece.combine(g_p, g_p, piece.init(None), None)
      >>> out["kernel"].tolist()
      [[-1.0, -2.0], [1.0, 2.0]]

    References:
      Hassan et al., GCSAM: Gradient Centralized Sharpness Aware Minimization,
      IEEE Access 2025, https://arxiv.org/abs/2501.11584
    """
    _check_rule(axes)

    def combine(g, g_p, state, ctx):
        del g, ctx
        return centralize(g_p, axes), state

    def fallback(g, state, ctx):
        del ctx
        return g, state

    return Combine(empty_init, combine, fallback)
