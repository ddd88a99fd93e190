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
same (the transposes only relabel dimensions). The rewrite is
staged with ``lax.platform_dependent``, so only CPU programs contain it.
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


def _rewritten(fn: Callable[..., PyTree]) -> Callable[..., PyTree]:
    def run(*args):
        flat, tree = jax.tree.flatten(args)
        closed, shape = jax.make_jaxpr(
            lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)), return_shape=True
        )(*flat)
        outs = _evaluate(closed.jaxpr, closed.consts, flat)
        return jax.tree.unflatten(jax.tree.structure(shape), outs)

    return run


def canonical_convolutions(fn: Callable[..., PyTree]) -> Callable[..., PyTree]:
    """``fn`` with its convolutions in canonical form when lowered for CPU.

    Args:
      fn: a function of arrays (pytrees) that JAX can trace.

    Returns:
      A function with the same signature and the same results; in a CPU program
      every convolution of ``fn`` at the top level of its jaxpr (or inside a
      nested ``jit``) has canonical dimension numbers, so XLA:CPU runs it with
      Eigen even inside a conditional branch. Other platforms get ``fn`` as is.
    """
    rewritten = _rewritten(fn)

    def run(*args):
        return lax.platform_dependent(*args, cpu=rewritten, default=fn)

    return run
