"""Sharpness diagnostics: Hessian eigenvalue and trace, SAM's ascent, loss landscapes.

Each function takes a scalar ``loss_fn(params) -> loss`` (close over the batch)
and the params pytree, and works under ``jax.jit``. Hessian-vector products are
forward-over-reverse (``jax.jvp`` of ``jax.grad``): one costs about two gradients
and no Hessian is ever formed. Only JAX is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _tree, _validate

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]


def _hvp(loss_fn: LossFn, params: PyTree, v: PyTree) -> PyTree:
    """``H(w) v``, forward-over-reverse."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _random_like(key: jax.Array, params: PyTree, sampler: Callable[..., jax.Array]) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [sampler(k, jnp.shape(x), jnp.asarray(x).dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def _scale(tree: PyTree, factor: jax.Array) -> PyTree:
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def hessian_top_eigenvalue(
    loss_fn: LossFn, params: PyTree, *, key: jax.Array, num_iters: int = 20
) -> jax.Array:
    r"""The largest-magnitude eigenvalue of the Hessian of ``loss_fn`` at ``params``.

    Power iteration on Hessian-vector products, from a random normal ``v_0``:

    .. math::

        \lambda_k = v_k^\top H v_k, \qquad v_{k+1} = \frac{H v_k}{\lVert H v_k \rVert}

    and the estimate is ``λ`` of the last iteration (a Rayleigh quotient, so its
    error shrinks like the square of the eigenvector's). It converges to the
    eigenvalue of largest magnitude at the rate ``|λ_2 / λ_1|``; near a minimum
    that is the top (positive) eigenvalue, the usual sharpness measure.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, twice differentiable.
      params: the pytree at which the Hessian is taken.
      key: a PRNG key for ``v_0``.
      num_iters: the number of Hessian-vector products (a positive integer).

    Returns:
      The eigenvalue estimate, a float32 (or wider) scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import sharpness
      >>> loss = lambda p: 0.5 * (3.0 * p["a"] ** 2 + p["b"] ** 2)  # H = diag(3, 1)
      >>> lam = sharpness.hessian_top_eigenvalue(
      ...     loss, {"a": 1.0, "b": 1.0}, key=jax.random.key(0), num_iters=50)
      >>> round(float(lam), 4)
      3.0

    References:
      Yao et al., PyHessian: Neural Networks Through the Lens of the Hessian,
      IEEE BigData 2020, https://arxiv.org/abs/1912.07145
    """
    _validate.function("loss_fn", loss_fn)
    _validate.key("key", key)
    _validate.integer("num_iters", num_iters, 1, static=True)
    v = _random_like(key, params, jax.random.normal)
    v = _scale(v, 1.0 / (_tree.global_norm(v) + 1e-12))

    def body(_, carry):
        v, _lam = carry
        hv = _hvp(loss_fn, params, v)
        lam = _tree.real_vdot(v, hv)
        return _scale(hv, 1.0 / (_tree.global_norm(hv) + 1e-12)), lam

    zero = jnp.zeros([], jax.eval_shape(_tree.real_vdot, v, v).dtype)  # float64 under x64
    _, lam = jax.lax.fori_loop(0, num_iters, body, (v, zero))
    return lam


