r"""Probes: how a sharpness-aware step evaluates its second gradient at ``w + e``.

The default probe is the user's ``grad_fn(w + e)``, called by the skeleton. A
probe given to :func:`sam_optax.sharpness_aware` as ``probe=`` replaces it by a
function ``(w_p, ctx) -> g_p`` that reads what it needs from ``ctx.extra_args``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sam_optax import _validate
from sam_optax.pieces import Context

PyTree = Any


def _need(what: str, gamma: float) -> ValueError:
    return ValueError(
        f"sam_optax.esam: sharpness-sensitive data selection (gamma={gamma!r} < 1) needs the "
        f"keyword argument `{what}` in `update`:\n"
        "    per_example_loss_fn = lambda p, batch: losses_of_shape_[B]\n"
        "    tx.update(grads, state, params, grad_fn=grad_fn,\n"
        "              per_example_loss_fn=per_example_loss_fn, batch=batch)\n"
        "(gamma=1 switches the selection off and needs only `grad_fn`)."
    )


def _subset_size(gamma: float, batch_size: int) -> int:
    """``K = max(1, round(gamma * B))``, with Python's ``round`` (half to even)."""
    return max(1, round(gamma * batch_size))


def _explicit_spec(x: jax.Array) -> P | None:
    """The partition spec in ``x``'s type when it is sharded over Explicit mesh axes, else None."""
    spec = jax.typeof(x).sharding.spec
    return spec if any(axes is not None for axes in spec) else None


