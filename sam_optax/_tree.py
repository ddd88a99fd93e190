"""Pytree helpers shared by every piece: float32 accumulation, norms, masks."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

PyTree = Any


def accum_dtype(dtype: Any) -> jnp.dtype:
    """The dtype in which a leaf of ``dtype`` is accumulated: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def to_accum(tree: PyTree) -> PyTree:
    """Casts every leaf to its accumulation dtype (bf16/f16 -> f32, f64 stays)."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(accum_dtype(jnp.asarray(x).dtype)), tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(jnp.asarray(y).dtype), tree, like)


def floating_flags(params: PyTree) -> list[bool]:
    """One flag per leaf: does it hold floating or complex values (does it get a gradient)?"""
    return [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(params)]


def as_float(tree: PyTree, like: PyTree, floating: list[bool]) -> PyTree:
    """Accumulation-dtype leaves; zeros (float32) for the integer leaves of the params.

    Integer parameters get float0 (or integer) cotangents that cannot enter any
    arithmetic; the pieces see zeros there, and the output passes the incoming
    leaf through (see :func:`pass_through`).
    """
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [
            to_accum(x) if keep else jnp.zeros(jnp.shape(w), jnp.float32)
            for x, w, keep in zip(leaves, jax.tree.leaves(like), floating, strict=True)
        ]
    )


def pass_through(out: PyTree, updates: PyTree, floating: list[bool]) -> PyTree:
    """``out`` in the dtypes of ``updates``; the integer leaves' updates unchanged."""
    leaves, treedef = jax.tree.flatten(out)
    return treedef.unflatten(
        [
            x.astype(jnp.asarray(u).dtype) if keep else u
            for x, u, keep in zip(leaves, jax.tree.leaves(updates), floating, strict=True)
        ]
    )


def _explicit_axes(x: jax.Array) -> tuple[Any, frozenset[str]]:
    """The mesh of ``x`` and the Explicit mesh axes over which it is sharded.

    Outside an Explicit mesh (plain ``jit`` with sharded inputs, ``shard_map``,
    ``pmap``) there are none.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None or not getattr(mesh, "axis_names", ()):
        return None, frozenset()
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    }
    axes: set[str] = set()
    for entry in spec:
        axes.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
    axes &= explicit
    return (mesh, frozenset(axes)) if axes else (None, frozenset())


def total(parts: list[jax.Array]) -> jax.Array:
    """``Σ`` over every entry of every array in ``parts``, a float32 (or wider) scalar.

    Each array is summed on its own shard first. Under an Explicit mesh the partial
    sums stay unreduced (no communication) and are added together, then reduced
    across devices once per set of mesh axes. Elsewhere XLA's partitioner reduces
    each part across devices on its own: the TPU compiler and XLA's GPU pipeline
    combine those collectives, XLA:CPU keeps one per part (``docs/scale.md``).
    """
    dtype = jnp.result_type(jnp.float32, *(x.dtype for x in parts)) if parts else jnp.float32
    local: list[jax.Array] = []  # one scalar per part outside Explicit axes
    groups: dict[tuple[Any, frozenset[str]], jax.Array] = {}
    for x in parts:
        x = x if x.dtype == dtype else x.astype(dtype)
        mesh, axes = key = _explicit_axes(x)
        if axes:
            unreduced = NamedSharding(mesh, PartitionSpec(unreduced=axes))
            part = jax.lax.reduce_sum(x, tuple(range(x.ndim)), out_sharding=unreduced)
            groups[key] = part if key not in groups else groups[key] + part
        else:
            local.append(x if x.ndim == 0 else jnp.sum(x))
    # One stacked sum rather than a chain of scalar additions: fewer operations to trace.
    out = jnp.sum(jnp.stack(local)) if local else jnp.zeros([], dtype)
    for (mesh, _), part in groups.items():
        out = out + jax.sharding.reshard(part, NamedSharding(mesh, PartitionSpec()))
    return out


def _real_parts(x: jax.Array) -> list[jax.Array]:
    """A leaf as real arrays: itself, or the real and imaginary parts of a complex leaf."""
    x = x.astype(accum_dtype(x.dtype))
    return [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]


def _blue_constants(dtype: Any) -> tuple[float, float, float, float]:
    """Blue's thresholds and scales (LAPACK ``dnrm2``) for a real floating dtype.

    Entries below ``t_small`` are squared after scaling up by ``s_small``, entries
    above ``t_big`` after scaling down by ``s_big``, so that no square underflows
    or overflows and no sum of squares overflows.
    """
    info = jnp.finfo(dtype)
    t, emin, emax = info.nmant + 1, info.minexp, info.maxexp
    return (
        2.0 ** np.ceil((emin - 1) / 2),
        2.0 ** -np.floor((emin - t) / 2),
        2.0 ** np.floor((emax - t + 1) / 2),
        2.0 ** -np.ceil((emax + t - 1) / 2),
    )


def _add3(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _blue_squares(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The squares of Blue's small, medium and large entries of ``a = |x|``, scaled."""
    t_small, s_small, t_big, s_big = _blue_constants(a.dtype)
    is_big, is_small = a > t_big, a < t_small
    small, medium, big = (
        jnp.square(q).astype(a.dtype)  # a float64 scale (under x64) must not promote
        for q in (
            jnp.where(is_small, a * s_small, 0.0),
            jnp.where(is_big | is_small, 0.0, a),
            jnp.where(is_big, a * s_big, 0.0),
        )
    )
    return small, medium, big


