"""The pair-gradient oracle: two gradients of one loss as one SPMD computation.

SAMPa needs ``∇f(x̃; B_{t-1})`` and ``∇f(y; B_t)``, and the official random weight
perturbation code ``∇f(w; B_a)`` and ``∇f(w + e; B_b)``: the same computation at two
(params, batch) pairs, neither input depending on the other output. :func:`pair_grad_fn`
stacks the pair along a new leading axis and maps ``jax.grad`` over it, so that the
pair is one program that a mesh axis can split over two device groups.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_optax import _validate

PyTree = Any
PairGradFn = Callable[[PyTree, PyTree], tuple[PyTree, PyTree]]


def _stack(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)


def _unstack(tree: PyTree) -> tuple[PyTree, PyTree]:
    return jax.tree.map(lambda x: x[0], tree), jax.tree.map(lambda x: x[1], tree)


def pair_grad_fn(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    batch_a: PyTree,
    batch_b: PyTree,
    *,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = "pair",
    data_axis: str | None = None,
    shard_map: bool = False,
) -> PairGradFn:
    r"""A function ``(params_a, params_b) -> (grads_a, grads_b)`` on two batches at once.

    .. math::

        (g_a, g_b) = \bigl(\nabla_w L(w_a; B_a),\ \nabla_w L(w_b; B_b)\bigr)

    computed as ``jax.vmap(jax.grad(loss_fn))`` over the stacked pair, one SPMD
    computation in which neither gradient depends on the other:

    - ``mesh=None``: plain ``vmap``. On one device it only doubles the batch
      (no wall-clock gain); it is the reference.
    - ``mesh`` with an axis ``axis`` of size 2: the stacked params are constrained
      to ``PartitionSpec(axis)`` and the stacked batches to
      ``PartitionSpec(axis, data_axis)`` (GSPMD sharding constraints), so each
      member of the pair lives on one half of the devices.
    - ``shard_map=True`` (needs ``mesh``): the split is explicit. Each device group
      computes ``jax.grad(loss_fn)`` of its member on its shard of the batch and,
      with ``data_axis``, averages it over that axis (``pmean``: ``loss_fn`` must
      be a mean over the batch and the shards of equal size).

    Args:
      loss_fn: ``(params, batch) -> scalar`` loss, a mean over the batch.
      batch_a: the batch of the first member.
      batch_b: the batch of the second member; same structure, shapes and
        dtypes as ``batch_a`` (the two are stacked).
      mesh: a ``jax.sharding.Mesh`` with the axis ``axis``, or ``None``.
      axis: the mesh axis of size 2 over which the pair is split.
      data_axis: a mesh axis over which each batch is split (data parallelism
        inside each group), or ``None``.
      shard_map: evaluate under ``jax.shard_map`` instead of with GSPMD
        constraints.

    Returns:
      ``(params_a, params_b) -> (grads_a, grads_b)``, params of equal structure,
      shapes and dtypes. Call it inside ``jit``.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> loss = lambda w, b: jnp.mean((b * w) ** 2) / 2
      >>> pair = sam_optax.pair_grad_fn(loss, jnp.array([1.0]), jnp.array([2.0]))
      >>> g_a, g_b = pair(jnp.array(3.0), jnp.array(1.0))
      >>> float(g_a), float(g_b)  # 1² · 3, 2² · 1
      (3.0, 4.0)

    References:
      Xie, Pethick & Cevher, SAMPa: Sharpness-aware Minimization Parallelized,
      NeurIPS 2024, https://arxiv.org/abs/2410.10683
    """
    _validate.function("loss_fn", loss_fn)
    if jax.tree.structure(batch_a) != jax.tree.structure(batch_b):
        raise ValueError(
            "`batch_b` must have the structure of `batch_a` (the two are stacked), got "
            f"{jax.tree.structure(batch_b)} and {jax.tree.structure(batch_a)}."
        )
    for a, b in zip(jax.tree.leaves(batch_a), jax.tree.leaves(batch_b), strict=True):
        if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise ValueError(
                f"`batch_b` has a leaf of shape {jnp.shape(b)} and dtype {jnp.result_type(b)} "
                f"where `batch_a` has {jnp.shape(a)} and {jnp.result_type(a)}; the two "
                "batches are stacked, so they must agree."
            )
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"`mesh` must be None or a jax.sharding.Mesh, got {mesh!r}.")
    if shard_map and mesh is None:
        raise ValueError(
            "`shard_map` is True but `mesh` is None: the split needs a mesh with the axis `axis`."
        )
    if mesh is not None:
        for name, value in (("axis", axis), ("data_axis", data_axis)):
            if value is not None and value not in mesh.shape:
                raise ValueError(
                    f"`{name}` must name an axis of `mesh` {dict(mesh.shape)}, got {value!r}."
                )
        if mesh.shape[axis] != 2:
            raise ValueError(
                f"`axis` {axis!r} must have size 2 in `mesh` (one device group per member "
                f"of the pair), got size {mesh.shape[axis]}."
            )
    grad = jax.grad(loss_fn)
    batches = _stack(batch_a, batch_b)

    def vmapped(params_a, params_b):
        stacked, data = _stack(params_a, params_b), batches
        if mesh is not None:
            stacked = jax.lax.with_sharding_constraint(stacked, NamedSharding(mesh, P(axis)))
            data = jax.lax.with_sharding_constraint(data, NamedSharding(mesh, P(axis, data_axis)))
        return _unstack(jax.vmap(grad)(stacked, data))

    if not shard_map:
        return vmapped

    def member(stacked, data):
        # One device group: its member of the pair (leading axis of size 1 here).
        g = grad(*jax.tree.map(lambda x: x[0], (stacked, data)))
        if data_axis is not None:
            g = jax.lax.pmean(g, data_axis)
        return jax.tree.map(lambda x: x[None], g)

    def split(params_a, params_b):
        mapped = jax.shard_map(
            member,
            mesh=mesh,
            in_specs=(P(axis), P(axis, data_axis)),
            out_specs=P(axis),
            check_vma=False,
        )
        return _unstack(mapped(_stack(params_a, params_b), batches))

    return split