def _whole(x: jax.Array) -> jax.Array:
    """``x`` replicated when its type is sharded over Explicit mesh axes, else as it is.

    ``lax.top_k`` needs its axis unsharded; under ``jax.jit`` with a batch sharded
    over Explicit axes the per-example losses are. Gathering ``B`` scalars keeps
    the selection over the global batch, as without sharding.
    """
    return x if _explicit_spec(x) is None else jax.sharding.reshard(x, P())


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[index]`` along the batch axis, sharded like ``x`` when the selection divides evenly.

    Under Explicit axes the gather needs its output sharding; keeping the batch
    axis sharded keeps the probe's backward pass spread over the devices (it is
    replicated only when ``K`` does not divide by the number of shards).
    """
    spec = _explicit_spec(x)
    if spec is None:
        return jnp.take(x, index, axis=0)
    sharding = jax.typeof(x).sharding
    names = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
    shards = math.prod(sharding.mesh.shape[name] for name in names)
    first = spec[0] if index.shape[0] % shards == 0 else None
    return x.at[index].get(out_sharding=P(first, *spec[1:]))


def _select(rise: jax.Array, batch: PyTree, k: int, groups: int) -> PyTree:
    """The ``k`` examples of largest ``rise`` in each of ``groups`` equal slices of ``batch``.

    With one group the selection is over the whole batch (:func:`_whole`,
    :func:`_take`). With several, the batch axis ``B`` is split into ``(groups,
    B / groups)`` and every slice keeps its own top ``k``: a batched ``top_k`` and
    gather whose leading axis is the batch axis' major part, which XLA's
    partitioner keeps sharded when the batch is sharded over ``groups`` devices.
    """
    if groups == 1:
        _, index = jax.lax.top_k(_whole(rise), k)
        return jax.tree.map(lambda x: _take(x, index), batch)
    split = lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:])  # noqa: E731
    _, index = jax.lax.top_k(split(rise), k)

    def take(x):
        kept = jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0))(split(x), index)
        return kept.reshape(groups * k, *x.shape[1:])

    return jax.tree.map(take, batch)


def sharpness_sensitive_data(
    gamma: float = 0.5, *, groups: int = 1
) -> Callable[[PyTree, Context], PyTree]:
    r"""ESAM's data selection: the probe gradient on the examples that sharpen most.

    .. math::

        \ell^0_i = \ell_i(w), \quad \ell^1_i = \ell_i(w + e), \quad
        K = \max(1, \mathrm{round}(\gamma B)), \quad
        S = \operatorname{top}_K(\ell^1 - \ell^0)

        g_p = \nabla_w \Big[ \tfrac{1}{K} \textstyle\sum_{i \in S} \ell_i \Big](w + e)

    The ``K`` examples are gathered (``lax.top_k`` with a static ``K``) before the
    backward pass, so it costs ``gamma`` of a full one; the two extra forward
    passes are over the full batch (one when ``losses`` is given). The official
    code keeps ``K - 1`` examples (a strict ``>``); this keeps ``K``.

    ``update`` must receive two extra keyword arguments:
    ``per_example_loss_fn(params, batch) -> [B]`` and ``batch`` (a pytree whose
    leaves have leading axis ``B``). Optional: ``losses``, the per-example clean
    losses ``l_i(w)`` from the first pass, which saves one forward pass.

    With ``groups = G > 1`` the batch is cut into ``G`` equal contiguous slices
    and each keeps its own ``K / G = max(1, round(gamma B / G))`` examples: set
    ``G`` to the number of devices the batch is sharded over under ``jax.jit``
    and every device selects among its own examples, as each process does in the
    official code (PyTorch DDP, and ``axis_name`` under ``shard_map`` here), and
    the probe's backward pass stays sharded. With ``G = 1`` the selection is over
    the global batch: XLA's partitioner then replicates the ``K`` gathered
    examples on every device when the batch is sharded over Auto mesh axes (each
    device runs the backward pass on all of them), and keeps them sharded only
    over Explicit axes.

    Args:
      gamma: the fraction of the batch kept, in ``(0, 1]`` (a Python number:
        ``K`` is a static shape).
      groups: the number of equal slices of the batch that select separately, a
        positive Python int that divides the batch size.

    Returns:
      A probe ``(w_p, ctx) -> g_p`` for :func:`sam_optax.sharpness_aware`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> per_example = lambda p, b: (b["x"] @ p - b["y"]) ** 2
      >>> batch = {"x": jnp.eye(4), "y": jnp.array([1.0, 2.0, 3.0, 4.0])}
      >>> tx = sam_optax.sharpness_aware(
      ...     sam_optax.normalized_gradient(), rho=0.05,
      ...     probe=sam_optax.sharpness_sensitive_data(gamma=0.5))
      >>> params = jnp.zeros(4)
      >>> grads = jax.grad(lambda p: jnp.mean(per_example(p, batch)))(params)
      >>> out, _ = tx.update(grads, tx.init(params), params,
      ...                    per_example_loss_fn=per_example, batch=batch)
      >>> [bool(x != 0) for x in out]  # only the 2 examples whose loss rose most
      [False, False, True, True]

    References:
      Du et al., Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks, ICLR 2022, https://arxiv.org/abs/2110.03141
    """
    _validate.not_static("gamma", gamma, "in (0, 1]")
    _validate.in_range("gamma", gamma, 0.0, 1.0, low_open=True)
    if not isinstance(gamma, int | float) or isinstance(gamma, bool):
        raise ValueError(f"`gamma` must be a Python number in (0, 1], got {gamma!r}.")
    groups = _validate.integer("groups", groups, 1, static=True)

    def probe(w_p, ctx):
        loss_fn = ctx.extra_args.get("per_example_loss_fn")
        batch = ctx.extra_args.get("batch")
        if loss_fn is None:
            raise _need("per_example_loss_fn", gamma)
        if batch is None:
            raise _need("batch", gamma)
        size = jnp.shape(jax.tree.leaves(batch)[0])[0]
        l0 = ctx.extra_args.get("losses")
        l0 = loss_fn(ctx.params, batch) if l0 is None else l0
        l1 = loss_fn(w_p, batch)
        for what, value in (("losses", l0), ("per_example_loss_fn", l1)):
            if jnp.shape(value) != (size,):
                raise ValueError(
                    f"sam_optax.esam: `{what}` must give one loss per example, shape "
                    f"({size},), got shape {jnp.shape(value)}."
                )
        if size % groups:
            raise ValueError(
                f"sam_optax.esam: `groups`={groups} must divide the batch size {size}."
            )
        rise = jax.lax.stop_gradient(l1 - l0).astype(jnp.float32)
        sub = _select(rise, batch, _subset_size(gamma, size // groups), groups)
        # allow_int: integer leaves of the params get float0 cotangents, passed through.
        return jax.grad(lambda p: jnp.mean(loss_fn(p, sub)), allow_int=True)(w_p)

    return probe