@jax.jit
def _blue_sums(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blue's three sums of squares of one leaf, in one fused pass over it.

    Three separate reductions of the same input kept params-sized temporaries alive
    on XLA:CPU. Jitted so that JAX traces it once per leaf shape and dtype, not once
    per leaf: a Transformer's blocks repeat the same few shapes, and the trace of
    every norm of a step (LookSAM takes five) otherwise grows with the leaf count.
    XLA inlines the call; the compiled program is the same.
    """
    zero = jnp.zeros([], x.dtype)
    return jax.lax.reduce(_blue_squares(jnp.abs(x)), (zero,) * 3, _add3, tuple(range(x.ndim)))


def global_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm over all leaves, accumulated in float32 (or wider).

    Complex leaves count ``|x|² = Re(x)² + Im(x)²``. Blue's algorithm (LAPACK's
    ``nrm2``) keeps three sums of squares, of the small, medium and large entries
    scaled by powers of two, so that finite entries anywhere in the dtype's range
    give a finite, accurate norm with no second pass. Under an Explicit mesh each sum
    needs one reduction across devices, whatever the number of leaves (:func:`total`).
    Non-finite inputs propagate.
    """
    leaves = [r for x in jax.tree.leaves(tree) for r in _real_parts(jnp.asarray(x))]
    if not leaves:
        return jnp.zeros([], jnp.float32)
    dtype = jnp.result_type(*leaves)
    small: list[jax.Array] = []
    medium: list[jax.Array] = []
    big: list[jax.Array] = []
    for x in leaves:
        x = x.astype(dtype)
        # Explicit-mesh leaves keep their squares for `total`'s unreduced partial sums.
        squares = _blue_squares(jnp.abs(x)) if _explicit_axes(x)[1] else _blue_sums(x)
        for sums, part in zip((small, medium, big), squares, strict=True):
            sums.append(part)
    _, s_small, _, s_big = _blue_constants(dtype)
    small_sum, medium_sum, big_sum = total(small), total(medium), total(big)
    norm = jnp.hypot(jnp.sqrt(big_sum) / s_big, jnp.sqrt(medium_sum))
    return jnp.hypot(norm, jnp.sqrt(small_sum) / s_small).astype(dtype)


def real_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``Re <a, b> = Σ Re(a) Re(b) + Im(a) Im(b)`` over all leaves (no overflow guard).

    Use it on vectors whose entries are bounded (e.g. divided by their norms, as
    :func:`projection` does); one reduction across devices.
    """
    parts = [
        x * y
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        for x, y in zip(_real_parts(jnp.asarray(u)), _real_parts(jnp.asarray(v)), strict=True)
    ]
    return total(parts) if parts else jnp.zeros([], jnp.float32)


def scale_tree(tree: PyTree, factor: jax.Array) -> PyTree:
    """``factor * tree`` leaf by leaf, in each leaf's dtype."""
    return jax.tree.map(lambda x: (factor * x).astype(x.dtype), tree)


def inverse(norm: jax.Array) -> jax.Array:
    """``1 / norm``, and 0 where ``norm`` is 0 (a zero vector stays zero)."""
    return jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)


