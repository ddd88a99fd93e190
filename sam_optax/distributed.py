r"""m-sharpness and gradient accumulation for every sharpness-aware method.

Across devices nothing here is needed: under ``jit`` with sharded arrays the
transformation sees global arrays, and under ``pmap``/``shard_map`` the
method's ``axis_name`` averages its output over devices (see the page
*SAM on many devices*). This module covers what one device cannot express by
the choice of gradient alone:

- :func:`m_sharpness` splits a batch into groups of ``m`` examples; each group
  climbs along its own gradient and takes its own probe gradient, and the
  outputs are averaged. Groups run in parallel (``vmap``) or one after the
  other (``lax.scan``, the memory of one group): the latter is gradient
  accumulation with a perturbation per micro-batch.
- :func:`accumulate` averages any function of ``(params, batch)`` over
  micro-batches with ``lax.scan``: the first gradient and ``grad_fn`` built
  with it give SAM on the whole batch at the memory of one micro-batch.

Both rest on one private reduction, :func:`_group_mean`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate

PyTree = Any


def _split(batch: PyTree, size: int, name: str) -> PyTree:
    """Reshapes every leaf ``(n, ...)`` of ``batch`` into ``(n // size, size, ...)``."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("`batch` must hold at least one array with a leading batch axis.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of `batch` must share one leading batch axis, got leading sizes {sizes}."
        )
    (n,) = sizes
    assert n is not None  # checked above; tells the type checker
    if n % size:
        raise ValueError(f"`{name}`={size} must divide the batch size {n}.")
    return jax.tree.map(lambda x: jnp.reshape(x, (n // size, size, *jnp.shape(x)[1:])), batch)


def _zeros_accum(like: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of the shape of ``like`` in its accumulation dtype, varying over the same axes.

    Inside ``shard_map`` a ``lax.scan`` carry must vary over the mesh axes that
    the body's output varies over: ``manual_axis_type.varying`` of the abstract
    value in jax 0.10, read as ``vma`` where that attribute is used instead.
    """
    zeros = jnp.zeros(like.shape, _tree.accum_dtype(like.dtype))
    manual = getattr(like, "manual_axis_type", None)
    varying = getattr(manual, "varying", None) or getattr(like, "vma", None)
    return jax.lax.pcast(zeros, tuple(sorted(varying)), to="varying") if varying else zeros


def _group_mean(
    fn: Callable[[PyTree], tuple[PyTree, PyTree]], xs: PyTree, *, sequential: bool
) -> tuple[PyTree, PyTree]:
    """Runs ``fn`` on each slice of ``xs`` along its leading axis.

    ``fn(x) -> (mean_part, stacked_part)``. Returns the mean over slices of
    ``mean_part`` (accumulated in float32 or wider, cast back to its dtype)
    and ``stacked_part`` stacked along a new leading axis. ``sequential`` runs
    the slices one after the other in ``lax.scan`` (the memory of one slice);
    otherwise they run side by side under ``vmap``.
    """
    count = jax.tree.leaves(xs)[0].shape[0]
    if sequential:
        like = jax.eval_shape(fn, jax.tree.map(operator.itemgetter(0), xs))[0]
        zeros = jax.tree.map(_zeros_accum, like)

        def body(total, x):
            part, keep = fn(x)
            return jax.tree.map(lambda t, p: t + p.astype(t.dtype), total, part), keep

        total, stacked = jax.lax.scan(body, zeros, xs)
    else:
        like, stacked = jax.vmap(fn)(xs)
        total = jax.tree.map(lambda p: jnp.sum(_tree.to_accum(p), axis=0), like)
    return jax.tree.map(lambda t, p: (t / count).astype(p.dtype), total, like), stacked


def accumulate(
    fn: Callable[[PyTree, PyTree], PyTree], micro_batch_size: int
) -> Callable[[PyTree, PyTree], PyTree]:
    r"""Averages ``fn(params, micro_batch)`` over the micro-batches of a batch, in ``lax.scan``.

    .. math::

        \mathrm{accumulate}(f)(w, B) = \frac{1}{k} \sum_{j=1}^{k} f(w, B_j),
        \qquad B = B_1 \cup \dots \cup B_k,\ |B_j| = \text{micro\_batch\_size}

    For a loss that is a mean over examples, ``accumulate(jax.grad(loss), s)``
    is the gradient of the whole batch, computed with the memory of ``s``
    examples. Using it for both the first gradient and ``grad_fn`` gives a
    sharpness-aware step on the whole batch (one perturbation from the full
    gradient, the probe gradient accumulated over the same micro-batches):
    scheme (i) of gradient accumulation. Every leaf of ``fn``'s output is
    averaged (summed in float32 or wider, returned in its own dtype).

    Args:
      fn: ``(params, micro_batch) -> pytree``, e.g. ``jax.grad(loss_fn)`` or
        ``jax.value_and_grad(loss_fn)``.
      micro_batch_size: examples per micro-batch; it must divide the leading
        axis of every leaf of the batch.

    Returns:
      ``(params, batch) -> pytree``, the average of ``fn`` over micro-batches.

    Examples:
      SAM on a batch of 8, two examples at a time:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(p, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ p - y) ** 2)
      >>> batch = (jnp.arange(24.0).reshape(8, 3) / 24, jnp.ones(8))
      >>> params = jnp.zeros(3)
      >>> acc_grad = sam_optax.accumulate(jax.grad(loss_fn), micro_batch_size=2)
      >>> bool(jnp.allclose(acc_grad(params, batch), jax.grad(loss_fn)(params, batch)))
      True
      >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(acc_grad(params, batch), state, params,
      ...                            grad_fn=lambda p: acc_grad(p, batch))
      >>> updates.shape
      (3,)

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    micro_batch_size = _validate.integer("micro_batch_size", micro_batch_size, 1, static=True)
    _validate.function("fn", fn)

    def averaged(params: PyTree, batch: PyTree) -> PyTree:
        micro = _split(batch, micro_batch_size, "micro_batch_size")
        mean, _ = _group_mean(lambda b: (fn(params, b), ()), micro, sequential=True)
        return mean

    return averaged


class MSharpnessState(NamedTuple):
    """State of :func:`m_sharpness`.

    Attributes:
      groups: the wrapped transformation's state, one per group, stacked along
        a leading axis (each group is a virtual device with its own state).
    """

    groups: PyTree


class MSharpness(NamedTuple):
    """The two functions that :func:`m_sharpness` returns.

    Attributes:
      init: ``params -> MSharpnessState``.
      update: ``(state, params, batch, **extra_args) -> (updates, state, metrics)``;
        ``updates`` is the average over groups of the wrapped transformation's
        output; ``metrics`` is the mean loss, or ``(mean loss, aux)`` with
        ``has_aux``, where ``aux`` is stacked over groups.
    """

    init: Callable[[PyTree], MSharpnessState]
    update: Callable[..., tuple[PyTree, MSharpnessState, Any]]


def m_sharpness(
    tx: optax.GradientTransformation,
    loss_fn: Callable[[PyTree, PyTree], Any],
    *,
    m: int,
    batch_size: int,
    has_aux: bool = False,
    sequential: bool = False,
) -> MSharpness:
    r"""m-sharpness: every group of ``m`` examples climbs along its own gradient.

    The batch of ``batch_size`` examples is split into ``k = batch_size / m``
    groups ``B_j``. Each group runs the sharpness-aware transformation ``tx``
    with its own gradient, its own ``grad_fn`` and its own state, and the
    outputs are averaged; for SAM:

    .. math::

        g_j = \nabla L_{B_j}(w), \qquad
        e_j = \rho\,\frac{g_j}{\lVert g_j \rVert + \epsilon}, \qquad
        \mathrm{out} = \frac{1}{k} \sum_{j=1}^{k} \nabla L_{B_j}(w + e_j)

    For a method that probes on every step or on a fixed schedule, this is
    what ``k`` devices compute when each passes its local gradient to the
    method built with ``axis_name`` (``pmap``/``shard_map``); here it runs on
    one device or under plain ``jit``. ``m = batch_size`` is SAM on the whole
    batch. Feed ``updates`` to the base optimizer, which is
    not part of ``tx``: the average must come before momentum or Adam.

    With ``sequential=True`` the groups run one after the other in
    ``lax.scan`` with the memory of one group: gradient accumulation with a
    perturbation per micro-batch (``m`` = the micro-batch size). Under ``vmap``
    (the default) a policy's ``lax.cond`` becomes a select and both branches
    run; in ``lax.scan`` a skipped probe is really skipped. A data-dependent
    policy (AE-SAM's) decides here per group, from each group's own gradient
    statistics, so groups may take different branches; across devices with
    ``axis_name`` it decides from statistics averaged over the devices, so that
    every device takes the same branch. The two then differ.

    Args:
      tx: the sharpness-aware transformation (any method of the library, or a
        composition with :func:`sam_optax.sharpness_aware`), without the base
        optimizer. If it was built with ``axis_name``, each group's output is
        also averaged over that device axis (groups within devices).
      loss_fn: ``(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``), the mean loss of a batch; it is called on groups of ``m``.
      m: examples per group.
      batch_size: examples per batch; a multiple of ``m``. Fixes the number
        of groups, hence the shape of the state.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      sequential: run the groups in ``lax.scan`` instead of ``vmap``.

    Returns:
      An :class:`MSharpness` ``(init, update)``; ``update(state, params, batch,
      **extra_args)`` returns ``(updates, state, metrics)`` and hands
      ``extra_args`` to ``tx.update``.

    Examples:
      Four groups of two examples on one device:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(p, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ p - y) ** 2)
      >>> batch = (jnp.arange(24.0).reshape(8, 3) / 24, jnp.ones(8))
      >>> params, base = jnp.zeros(3), optax.sgd(0.1)
      >>> msam = sam_optax.m_sharpness(sam_optax.sam(rho=0.05), loss_fn, m=2, batch_size=8)
      >>> state, base_state = msam.init(params), base.init(params)
      >>> out, state, loss = msam.update(state, params, batch)
      >>> updates, base_state = base.update(out, base_state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> state.groups.count.tolist()
      [1, 1, 1, 1]

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021 (m-sharpness, section 4.1),
      https://arxiv.org/abs/2010.01412

      Behdin et al., mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization,
      2023, https://arxiv.org/abs/2302.09693
    """
    _validate.transformation("tx", tx)
    _validate.function("loss_fn", loss_fn)
    m = _validate.integer("m", m, 1, static=True)
    batch_size = _validate.integer("batch_size", batch_size, 1, static=True)
    if batch_size % m:
        raise ValueError(f"`m`={m} must divide `batch_size`={batch_size}.")
    num_groups = batch_size // m
    tx = optax.with_extra_args_support(tx)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def grad_of(params: PyTree, group: PyTree) -> PyTree:
        return value_and_grad(params, group)[1]

    def init(params: PyTree) -> MSharpnessState:
        return MSharpnessState(jax.vmap(lambda _: tx.init(params))(jnp.arange(num_groups)))

    def update(
        state: MSharpnessState, params: PyTree, batch: PyTree, **extra_args: Any
    ) -> tuple[PyTree, MSharpnessState, Any]:
        groups = _split(batch, m, "m")
        if jax.tree.leaves(groups)[0].shape[0] != num_groups:
            raise ValueError(
                f"`batch_size`={batch_size} does not match the batch, which holds "
                f"{jax.tree.leaves(groups)[0].shape[0] * m} examples."
            )

        def one_group(xs):
            group, inner = xs
            value, g = value_and_grad(params, group)
            out, inner = tx.update(
                g, inner, params, grad_fn=lambda p: grad_of(p, group), **extra_args
            )
            loss, aux = value if has_aux else (value, ())
            return (out, loss), (inner, aux)

        (out, loss), (inner, aux) = _group_mean(
            one_group, (groups, state.groups), sequential=sequential
        )
        return out, MSharpnessState(inner), ((loss, aux) if has_aux else loss)

    return MSharpness(init, update)
