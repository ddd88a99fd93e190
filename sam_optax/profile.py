"""What a training step costs, read from its compiled program without running it."""

from __future__ import annotations

import functools
import itertools
import math
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# One HLO instruction whose opcode is a collective: `name = <result type> <opcode>(`.
# The synchronous op, or the `-done` half of an asynchronous pair; `-start` is skipped
# (its opcode is followed by `-start`, not by `(`).
_INSTRUCTION = re.compile(
    r"=\s*(?P<type>\((?:[^()]|\([^()]*\))*\)|\S+)\s+"
    rf"(?P<op>{'|'.join(COLLECTIVES)})(?:-done)?\("
)
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_BITS = {"pred": 8, "token": 0}


class CollectiveStats(NamedTuple):
    """How often one kind of collective appears in a compiled program, and its bytes.

    Attributes:
      count: the number of instructions of that kind in the program text.
      bytes: the sum of their result sizes on one device.
    """

    count: int  # type: ignore[assignment]  # shadows tuple.count, as in optax
    bytes: int


class StepProfile(NamedTuple):
    """The costs of one compiled step, as :func:`profile_step` reads them.

    Attributes:
      flops: XLA's count of floating-point operations of the program that one
        device runs (``None`` where the backend gives no cost analysis).
      temp_bytes: bytes of one device's temporary buffers (activations and
        everything else that lives during the step only).
      argument_bytes: bytes of one device's inputs (its shards of the inputs).
      output_bytes: bytes of one device's outputs.
      alias_bytes: bytes of outputs that reuse a donated input's buffer.
      collectives: for each kind in ``COLLECTIVES``, a :class:`CollectiveStats`.
      trace_s: wall-clock seconds to trace the Python function to a jaxpr.
      lower_s: wall-clock seconds to lower the jaxpr to StableHLO.
      compile_s: wall-clock seconds for XLA to compile it.
      trace_cpu_s: CPU seconds of this process (all its threads) while tracing;
        on a machine shared with other work it is the steadier measure.
      lower_cpu_s: likewise while lowering.
      compile_cpu_s: likewise while compiling.
    """

    flops: float | None
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    collectives: dict[str, CollectiveStats]
    trace_s: float
    lower_s: float
    compile_s: float
    trace_cpu_s: float
    lower_cpu_s: float
    compile_cpu_s: float


def _type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO result type: an array ``f32[8,16]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(hlo_type):
        bits = _BITS.get(dtype)
        if bits is None:
            width = re.search(r"\d+", dtype)
            bits = int(width.group()) if width else 8
        total += math.ceil(bits * math.prod(int(d) for d in dims.split(",") if d) / 8)
    return total


def collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    r"""Counts the collectives of an HLO module's text, by kind.

    Every instruction whose opcode is one of ``COLLECTIVES`` counts once: the
    synchronous instruction, or the ``-done`` half of an asynchronous
    ``-start``/``-done`` pair; an operation wrapped in an ``async-start`` is
    counted in the computation that it wraps. Its bytes are the size of its
    result on one device (for a tuple, the sum of the elements). The count is
    static: an instruction inside a loop body or a conditional branch counts
    once, however often it runs.

    Args:
      hlo_text: the text of an HLO module, e.g. ``jax.jit(f).lower(...).compile().as_text()``.

    Returns:
      A dict from each kind in ``COLLECTIVES`` to a :class:`CollectiveStats`
      (zeros for the kinds that do not occur).

    Examples:
      >>> from sam_optax.profile import collectives
      >>> hlo = '''
      ...   %a = f32[8,16]{1,0} all-gather(f32[1,16]{1,0} %p), dimensions={0}
      ...   %s = (f32[], f32[4]{0}) all-reduce(f32[] %x, f32[4]{0} %y), to_apply=%add
      ...   %t = f32[4]{0} all-reduce-start(f32[4]{0} %z), to_apply=%add
      ...   %d = f32[4]{0} all-reduce-done(f32[4]{0} %t)
      ... '''
      >>> stats = collectives(hlo)
      >>> stats["all-gather"], stats["all-reduce"]
      (CollectiveStats(count=1, bytes=512), CollectiveStats(count=2, bytes=36))

    References:
      OpenXLA, Operation semantics (the collective operations of HLO),
      https://openxla.org/xla/operation_semantics
    """
    found: dict[str, list[int]] = {kind: [0, 0] for kind in COLLECTIVES}
    for match in _INSTRUCTION.finditer(hlo_text):
        entry = found[match["op"]]
        entry[0] += 1
        entry[1] += _type_bytes(match["type"])
    return {kind: CollectiveStats(count, size) for kind, (count, size) in found.items()}


