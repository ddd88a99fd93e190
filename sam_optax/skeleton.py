"""The one sharpness-aware skeleton: policy -> perturbation -> probe -> combine.

Every method of :mod:`sam_optax` is this skeleton with three small pieces plugged in::

    g --> policy: probe this step? --no--------------------------> fallback(g) --> out
              |yes
              v
          perturbation(g, w) --> e --> probe: g_p = grad_fn(w + e) --> combine(g, g_p) --> out

A combine may declare further probes (``Combine.probes``, GAM's three dependent
probes): it then calls ``ctx.evaluate(e)`` for the gradient at ``w + e``, which runs the
same probe path. This module is the only code in the library that calls ``grad_fn``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from sam_optax import _tree, _validate, _xla_cpu
from sam_optax.combines import probe_gradient
from sam_optax.pieces import Combine, Context, Perturbation, Policy
from sam_optax.policies import always

PyTree = Any
ScalarOrSchedule: TypeAlias = float | jax.Array | optax.Schedule


class SharpnessAwareState(NamedTuple):
    """State of every sharpness-aware transformation.

    Attributes:
      count: updates taken so far (int32); drives ``rho`` schedules.
      probes: updates that evaluated the probe gradient (int32), so that
        ``probes / count`` is the probe fraction of an efficient method.
      perturbation: the perturbation piece's state (e.g. VaSSO's EMA).
      combine: the combine piece's state (e.g. LookSAM's stored ``g_v``).
      policy: the policy piece's state (e.g. AE-SAM's statistics).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    probes: jax.Array
    perturbation: PyTree
    combine: PyTree
    policy: PyTree


def _missing(what: str, name: str) -> ValueError:
    return ValueError(
        f"sam_optax.{name}: `update` needs {what}. A sharpness-aware transformation "
        "evaluates the gradient a second time at perturbed parameters, so it needs "
        "the parameters and a function that returns the gradient of the SAME "
        "minibatch loss (same data, same dropout key) at any parameters:\n"
        "    grad_fn = lambda p: jax.grad(loss_fn)(p, batch)\n"
        "    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)\n"
        "If you did pass it, a wrapper between the call and this transformation dropped "
        "it (optax.lookahead does): see the recipe for optax.lookahead in the guide "
        "'Compositions' (docs/guides/compositions.md)."
    )


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _has_masked_nodes(tree: PyTree) -> bool:
    return any(_is_masked(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked))


def _part_of_model(name: str) -> ValueError:
    return ValueError(
        f"sam_optax.{name} sits inside optax.masked, optax.multi_transform or "
        "optax.partition, which hand it only part of the params, so `grad_fn` cannot be "
        "evaluated at w + e. Pass the whole params as the keyword argument `full_params`; "
        "the leaves of the other groups then keep their values in the probe and "
        "descend along their clean gradient:\n"
        "    tx.update(grads, opt_state, params, grad_fn=grad_fn, full_params=params)\n"
        "Or put the method in front of the whole model with `mask=` (the leaves it does "
        "not perturb then descend along the probe gradient, SAM-ON's rule)."
    )


def _fill(part: PyTree, full: PyTree) -> PyTree:
    """``full`` with the leaves that ``part`` holds (``part`` has MaskedNode elsewhere)."""
    return jax.tree.map(lambda p, f: f if _is_masked(p) else p, part, full, is_leaf=_is_masked)


def _prune(full: PyTree, part: PyTree) -> PyTree:
    """``full`` cut down to the leaves of ``part`` (MaskedNode where ``part`` has one)."""
    return jax.tree.map(lambda p, f: p if _is_masked(p) else f, part, full, is_leaf=_is_masked)


