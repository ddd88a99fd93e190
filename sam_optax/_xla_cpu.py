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
traces a function and copies its jaxpr with every convolution expressed as
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

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore

PyTree = Any


def _canonical_equations(eqn: jcore.JaxprEqn) -> list[jcore.JaxprEqn]:
    """A convolution equation as a transpose of each operand, a convolution with
    canonical dimension numbers and a transpose back into the original output."""
    dims = eqn.params["dimension_numbers"]
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

    def equation(invars, primitive, params, outvars=None):
        avals, effects = primitive.abstract_eval(*(v.aval for v in invars), **params)
        outvars = outvars or [jcore.Var(avals)]
        return outvars[0], jcore.new_jaxpr_eqn(
            invars, outvars, primitive, params, effects, eqn.source_info, eqn.ctx
        )

    lhs, lhs_eqn = equation([eqn.invars[0]], lax.transpose_p, {"permutation": lhs_order})
    rhs, rhs_eqn = equation([eqn.invars[1]], lax.transpose_p, {"permutation": rhs_order})
    params = {**eqn.params, "dimension_numbers": canonical}
    out, conv_eqn = equation([lhs, rhs], lax.conv_general_dilated_p, params)
    back = tuple(int(i) for i in np.argsort(out_order))
    _, out_eqn = equation([out], lax.transpose_p, {"permutation": back}, eqn.outvars)
    return [lhs_eqn, rhs_eqn, conv_eqn, out_eqn]


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


def _rewritten(jaxpr: jcore.Jaxpr) -> jcore.Jaxpr:
    """``jaxpr`` with its convolutions (and those of nested ``jit`` calls) canonical.

    Built equation by equation from the traced jaxpr: nothing is traced or bound
    again, so the CPU variant costs the trace next to nothing.
    """
    eqns: list[jcore.JaxprEqn] = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is lax.conv_general_dilated_p:
            eqns.extend(_canonical_equations(eqn))
        elif _inlinable(eqn) and _rewrites(eqn.params["jaxpr"].jaxpr):
            inner = eqn.params["jaxpr"]
            inner = jcore.ClosedJaxpr(_rewritten(inner.jaxpr), inner.consts)
            eqns.append(eqn.replace(params={**eqn.params, "jaxpr": inner}))
        else:
            eqns.append(eqn)
    return jaxpr.replace(eqns=eqns)


def _rewrites(jaxpr: jcore.Jaxpr) -> bool:
    """Whether :func:`_rewritten` would rewrite a convolution of ``jaxpr``."""
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
    jitted = jax.jit(fn)
    # Traced here, the call below is served from jit's cache: tracing ``fn`` under
    # ``make_jaxpr`` itself took 40 % longer (a ViT-B/16 probe: 0.7 s against 0.5 s).
    jitted.trace(*args)
    closed, shape = jax.make_jaxpr(
        lambda *leaves: jitted(*jax.tree.unflatten(tree, leaves)), return_shape=True
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
            canonical = jcore.jaxpr_as_fun(
                jcore.ClosedJaxpr(_rewritten(closed.jaxpr), closed.consts)
            )
            outs = lax.platform_dependent(*flat, cpu=canonical, default=as_is)
        else:
            outs = as_is(*flat)
        return jax.tree.unflatten(out_tree, outs)

    return run
