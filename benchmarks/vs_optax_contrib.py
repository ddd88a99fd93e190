"""``sam_optax.sam`` against ``optax.contrib.sam``, the other SAM of the JAX ecosystem.

The same SAM step (the registry's ``rho``, SGD with momentum behind it) three ways, side by side
in one process with ERM: ``sam_optax.sam`` from the registry; ``optax.contrib.sam`` in
opaque mode (one ``update`` call per SAM step that calls ``grad_fn(params, i)``); and
``optax.contrib.sam`` in its default transparent mode, where a SAM step is two training
steps (an adversarial one and an outer one), each with its own gradient. Targets:
``sam_optax.sam`` at most 1.02x opaque mode, and faster than transparent mode per SAM
step. The optimizer-state bytes of each are given too.

Usage: ``python benchmarks/vs_optax_contrib.py [--quick] [--record]``.
"""

from __future__ import annotations

import harness
import optax

RHO = harness.registry.METHODS["sam"].defaults["rho"]  # the same SAM as the registry's
# Four contenders against a 1.02x target: more rounds than the step-time table's.
ROUNDS_FACTOR = 3


def contrib_sam(opaque: bool) -> optax.GradientTransformation:
    """``optax.contrib.sam`` with SAM's normalised-gradient ascent of radius ``RHO``."""
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(RHO))
    tx = optax.contrib.sam(harness.base_optimizer(), adversary, opaque_mode=opaque)
    return optax.with_extra_args_support(tx)


def _opaque_args(inputs: harness.StepInputs) -> dict:
    return {"grad_fn": lambda p, i: inputs.grad_fn(p)}


def _transparent_args(inputs: harness.StepInputs) -> dict:
    return {}


def measure(model: harness.Model) -> list[list[str]]:
    """The rows of one model."""
    harness.progress(f"vs_optax_contrib: {model.key}")
    sam = next(c for c in harness.registry_contenders() if c.label == "sam")
    opaque = harness.Contender(
        "optax.contrib.sam (opaque)", "sam", lambda n: contrib_sam(True), "2"
    )
    transparent = harness.Contender(
        "optax.contrib.sam (transparent)", "sam", lambda n: contrib_sam(False), "2"
    )
    setups = [
        ("sgd (ERM)", harness.erm_contender(), harness.library_update_args, 1),
        ("sam_optax.sam", sam, harness.library_update_args, 1),
        (opaque.label, opaque, _opaque_args, 1),
        (transparent.label, transparent, _transparent_args, 2),
    ]
    runners, state_bytes = [], {}
    for label, contender, args, calls in setups:
        built = harness.build(model, contender, args)
        state_bytes[label] = harness.tree_bytes(built.tx.init(model.init()[0]))
        runners.append(harness.Runner(label, model, built, calls))
    reference = next(r for r in runners if r.label == opaque.label)
    others = [r for r in runners if r is not reference]
    times = harness.paired_times(reference, others, ROUNDS_FACTOR * model.rounds)
    erm = times["sgd (ERM)"].ratio
    ours, t_transparent = times["sam_optax.sam"].ratio, times[transparent.label].ratio
    rows = []
    for label, _, _, _ in setups:
        t = times[label]
        target, verdict = "—", "—"
        if label == "sam_optax.sam":
            target = "≤ 1.02x opaque, < transparent"
            verdict = "pass" if ours <= 1.02 and ours < t_transparent else "FAIL"
        rows.append(
            [
                model.title,
                f"`{label}`",
                f"{1e3 * t.seconds:.3f}",
                f"{t.ratio / erm:.2f}x",
                f"{t.ratio:.2f}x",
                f"{state_bytes[label] / 1024:.1f}",
                target,
                verdict,
            ]
        )
    return rows


def run(quick: bool) -> list[harness.Section]:
    """Measures every model."""
    model_list = harness.models(quick)
    header = ["model", "optimizer", "ms / SAM step", "vs ERM", "vs opaque", "state KiB"]
    header += ["target", "pass"]
    rows = [row for m in model_list for row in measure(m)]
    body = harness.markdown_table(header, rows)
    body += (
        "\n\nTime per SAM step (for transparent mode: the two training steps that make "
        "one SAM step), median over rounds. Each optimizer runs right after opaque mode in "
        "every round; `vs opaque` is the median over rounds of its time divided by opaque "
        "mode's just before, and `vs ERM` divides that by ERM's (the base optimizer alone)."
    )
    return [harness.section("vs_optax_contrib", "Against optax.contrib.sam", quick, body)]


if __name__ == "__main__":
    harness.main(run, __doc__.splitlines()[0], None)