def _whole_params(params: PyTree, extra_args: dict, name: str) -> PyTree | None:
    """The ``full_params`` of ``update`` when ``params`` is part of the model, else None.

    Inside ``optax.masked`` (and its relatives) ``params`` holds ``MaskedNode`` for
    the other groups' leaves; without ``full_params`` a gradient cannot be taken of
    the whole model, and :func:`_part_of_model` says so.
    """
    full_params = extra_args.get("full_params")
    if full_params is None and _has_masked_nodes(params):
        raise _part_of_model(name)
    return full_params


def _on_whole_model(fn: Callable[[PyTree], PyTree], part: PyTree, full: PyTree | None) -> PyTree:
    """``fn(part)``; for a part of the model, ``fn`` of the whole params with ``part``'s
    leaves (:func:`_fill`), cut back to ``part``'s leaves (:func:`_prune`)."""
    return fn(part) if full is None else _prune(fn(_fill(part, full)), part)


def check_state(state: Any, expected: Any, name: str) -> None:
    """Raises a ``ValueError`` naming ``name`` unless ``state`` fits ``expected``.

    ``expected`` is ``jax.eval_shape`` of the transformation's ``init`` on the
    params of this update: a state from another method, or from ``init`` on
    other params, is refused before it meets any arithmetic.
    """
    want, got = jax.tree.structure(expected), jax.tree.structure(state)
    if want != got:
        raise ValueError(
            f"sam_optax.{name}: `state` is not this method's state: expected a "
            f"{type(expected).__name__} of structure {want}, got a "
            f"{type(state).__name__} of structure {got}. Pass the state that "
            f"sam_optax.{name}'s `init` returned (inside optax.chain, the chain's own state)."
        )
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, a), b in zip(paths, jax.tree.leaves(state), strict=True):
        shape, dtype = jnp.shape(b), jnp.result_type(b)
        if a.shape != shape or a.dtype != dtype:
            raise ValueError(
                f"sam_optax.{name}: `state` leaf {jax.tree_util.keystr(path)} has shape "
                f"{shape} and dtype {dtype} where the params of this update give "
                f"{a.shape} and {a.dtype}: the state was initialised for other params. "
                "Call `init` on the params that you update."
            )


def _check_probe(g_p: PyTree, like: PyTree, name: str) -> None:
    want, got = jax.tree.structure(like), jax.tree.structure(g_p)
    if want != got:
        raise ValueError(
            f"sam_optax.{name}: `grad_fn` must return a gradient with the structure of "
            f"the updates; expected {want}, got {got}."
        )
    for a, b in zip(jax.tree.leaves(like), jax.tree.leaves(g_p), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"sam_optax.{name}: `grad_fn` returned a leaf of shape {jnp.shape(b)} "
                f"where the updates have shape {jnp.shape(a)}."
            )


def _bounded(gradient_at: Callable[[PyTree], PyTree], limit: int, name: str) -> Callable:
    """``gradient_at`` for a combine that declared ``limit`` further probes, and no more."""
    calls = [0]

    def evaluate(e: PyTree) -> PyTree:
        calls[0] += 1
        if calls[0] > limit:
            raise ValueError(
                f"sam_optax.{name}: the combine evaluated more than the {limit} further "
                f"probe gradient(s) it declares in `Combine.probes`."
            )
        return gradient_at(e)

    return evaluate