def hessian_trace(
    loss_fn: LossFn, params: PyTree, *, key: jax.Array, num_samples: int = 100
) -> jax.Array:
    r"""Hutchinson's estimate of the trace of the Hessian of ``loss_fn`` at ``params``.

    .. math::

        \operatorname{tr} H \approx \frac{1}{S} \sum_{s=1}^{S} z_s^\top H z_s,
        \qquad z_s \in \{-1, +1\}^n \text{ (Rademacher)}

    Unbiased; its variance is ``2 (‖H‖_F² − Σ_i H_ii²) / S``, so it is exact for a
    diagonal Hessian.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, twice differentiable.
      params: the pytree at which the Hessian is taken.
      key: a PRNG key for the probe vectors.
      num_samples: the number of probe vectors ``S`` (a positive integer).

    Returns:
      The trace estimate, a float32 (or wider) scalar.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import sharpness
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([3.0, 1.0, 0.5]) * p ** 2)
      >>> float(sharpness.hessian_trace(loss, jnp.ones(3), key=jax.random.key(0),
      ...                                num_samples=4))
      4.5

    References:
      Hutchinson, A Stochastic Estimator of the Trace of the Influence Matrix for
      Laplacian Smoothing Splines, Communications in Statistics 1989,
      https://doi.org/10.1080/03610918908812806
    """
    _validate.function("loss_fn", loss_fn)
    _validate.key("key", key)
    _validate.integer("num_samples", num_samples, 1, static=True)

    def body(i, total):
        z = _random_like(
            jax.random.fold_in(key, i),
            params,
            lambda k, shape, dtype: jax.random.rademacher(k, shape, dtype),
        )
        return total + _tree.real_vdot(z, _hvp(loss_fn, params, z))

    zero = jnp.zeros([], jax.eval_shape(_tree.real_vdot, params, params).dtype)
    return jax.lax.fori_loop(0, num_samples, body, zero) / num_samples