def projection(a: PyTree, b: PyTree, eps: float | jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""``(Re<a, b> / (‖b‖² + eps), ‖b‖)``, finite for any finite ``a`` and ``b``.

    The dot product is taken between ``a / ‖a‖`` and ``b / ‖b‖``, whose entries
    are at most 1, and the ratio is then formed as
    ``cos · ‖a‖ / (‖b‖ + eps / ‖b‖)``: nothing squares a norm, so gradients near
    the top of the float32 range do not overflow. ``‖b‖`` is returned for reuse.
    """
    norm_a, norm_b = global_norm(a), global_norm(b)
    # The barrier keeps XLA from regrouping (a_i / ‖a‖)(b_i / ‖b‖) as
    # (a_i b_i)(1 / (‖a‖ ‖b‖)), which overflows for two small norms (seen on a leaf
    # that a mask had set to the constant 0).
    unit_a, unit_b = jax.lax.optimization_barrier(
        (scale_tree(a, inverse(norm_a)), scale_tree(b, inverse(norm_b)))
    )
    cos = real_vdot(unit_a, unit_b)
    safe_b = jnp.where(norm_b > 0, norm_b, 1.0)
    coef = jnp.where(norm_b > 0, cos * norm_a / (safe_b + eps / safe_b), 0.0)
    return coef, norm_b


def zeros_like_accum(tree: PyTree) -> PyTree:
    """Zeros with the shapes and shardings of ``tree`` and its accumulation dtypes.

    ``zeros_like`` keeps each leaf's sharding, so that a state initialised from
    sharded params is sharded like them (under an Explicit mesh the sharding is
    part of the type, and a ``lax.cond`` needs both branches to agree on it).
    """
    return jax.tree.map(lambda x: jnp.zeros_like(x, accum_dtype(jnp.asarray(x).dtype)), tree)


def is_python_number(value: Any) -> bool:
    """True for a concrete Python or NumPy number (not a traced array)."""
    return isinstance(value, numbers.Number | np.ndarray | np.generic) and np.ndim(value) == 0  # type: ignore[arg-type]


def leaf_name(path: tuple) -> str | None:
    """The last string name in a key path (``'bias'`` for ``params['dense']['bias']``).

    Wrapper attributes that Flax NNX adds around an array (``value``) are skipped.
    """
    for key in reversed(path):
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name not in ("value", "raw_value"):
            return name
    return None


def resolve_mask(
    mask: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree, arg: str = "mask"
) -> list[bool]:
    """Resolves ``mask`` against ``params`` into one Python bool per leaf.

    ``mask`` is ``None`` (every leaf), a pytree of booleans with the structure of
    ``params``, or a function of ``params`` that returns such a pytree; ``arg`` is
    the argument's name in error messages.
    """
    treedef = jax.tree.structure(params)
    if mask is None:
        return [True] * treedef.num_leaves
    tree = mask(params) if callable(mask) else mask
    try:
        flat = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"`{arg}` must have the structure of the params: expected "
            f"{treedef}, got {jax.tree.structure(tree)}."
        ) from err
    out = []
    for leaf in flat:
        if not isinstance(leaf, bool | np.bool_):
            raise ValueError(
                f"`{arg}` leaves must be Python booleans (True: this leaf is selected), "
                f"got {leaf!r} of type {type(leaf).__name__}."
            )
        out.append(bool(leaf))
    return out


def apply_mask(tree: PyTree, flags: list[bool] | None) -> PyTree:
    """Replaces the leaves whose flag is False with zeros (a select, not a product).

    ``flags=None`` (no mask, as in a :class:`sam_optax.Context` built by hand)
    keeps every leaf.
    """
    if flags is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [x if keep else jnp.zeros_like(x) for x, keep in zip(leaves, flags, strict=True)]
    )