def _select(pred: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def sharpness_aware(
    perturbation: Perturbation,
    combine: Combine | None = None,
    policy: Policy | None = None,
    *,
    rho: ScalarOrSchedule,
    eps: float | jax.Array = 1e-12,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    axis_name: str | None = None,
    name: str = "sharpness_aware",
    probe: Callable[[PyTree, Context], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Builds a sharpness-aware transformation from its three pieces.

    On a step where ``policy`` decides to probe:

    .. math::

        e = \mathrm{perturbation}(g, w), \qquad
        g_p = \mathrm{grad\_fn}(w + e), \qquad
        \mathrm{out} = \mathrm{combine}(g, g_p)

    and on a skipped step ``out = fallback(g)``; the probe sits in
    ``jax.lax.cond``, so a skipped step costs one gradient evaluation. A combine
    that declares ``probes = n`` (:class:`sam_optax.Combine`) may evaluate ``n``
    further probe gradients, each at ``w + e'`` for a displacement ``e'`` it
    computes from those before (``ctx.evaluate(e')``), through the same path
    as the first: mask, ``full_params``, the ``probe`` hook, dtype casts. With
    ``rho = 0`` the output is exactly ``g`` (the base optimizer's trajectory).
    Norms and dot products are accumulated in float32; the output has the dtype
    of the incoming updates. With ``axis_name`` the output is averaged over that
    mapped axis (``pmap``, ``shard_map``, ``vmap``).

    Args:
      perturbation: how to build ``e`` (e.g. :func:`normalized_gradient`).
      combine: what to descend along (default :func:`probe_gradient`).
      policy: when to probe (default: every step).
      rho: perturbation radius, a number or an optax schedule of the step count.
      eps: added to every norm that is divided by.
      mask: a pytree of booleans with the structure of the params, or a function
        of the params returning one; leaves marked ``False`` are not perturbed
        and do not enter the perturbation's norms.
      axis_name: a mapped axis name over which to average the output.
      name: the name used in error messages.
      probe: how to evaluate the probe gradient at ``w + e``, as
        ``(w_p, ctx) -> g_p`` with the structure of the updates; it reads what
        it needs from ``ctx.extra_args`` and raises a ``ValueError`` naming any
        argument that is missing. Default: ``grad_fn(w_p)``, and ``update``
        then requires ``grad_fn``. ESAM's data selection
        (:func:`sharpness_sensitive_data`) is such a probe.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``(updates, state, params, *, grad_fn, **extra_args)``.

    Examples:
      Adaptive perturbation with SAM's combine, as a custom method:

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> tx = optax.chain(
      ...     sam_optax.sharpness_aware(sam_optax.adaptive_perturbation(eta=0.01), rho=0.5),
      ...     optax.sgd(0.1))
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> loss = lambda p: jnp.sum(p["w"] ** 4)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
      ...                            grad_fn=jax.grad(loss))
      >>> updates["w"].shape
      (2,)

    Note:
      ``grad_fn(params) -> grads`` must evaluate the gradient of the same
      minibatch loss (same data, same dropout key) as the incoming ``updates``.

    Note:
      Non-finite input propagates, it is never replaced: a NaN or Inf in
      ``updates`` makes ``e`` non-finite, and one that ``grad_fn`` returns at
      ``w + e`` reaches the output directly. To skip such steps, wrap the whole
      chain in ``optax.apply_if_finite``: it checks the incoming gradient and,
      when it is not finite, returns zero updates and leaves every state
      unchanged. A gradient that is finite at ``w`` but not at ``w + e`` passes
      that check; it shows up in the updates (and in the loss of the next step).

    References:
      Foret et al., Sharpness-Aware Minimization for Efficiently Improving
      Generalization, ICLR 2021, https://arxiv.org/abs/2010.01412
    """
    combine = probe_gradient() if combine is None else combine
    policy = always() if policy is None else policy
    _validate.piece("perturbation", perturbation, Perturbation)
    _validate.piece("combine", combine, Combine)
    _validate.piece("policy", policy, Policy)
    _validate.integer("combine.probes", combine.probes, 0, static=True)
    _validate.non_negative("rho", rho)
    _validate.non_negative("eps", eps)
    _validate.mask(mask)
    _validate.axis_name(axis_name)
    static_rho = _tree.is_python_number(rho)

    def init_fn(params):
        _tree.resolve_mask(mask, params)  # a mask that does not fit fails here, not later
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            probes=jnp.zeros([], jnp.int32),
            perturbation=perturbation.init(params),
            combine=combine.init(params),
            policy=policy.init(params),
        )

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        if params is None:
            raise _missing("`params`", name)
        if probe is None and grad_fn is None:
            raise _missing("the keyword argument `grad_fn`", name)
        if grad_fn is not None and not callable(grad_fn):
            raise ValueError(
                f"sam_optax.{name}: `grad_fn` must be a function params -> grads, "
                f"got {grad_fn!r} of type {type(grad_fn).__name__}."
            )
        full_params = _whole_params(params, extra_args, name)
        check_state(state, jax.eval_shape(init_fn, params), name)
        floating = _tree.floating_flags(params)
        flags = [
            keep and f for keep, f in zip(_tree.resolve_mask(mask, params), floating, strict=True)
        ]
        g = _tree.as_float(updates, params, floating)
        rho_t = rho(state.count) if callable(rho) else rho
        ctx = Context(params, state.count, rho_t, eps, axis_name, extra_args, flags)

        def evaluate(w_p):
            if probe is None:
                return _on_whole_model(grad_fn, w_p, full_params)
            whole = ctx if full_params is None else ctx._replace(params=full_params)
            return _on_whole_model(lambda w: probe(w, whole), w_p, full_params)

        def shift(w, d, keep):
            return (w.astype(_tree.accum_dtype(w.dtype)) + d).astype(w.dtype) if keep else w

        def probe_branch(in_cond):
            def gradient_at(e):
                e = _tree.apply_mask(e, flags)
                w_leaves, treedef = jax.tree.flatten(params)
                w_p = treedef.unflatten(
                    [
                        shift(w, d, keep)
                        for w, d, keep in zip(
                            w_leaves, treedef.flatten_up_to(e), floating, strict=True
                        )
                    ]
                )
                # In a conditional branch XLA:CPU leaves autodiff's convolutions off its
                # fast path (see _xla_cpu); the rewrite keeps a probing step as fast there.
                g_p = _xla_cpu.canonical_convolutions(evaluate)(w_p) if in_cond else evaluate(w_p)
                _check_probe(g_p, updates, name)
                # A probe gradient in another float dtype (float64 under x64 for float32
                # params) is cast to g's dtype, so that both branches of a cond agree.
                return _tree.cast_like(_tree.as_float(g_p, params, floating), g)

            e, p_state = perturbation.perturb(_tree.apply_mask(g, flags), state.perturbation, ctx)
            g_p = gradient_at(e)
            c_ctx = ctx
            if combine.probes:  # a combine that takes further probes gets the same path
                c_ctx = ctx._replace(evaluate=_bounded(gradient_at, combine.probes, name))
            out, c_state = combine.combine(g, g_p, state.combine, c_ctx)
            return out, p_state, c_state

        def skip_branch(_):
            out, c_state = combine.fallback(g, state.combine, ctx)
            if not (static_rho and rho_t > 0):
                # rho = 0 is the base optimizer exactly, whatever the fallback says.
                out, c_state = _select(jnp.asarray(rho_t) > 0, (out, c_state), (g, state.combine))
            return out, state.perturbation, c_state

        take: bool | jax.Array
        if static_rho and rho_t == 0:
            take, policy_state = False, state.policy
        else:
            take, policy_state = policy.decide(g, state.policy, ctx)
            if not static_rho:
                take = jnp.logical_and(take, jnp.asarray(rho_t) > 0)

        if take is True:
            out, p_state, c_state = probe_branch(False)
        elif take is False:
            out, p_state, c_state = skip_branch(None)
        else:
            out, p_state, c_state = jax.lax.cond(
                take, lambda _: probe_branch(True), skip_branch, None
            )
        if axis_name is not None:
            out = jax.lax.pmean(out, axis_name)
        new_state = SharpnessAwareState(
            count=optax.safe_increment(state.count),
            probes=state.probes + jnp.asarray(take, jnp.int32),
            perturbation=p_state,
            combine=c_state,
            policy=policy_state,
        )
        return _tree.pass_through(out, updates, floating), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
