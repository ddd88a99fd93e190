"""Pytree helpers shared by every piece: float32 accumulation, norms, masks."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Global dot product ``<a, b>`` over all leaves, accumulated in float32 or wider."""
    parts = [
        jnp.sum(x.astype(accum_dtype(x.dtype)) * y.astype(accum_dtype(y.dtype)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(parts, jnp.zeros([], jnp.float32))


def global_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm over all leaves, accumulated in float32 (or wider).

    The plain sum of squares overflows float32 for entries near 1e20; when it
    does, the norm is recomputed with the entries scaled by their largest
    magnitude, so that finite inputs always give a finite, accurate norm.
    Non-finite inputs propagate (the result is ``inf`` or ``nan``).
    """
    leaves = [x.astype(accum_dtype(x.dtype)) for x in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros([], jnp.float32)
    sumsq = sum((jnp.sum(jnp.square(x)) for x in leaves), jnp.zeros([], jnp.float32))

    def scaled(_):
        big = max_abs(leaves)
        safe = jnp.where(big > 0, big, 1.0)
        ss = sum((jnp.sum(jnp.square(x / safe)) for x in leaves), jnp.zeros([], sumsq.dtype))
        return (safe * jnp.sqrt(ss)).astype(sumsq.dtype)

    return jax.lax.cond(jnp.isfinite(sumsq), lambda _: jnp.sqrt(sumsq), scaled, None)


def max_abs(tree: PyTree) -> jax.Array:
    """The largest ``|x|`` over all entries of all leaves (0 for empty leaves)."""
    leaves = [jnp.max(jnp.abs(x), initial=0.0) for x in jax.tree.leaves(tree)]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros([], jnp.float32)


def zeros_like_accum(tree: PyTree) -> PyTree:
    """Zeros with the shapes and shardings of ``tree`` and its accumulation dtypes.

    ``zeros_like`` keeps each leaf's sharding, so that a state initialised from
    sharded params is sharded like them (under an Explicit mesh the sharding is
    part of the type, and a ``lax.cond`` needs both branches to agree on it).
    """
    return jax.tree.map(lambda x: jnp.zeros_like(x, accum_dtype(jnp.asarray(x).dtype)), tree)


def is_python_number(value: Any) -> bool:
    """True for a concrete Python or NumPy number (not a traced array)."""
    return isinstance(value, numbers.Number | np.ndarray | np.generic) and np.ndim(value) == 0


def leaf_name(path: tuple) -> str | None:
    """The last string name in a key path (``'bias'`` for ``params['dense']['bias']``).

    Wrapper attributes that Flax NNX adds around an array (``value``) are skipped.
    """
    for key in reversed(path):
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name not in ("value", "raw_value"):
            return name
    return None


def resolve_mask(mask: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree) -> list[bool]:
    """Resolves ``mask`` against ``params`` into one Python bool per leaf.

    ``mask`` is ``None`` (every leaf), a pytree of booleans with the structure of
    ``params``, or a function of ``params`` that returns such a pytree.
    """
    treedef = jax.tree.structure(params)
    if mask is None:
        return [True] * treedef.num_leaves
    tree = mask(params) if callable(mask) else mask
    try:
        flat = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "`mask` must have the structure of the params: expected "
            f"{treedef}, got {jax.tree.structure(tree)}."
        ) from err
    out = []
    for leaf in flat:
        if not isinstance(leaf, bool | np.bool_):
            raise ValueError(
                "`mask` leaves must be Python booleans (True: perturb this leaf), "
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