def ascent_sharpness(
    loss_fn: LossFn, params: PyTree, rho: float | jax.Array, *, eps: float = 1e-12
) -> jax.Array:
    r"""SAM's first-order sharpness: the loss gained by one normalised ascent step.

    .. math::

        g = \nabla L(w), \qquad
        S_\rho(w) = L\!\left(w + \rho \frac{g}{\lVert g \rVert + \epsilon}\right) - L(w)

    This is the inner maximum of SAM's objective under its first-order
    approximation; for small ``rho`` it is about ``rho‖g‖ + ½rho² ĝᵀHĝ``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the pytree at which the sharpness is measured.
      rho: the ascent radius (non-negative).
      eps: added to ``‖g‖``, so a zero gradient gives a sharpness of zero.

    Returns:
      The sharpness, a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax import sharpness
      >>> loss = lambda p: jnp.sum(p ** 2)  # g = 2w, H = 2I
      >>> round(float(sharpness.ascent_sharpness(loss, jnp.array([3.0, 4.0]), 0.5)), 4)
      5.25

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    _validate.function("loss_fn", loss_fn)
    _validate.non_negative("rho", rho)
    loss, g = jax.value_and_grad(loss_fn)(params)
    e = _scale(g, rho / (_tree.global_norm(g) + eps))
    return loss_fn(jax.tree.map(lambda w, d: w + d, params, e)) - loss


def filter_normalized_direction(
    key: jax.Array, params: PyTree, *, filter_axis: int = -1, ignore_1d: bool = True
) -> PyTree:
    r"""A random direction with the norm of each filter of ``params`` (Li et al., 2018).

    For each leaf with two or more axes, each filter (a slice along
    ``filter_axis``; Flax kernels keep their output features last) of a
    Gaussian ``d`` is rescaled to the norm of the same filter of ``w``:

    .. math::

        d_{i,j} \leftarrow \frac{d_{i,j}}{\lVert d_{i,j} \rVert} \lVert w_{i,j} \rVert

    Leaves with fewer than two axes (biases, normalisation scales) get a zero
    direction with ``ignore_1d=True`` (the paper's choice) and a copy of ``w``
    otherwise (as in the authors' code without ``ignore``).

    Args:
      key: a PRNG key.
      params: the parameter pytree.
      filter_axis: the axis that indexes filters in leaves with ``ndim >= 2``.
      ignore_1d: zero direction (``True``) or ``w`` itself (``False``) on leaves
        with fewer than two axes.

    Returns:
      A pytree with the structure, shapes and dtypes of ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import sharpness
      >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
      >>> d = sharpness.filter_normalized_direction(jax.random.key(0), params)
      >>> [round(float(n), 4) for n in jnp.linalg.norm(d["kernel"], axis=0)], d["bias"]
      ([1.7321, 1.7321], Array([0., 0.], dtype=float32))

    References:
      Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018,
      https://arxiv.org/abs/1712.09913
    """
    _validate.key("key", key)
    d = _random_like(key, params, jax.random.normal)

    def normalize(d, w):
        w = jnp.asarray(w)
        if w.ndim < 2:
            return jnp.zeros_like(d) if ignore_1d else w.astype(d.dtype)
        axes = tuple(a for a in range(w.ndim) if a != filter_axis % w.ndim)
        w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes, keepdims=True))
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=axes, keepdims=True))
        return (d * (w_norm / (d_norm + 1e-10))).astype(d.dtype)

    return jax.tree.map(normalize, d, params)


def loss_landscape(
    loss_fn: LossFn,
    params: PyTree,
    *,
    key: jax.Array,
    directions: int = 1,
    span: float = 1.0,
    num_points: int = 21,
    filter_axis: int = -1,
    ignore_1d: bool = True,
) -> dict[str, Any]:
    r"""The loss along one or two filter-normalised random directions (Li et al., 2018).

    .. math::

        f(\alpha) = L(w + \alpha d_1), \qquad
        f(\alpha, \beta) = L(w + \alpha d_1 + \beta d_2)

    on ``num_points`` evenly spaced values of ``α`` (and ``β``) in
    ``[-span, span]``, with ``d_1, d_2`` from :func:`filter_normalized_direction`.
    The losses are evaluated with ``jax.lax.map``, one point at a time.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the centre ``w``.
      key: a PRNG key for the directions.
      directions: 1 (a curve) or 2 (a surface).
      span: the grid covers ``[-span, span]`` in units of the direction.
      num_points: grid points per direction (at least 2).
      filter_axis: the axis that indexes filters (see
        :func:`filter_normalized_direction`).
      ignore_1d: whether leaves with fewer than two axes stay fixed.

    Returns:
      A dict with ``"alphas"`` (``[num_points]``), ``"betas"`` (2-D only),
      ``"losses"`` (``[num_points]``, or ``[num_points, num_points]`` indexed
      ``[i, j] -> (alphas[i], betas[j])``) and ``"directions"`` (the list of
      direction pytrees), ready for ``plt.plot(alphas, losses)`` or
      ``plt.contour(alphas, betas, losses.T)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import sharpness
      >>> loss = lambda p: jnp.sum(p["kernel"] ** 2)
      >>> out = sharpness.loss_landscape(loss, {"kernel": jnp.ones((2, 2))},
      ...                                key=jax.random.key(0), directions=2, num_points=5)
      >>> out["alphas"].tolist(), out["losses"].shape, float(out["losses"][2, 2])
      ([-1.0, -0.5, 0.0, 0.5, 1.0], (5, 5), 4.0)

    References:
      Li et al., Visualizing the Loss Landscape of Neural Nets, NeurIPS 2018,
      https://arxiv.org/abs/1712.09913
    """
    _validate.function("loss_fn", loss_fn)
    _validate.key("key", key)
    if directions not in (1, 2) or isinstance(directions, bool):
        raise ValueError(f"`directions` must be 1 or 2, got {directions!r}.")
    _validate.integer("num_points", num_points, 2, static=True)
    _validate.positive("span", span)
    keys = jax.random.split(key, directions)
    dirs = [
        filter_normalized_direction(k, params, filter_axis=filter_axis, ignore_1d=ignore_1d)
        for k in keys
    ]
    alphas = jnp.linspace(-span, span, num_points, dtype=jnp.float32)

    def at(coeffs):
        moved = params
        for c, d in zip(coeffs, dirs, strict=True):
            moved = jax.tree.map(
                lambda w, x, c=c: (w + c * x).astype(jnp.asarray(w).dtype), moved, d
            )
        return loss_fn(moved)

    if directions == 1:
        losses = jax.lax.map(lambda a: at((a,)), alphas)
        return {"alphas": alphas, "losses": losses, "directions": dirs}
    grid_a, grid_b = jnp.meshgrid(alphas, alphas, indexing="ij")
    coeffs = jnp.stack([grid_a.ravel(), grid_b.ravel()], axis=-1)
    losses = jax.lax.map(lambda c: at((c[0], c[1])), coeffs).reshape(num_points, num_points)
    return {"alphas": alphas, "betas": alphas, "losses": losses, "directions": dirs}
