"""Keeps the convolutions of a probe inside ``lax.cond`` on XLA:CPU's fast path.

XLA:CPU runs a convolution with Eigen only when its dimension numbers are
canonical (input ``N...C``, kernel ``...IO``, output ``N...C``). Its
``ConvCanonicalization`` pass rewrites the other convolutions by transposing
their operands, but it visits the entry computation only. A convolution inside a
conditional branch keeps its dimension numbers; the weight- and input-gradient
convolutions that JAX's autodiff emits are not canonical, so they fall back to
XLA's naive loop emitter. On the MNIST-1D CNN of the benchmarks this made a
probing step inside ``lax.cond`` 4x slower than the same step without the
conditional.

:func:`canonical_convolutions` does the pass's rewrite at the jaxpr level: it
traces a function and re-evaluates its jaxpr with every convolution expressed as
a transpose, a canonical convolution and a transpose back. The arithmetic is the
same (the transposes only relabel dimensions). The function is traced once; when
its jaxpr holds a convolution, the rewritten copy of that jaxpr is staged with
``lax.platform_dependent``, so only CPU programs contain it, and a function
without convolutions is staged as it is.
Convolutions inside nested jitted functions are rewritten too; those inside other
higher-order primitives (``scan``, ``while``, ``remat``, custom derivatives) are
left as they are, and so is the kernel gradient of a grouped convolution
(``batch_group_count > 1``), which XLA expands into a new convolution after the
rewrite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore

PyTree = Any


def _canonical_convolution(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """``conv_general_dilated`` with canonical dimension numbers, transposing around it."""
    dims = params["dimension_numbers"]
    n = len(dims.lhs_spec)
    spatial = tuple(range(1, n - 1))
    lhs_order = (dims.lhs_spec[0], *dims.lhs_spec[2:], dims.lhs_spec[1])
    rhs_order = (*dims.rhs_spec[2:], dims.rhs_spec[1], dims.rhs_spec[0])
    out_order = (dims.out_spec[0], *dims.out_spec[2:], dims.out_spec[1])
    canonical = lax.ConvDimensionNumbers(
        lhs_spec=(0, n - 1, *spatial),
        rhs_spec=(n - 1, n - 2, *range(n - 2)),
        out_spec=(0, n - 1, *spatial),
    )
    out = lax.conv_general_dilated_p.bind(
        lax.transpose(lhs, lhs_order),
        lax.transpose(rhs, rhs_order),
        **{**params, "dimension_numbers": canonical},
    )
    return lax.transpose(out, tuple(int(i) for i in np.argsort(out_order)))


def _inlinable(eqn: jcore.JaxprEqn) -> bool:
    """A nested ``jit`` (``pjit`` before JAX 0.7) with no shardings, layouts or options."""
    if eqn.primitive.name not in ("jit", "pjit"):
        return False
    params = eqn.params
    shardings = (*params["in_shardings"], *params["out_shardings"])
    layouts = (*params.get("in_layouts", ()), *params.get("out_layouts", ()))
    return (
        not any(isinstance(s, jax.sharding.Sharding) for s in shardings)
        and all(layout is None for layout in layouts)
        and not params.get("compiler_options_kvs")
    )


def _evaluate(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive is lax.conv_general_dilated_p:
            outvals = [_canonical_convolution(*invals, **eqn.params)]
        elif _inlinable(eqn):
            inner = eqn.params["jaxpr"]
            outvals = _evaluate(inner.jaxpr, inner.consts, invals)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns = ()
            if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
                subfuns, bind_params = bind_params
            outvals = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outvals = [outvals]
        env.update(zip(eqn.outvars, outvals, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _rewrites(jaxpr: jcore.Jaxpr) -> bool:
    """Whether :func:`_evaluate` would rewrite a convolution of ``jaxpr``."""
    return any(
        eqn.primitive is lax.conv_general_dilated_p
        or (_inlinable(eqn) and _rewrites(eqn.params["jaxpr"].jaxpr))
        for eqn in jaxpr.eqns
    )


def _staged(fn: Callable[..., PyTree], *args: Any) -> tuple[jcore.ClosedJaxpr, list, Any]:
    """One trace of ``fn(*args)``, as a call of ``jax.jit(fn)``.

    Returns the jaxpr of that call (one ``jit`` equation, whose own jaxpr takes the
    values ``fn`` closes over as explicit operands), the flat arguments and the
    output tree.
    """
    flat, tree = jax.tree.flatten(args)
    closed, shape = jax.make_jaxpr(
        lambda *leaves: jax.jit(fn)(*jax.tree.unflatten(tree, leaves)), return_shape=True
    )(*flat)
    return closed, flat, jax.tree.structure(shape)


def canonical_convolutions(fn: Callable[..., PyTree]) -> Callable[..., PyTree]:
    """``fn`` with its convolutions in canonical form when lowered for CPU.

    ``fn`` is traced once, as a nested ``jax.jit``. When its jaxpr holds no
    convolution that the rewrite would change, that call is all the program
    contains. Otherwise the CPU variant is built from the same jaxpr (no second
    trace of ``fn``) and the two are staged with ``lax.platform_dependent``.

    Args:
      fn: a function of arrays (pytrees) that JAX can trace.

    Returns:
      A function with the same signature and the same results; in a CPU program
      every convolution of ``fn`` at the top level of its jaxpr (or inside a
      nested ``jit``) has canonical dimension numbers, so XLA:CPU runs it with
      Eigen even inside a conditional branch. Other platforms get ``fn`` as is.
    """

    def run(*args):
        closed, flat, out_tree = _staged(fn, *args)
        as_is = jcore.jaxpr_as_fun(closed)  # binds the one `jit` equation: no new trace
        if _rewrites(closed.jaxpr):
            canonical = lambda *leaves: _evaluate(closed.jaxpr, closed.consts, leaves)  # noqa: E731
            outs = lax.platform_dependent(*flat, cpu=canonical, default=as_is)
        else:
            outs = as_is(*flat)
        return jax.tree.unflatten(out_tree, outs)

    return run
