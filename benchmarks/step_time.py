"""Step time of every method relative to ERM, and the cost of the efficient methods.

For each model, ERM (the base optimizer alone), every method of the registry and the
efficient configurations of issue 5 run side by side in one process (see
``harness``). Two sections come out: the step time of every registered method on every
model (target: a two-gradient method costs at most 2.05x ERM), and the efficient methods
on the MLP and the MNIST-1D CNN with their measured probe fraction (targets: LookSAM
``k = 5`` and SAM every 5 steps at most 1.3x, ESAM ``gamma = 0.5`` at most 1.75x, AE-SAM at
most 1.1 + its probe fraction).

Usage: ``python benchmarks/step_time.py [--quick] [--record]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import harness

from sam_optax._state import probe_fraction

EFFICIENT_MODELS = ("mlp", "cnn1d")


def measure(model: harness.Model, contenders: Sequence[harness.Contender]) -> dict:
    """``label -> (ms per step, ratio to ERM, probe fraction)`` for one model."""
    reference = harness.erm_contender()
    erm = harness.Runner(reference.label, model, harness.build(model, reference))
    runners = [harness.Runner(c.label, model, harness.build(model, c)) for c in contenders]
    times = harness.paired_times(erm, runners, model.rounds)
    return {
        r.label: (1e3 * times[r.label].seconds, times[r.label].ratio, probe_fraction(r.carry[2]))
        for r in [erm, *runners]
    }


def run(quick: bool) -> list[harness.Section]:
    """Measures every model and returns the two sections."""
    methods = harness.registry_contenders()
    efficient, missing = harness.efficient_contenders()
    labels = {c.label for c in methods}
    extra = [c for c in efficient if c.label not in labels]
    results = {}
    for model in harness.models(quick):
        contenders = methods + (extra if model.key in EFFICIENT_MODELS else [])
        harness.progress(f"step_time: {model.key}, {len(contenders) + 1} contenders")
        results[model.key] = measure(model, contenders)
    model_list = harness.models(quick)
    return [
        _step_time_section(quick, model_list, methods, results),
        _efficient_section(quick, model_list, efficient, missing, results),
    ]


def _step_time_section(quick, model_list, methods, results) -> harness.Section:
    header = ["method", "grads / step", *[m.title for m in model_list], "target", "pass"]
    erm = harness.erm_contender().label
    rows = [
        [
            "ERM (ms / step)",
            "1",
            *[f"{results[m.key][erm][0]:.3f} ms" for m in model_list],
            "—",
            "—",
        ]
    ]
    for c in methods:
        ratios = [results[m.key][c.label][1] for m in model_list]
        bound = None if c.target is None else c.target(0.0)
        verdicts = {harness.verdict(r, bound) for r in ratios}
        rows.append(
            [
                f"`{c.label}`",
                c.grads_per_step,
                *[f"{r:.2f}x" for r in ratios],
                c.target_text,
                "FAIL" if "FAIL" in verdicts else verdicts.pop(),
            ]
        )
    body = (
        harness.markdown_table(header, rows)
        + f"\n\nMedian over rounds of a contender's time for {harness.CHUNK} steps divided by "
        f"ERM's (the same step, base optimizer alone) for the {harness.CHUNK} steps run just "
        "before it, in one process; `pass` when every model meets the target. The `sgd` row "
        "is ERM timed as a separate contender (the noise floor)."
    )
    return harness.section("step_time", "Step time relative to ERM", quick, body)


def _efficient_section(quick, model_list, efficient, missing, results) -> harness.Section:
    header = ["model", "method", "grads / step", "ms / step", "ratio to ERM", "probe fraction"]
    header += ["target", "pass"]
    rows = []
    for m in model_list:
        if m.key not in EFFICIENT_MODELS:
            continue
        for c in efficient:
            ms, ratio, fraction = results[m.key][c.label]
            bound = None if c.target is None else c.target(fraction)
            rows.append(
                [
                    m.title,
                    f"`{c.label}`",
                    c.grads_per_step,
                    f"{ms:.3f}",
                    f"{ratio:.2f}x",
                    f"{fraction:.2f}",
                    c.target_text,
                    harness.verdict(ratio, bound),
                ]
            )
    body = harness.markdown_table(header, rows) if rows else "No efficient method to measure."
    body += (
        "\n\nThe efficient methods against ERM, from the same runs as the step-time table; "
        "the probe fraction is `probes / count` from the method's state over the whole run. "
        "`p` in a target is that fraction."
    )
    if missing:
        body += f"\n\nNot in the library yet: {', '.join(missing)}."
    return harness.section("efficient_cost", "Cost of the efficient methods", quick, body)


if __name__ == "__main__":
    harness.main(run, __doc__.splitlines()[0], None)
