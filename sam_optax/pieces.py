"""The three kinds of pluggable piece, and the context each one sees.

A sharpness-aware method is :func:`sam_optax.sharpness_aware` with a
:class:`Perturbation` (how to climb), a :class:`Combine` (what to descend along)
and a :class:`Policy` (when to probe). Each piece keeps its own state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

PyTree = Any


class Context(NamedTuple):
    """What a piece may read while one update runs.

    Attributes:
      params: the unperturbed parameters ``w``.
      count: the number of updates taken before this one (int32 scalar).
      rho: the perturbation radius for this step (a schedule already evaluated).
      eps: the constant added to every norm that is divided by.
      axis_name: the mapped axis over which the output is averaged, or ``None``.
      extra_args: every other keyword argument given to ``update``.
      mask: one Python bool per leaf of the params (``True``: perturbed), or
        ``None`` for every leaf; a combine that takes norms or dot products
        restricts them to these leaves.
      evaluate: in the ``combine`` of a piece that declares further probes
        (:attr:`Combine.probes`), ``e -> g_p``: the probe gradient at ``w + e``
        for a displacement ``e`` with the structure of ``g``, evaluated
        through the skeleton's own probe path (mask, ``full_params``, the
        ``probe`` hook, dtype casts) and returned in ``g``'s dtypes; at most
        ``Combine.probes`` calls per step. ``None`` everywhere else.
    """

    params: PyTree
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    rho: jax.Array | float
    eps: jax.Array | float
    axis_name: str | None
    extra_args: dict[str, Any]
    mask: list[bool] | None = None
    evaluate: Callable[[PyTree], PyTree] | None = None


class Perturbation(NamedTuple):
    """How to climb: builds ``e`` from the (masked, float32) gradient.

    Attributes:
      init: ``params -> state`` of the piece.
      perturb: ``(g, state, ctx) -> (e, new_state)``; ``g`` holds zeros on the
        leaves that the mask excludes, and ``e`` has the structure of ``g``.
    """

    init: Callable[[PyTree], PyTree]
    perturb: Callable[[PyTree, PyTree, Context], tuple[PyTree, PyTree]]


class Combine(NamedTuple):
    """What to descend along, on a probing step and on a skipped one.

    Attributes:
      init: ``params -> state`` of the piece.
      combine: ``(g, g_p, state, ctx) -> (out, new_state)`` on a probing step,
        with ``g_p`` the probe gradient ``grad_fn(w + e)``.
      fallback: ``(g, state, ctx) -> (out, new_state)`` on a step that a policy
        skips (one gradient evaluation only).
      probes: how many further probe gradients ``combine`` may take, each by
        calling ``ctx.evaluate(e)`` (GAM's combine takes two, at points that
        depend on ``g_p``); 0 for a combine of ``g`` and ``g_p`` alone, whose
        ``ctx.evaluate`` is then ``None``.
    """

    init: Callable[[PyTree], PyTree]
    combine: Callable[[PyTree, PyTree, PyTree, Context], tuple[PyTree, PyTree]]
    fallback: Callable[[PyTree, PyTree, Context], tuple[PyTree, PyTree]]
    probes: int = 0


class Policy(NamedTuple):
    """When to probe.

    Attributes:
      init: ``params -> state`` of the piece.
      decide: ``(g, state, ctx) -> (probe, new_state)``; ``probe`` is a Python
        ``True`` (always probe, no ``lax.cond`` is built) or a boolean scalar
        array that must be identical on every device.
    """

    init: Callable[[PyTree], PyTree]
    decide: Callable[[PyTree, PyTree, Context], tuple[bool | jax.Array, PyTree]]


def empty_init(params: PyTree) -> optax.EmptyState:
    """The state of a stateless piece."""
    del params
    return optax.EmptyState()