def profile_step(step_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StepProfile:
    r"""Traces, lowers and compiles ``step_fn`` for the given inputs, and reads its costs.

    Nothing is run and nothing is allocated for the inputs: give
    ``jax.ShapeDtypeStruct`` leaves (with a ``sharding=`` to place them on a mesh),
    for example from ``jax.eval_shape``. The figures:

    - ``flops``: ``compiled.cost_analysis()["flops"]``, the floating-point
      operations of the program one device runs;
    - ``temp_bytes``, ``argument_bytes``, ``output_bytes``, ``alias_bytes``:
      ``compiled.memory_analysis()``, per device;
    - ``collectives``: :func:`collectives` of the compiled (optimized, per-device)
      HLO text;
    - ``trace_s``, ``lower_s``, ``compile_s``: wall-clock seconds of
      ``jit(...).trace(*args)``, ``.lower()`` and ``.compile()``, and
      ``trace_cpu_s``, ``lower_cpu_s``, ``compile_cpu_s``: the CPU seconds this
      process spent in each (``time.process_time``).

    Args:
      step_fn: a function, wrapped here in a fresh ``jax.jit`` so that its trace
        is timed from scratch, or a ``jax.jit``-wrapped function, used with its own
        options (static arguments, shardings, donation); JAX serves such a
        function's trace from its cache when it was traced before with the same
        argument types, and ``trace_s`` is then close to 0.
      *args: the positional arguments of ``step_fn``: arrays or
        ``jax.ShapeDtypeStruct`` (pytrees of them).
      **kwargs: its keyword arguments, likewise.

    Returns:
      A :class:`StepProfile`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1))
      >>> loss = lambda w, x: jnp.mean((x @ w) ** 2)
      >>> def step(w, state, x):
      ...     g = jax.grad(loss)(w, x)
      ...     u, state = tx.update(g, state, w, grad_fn=lambda v: jax.grad(loss)(v, x))
      ...     return optax.apply_updates(w, u), state
      >>> w = jax.ShapeDtypeStruct((256, 128), jnp.float32)
      >>> x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
      >>> profile = sam_optax.profile_step(step, w, jax.eval_shape(tx.init, w), x)
      >>> profile.argument_bytes >= 4 * (256 * 128 + 64 * 256)
      True
      >>> profile.collectives["all-reduce"].count  # one device: no collectives
      0

    References:
      JAX, Ahead-of-time lowering and compilation,
      https://docs.jax.dev/en/latest/aot.html
    """
    if not callable(step_fn):
        raise ValueError(
            f"sam_optax.profile_step: `step_fn` must be a function, got {step_fn!r} "
            f"of type {type(step_fn).__name__}."
        )
    if hasattr(step_fn, "trace") and hasattr(step_fn, "lower"):
        jitted = step_fn
    else:

        @functools.wraps(step_fn)
        def fresh(*a, **k):  # a new function: JAX's trace cache cannot serve it
            return step_fn(*a, **k)

        jitted = jax.jit(fresh)
    clocks = [(time.perf_counter(), time.process_time())]
    traced = jitted.trace(*args, **kwargs)
    clocks.append((time.perf_counter(), time.process_time()))
    lowered = traced.lower()
    clocks.append((time.perf_counter(), time.process_time()))
    compiled = lowered.compile()
    clocks.append((time.perf_counter(), time.process_time()))
    (trace_s, trace_cpu_s), (lower_s, lower_cpu_s), (compile_s, compile_cpu_s) = (
        (after[0] - before[0], after[1] - before[1]) for before, after in itertools.pairwise(clocks)
    )
    costs = compiled.cost_analysis()
    if isinstance(costs, list | tuple):  # older JAX: one dict per program
        costs = costs[0] if costs else None
    flops = None if not costs or "flops" not in costs else float(costs["flops"])
    memory = compiled.memory_analysis()

    def size(field: str) -> int:
        return 0 if memory is None else int(getattr(memory, field))

    return StepProfile(
        flops=flops,
        temp_bytes=size("temp_size_in_bytes"),
        argument_bytes=size("argument_size_in_bytes"),
        output_bytes=size("output_size_in_bytes"),
        alias_bytes=size("alias_size_in_bytes"),
        collectives=collectives(compiled.as_text()),
        trace_s=trace_s,
        lower_s=lower_s,
        compile_s=compile_s,
        trace_cpu_s=trace_cpu_s,
        lower_cpu_s=lower_cpu_s,
        compile_cpu_s=compile_cpu_s,
    )
