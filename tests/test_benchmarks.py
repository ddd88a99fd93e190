"""The benchmark scripts keep working: structure of their tables, never their timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from sam_optax import registry
from sam_optax._state import probe_fraction

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402
import step_time  # noqa: E402

SECTIONS = ("step_time", "efficient_cost", "vs_optax_contrib", "memory")


def _section(text: str, name: str) -> str:
    match = re.search(rf"<!-- BEGIN {name}-(\w+) -->(.*?)<!-- END {name}-\1 -->", text, re.DOTALL)
    assert match, f"section {name} missing"
    return match.group(2)


def _check_tables(text: str) -> None:
    """Every row of every Markdown table has as many cells as its header."""
    for block in re.split(r"\n\s*\n", text):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len(rows) >= 3, block
            assert len({row.count("|") for row in rows}) == 1, block


def test_record_replaces_only_its_own_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nHand-written text.\n")
    harness.record(
        readme, [harness.Section("a-cpu", "first A"), harness.Section("b-cpu", "section b")]
    )
    harness.record(readme, [harness.Section("a-cpu", "second A")])
    harness.record(readme, [harness.Section("a-gpu", "A on GPU")])
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written text.\n")
    assert "first A" not in text and text.count("second A") == 1
    assert text.index("second A") < text.index("section b") < text.index("A on GPU")
    assert text.count("<!-- BEGIN a-cpu -->") == 1 and text.count("<!-- END b-cpu -->") == 1


def test_probe_fraction_finds_the_nested_state():
    params = {"w": jnp.ones(3)}
    tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
    state = tx.init(params)
    assert probe_fraction(state) == 0.0
    grad_fn = lambda p: p  # noqa: E731
    for _ in range(2):
        _, state = tx.update(params, state, params, grad_fn=grad_fn)
    assert probe_fraction(state) == 1.0
    assert probe_fraction(optax.sgd(0.1).init(params)) == 0.0


def _every(k):
    def decide(g, state, ctx):
        return ctx.count % k == 0, state

    return sam_optax.Policy(lambda params: optax.EmptyState(), decide)


def _fake_looksam(rho=0.1, k=3):
    """SAM every k steps, standing in for a method that lands later."""
    return sam_optax.sharpness_aware(sam_optax.normalized_gradient(), policy=_every(k), rho=rho)


def _fake_esam(rho=0.05, gamma=1.0):
    """SAM that insists on ESAM's extra arguments, standing in for ESAM."""
    inner = sam_optax.sam(rho)

    def update(updates, state, params=None, *, per_example_loss_fn, batch, losses, **extra):
        assert per_example_loss_fn(params, batch).shape == losses.shape
        return inner.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update)


@pytest.mark.slow
def test_a_newly_registered_method_is_benchmarked_with_its_probe_fraction(monkeypatch):
    methods = {
        "sgd": registry.METHODS["sgd"],
        "looksam": registry.Method("looksam", _fake_looksam, {"rho": 0.1}, "test", "1 + 1/k"),
        "esam": registry.Method("esam", _fake_esam, {"rho": 0.05}, "test", "1 + gamma"),
    }
    monkeypatch.setattr(registry, "METHODS", methods)
    efficient, missing = harness.efficient_contenders()
    assert [c.label for c in efficient] == ["looksam (k=5)", "esam (gamma=0.5)"]
    assert missing == ["sam every 5", "ae_sam", "sam bernoulli(0.2)"]
    (model,) = harness.models(quick=True)
    steps = harness.total_steps(model)
    times, efficient_cost = (s.markdown for s in step_time.run(quick=True))
    for name in methods:
        assert f"| `{name}` |" in times
    rows = {line.split(" | ")[1]: line for line in efficient_cost.splitlines() if "| MLP |" in line}
    assert set(rows) == {"`looksam (k=5)`", "`esam (gamma=0.5)`"}
    # The probe fraction comes from the method's state: LookSAM with k = 5 probes on
    # steps 0, 5, 10, ... of the run; the fake ESAM probes every step.
    assert f"| {len(range(0, steps, 5)) / steps:.2f} | ≤ 1.3x |" in rows["`looksam (k=5)`"]
    assert "| 1.00 | ≤ 1.75x |" in rows["`esam (gamma=0.5)`"]
    assert "Not in the library yet: sam every 5, ae_sam, sam bernoulli(0.2)." in efficient_cost


@pytest.mark.slow
def test_quick_run_all_records_every_method(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nKept.\n")
    checked_in = (BENCHMARKS / "README.md").read_text()
    command = [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--record"]
    out = subprocess.run(
        [*command, "--readme", str(readme)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (BENCHMARKS / "README.md").read_text() == checked_in
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nKept.\n")
    for name in SECTIONS:
        body = _section(text, name)
        assert "Device: " in body and "jax " in body and "sam_optax " in body
        _check_tables(body)
        assert body.strip() in out.stdout
        assert name == "efficient_cost" or "|---|" in body
    for name in registry.METHODS:
        assert f"| `{name}` |" in _section(text, "step_time")
        assert f"| `{name}` |" in _section(text, "memory")
    contrib = _section(text, "vs_optax_contrib")
    for label in ("sam_optax.sam", "optax.contrib.sam (opaque)", "optax.contrib.sam (transparent)"):
        assert f"`{label}`" in contrib


def test_checked_in_readme_has_each_heading_and_section_once():
    """Hand edits around the generated sections leave no duplicated prose behind."""
    text = (BENCHMARKS / "README.md").read_text()
    lines = text.splitlines()
    headings = [line for line in lines if line.startswith("#")]
    assert len(headings) == len(set(headings)), headings
    paragraphs = [
        p.strip()
        for p in re.split(r"\n\s*\n", text)
        if len(p.strip()) > 80 and not p.startswith("Device: ")
    ]
    assert len(paragraphs) == len(set(paragraphs))
    begins = [line[11:-4] for line in lines if re.fullmatch(r"<!-- BEGIN \S+ -->", line)]
    ends = [line[9:-4] for line in lines if re.fullmatch(r"<!-- END \S+ -->", line)]
    assert begins == ends and len(begins) == len(set(begins))
    assert {f"{name}-cpu" for name in SECTIONS} <= set(begins)


@pytest.mark.slow
def test_every_benchmarked_step_lowers_for_a_gpu():
    """The scripts run unchanged on a GPU: the training steps lower for CUDA. ``jax.export``
    lowers for a platform this machine lacks; XLA's GPU compilation itself needs the
    device and is not checked here. Every contender on the CNN; on the other models,
    LookSAM, whose step holds ERM's pass, a probe in ``lax.cond`` and a skipped branch.
    """
    contenders = harness.registry_contenders() + harness.efficient_contenders()[0]
    for model in harness.models(quick=False):
        batch = jax.tree.map(lambda x: x[0], model.batches(1))
        for contender in contenders:
            if model.key != "cnn1d" and contender.label != "looksam":
                continue
            tx = contender.make(harness.total_steps(model))
            step = jax.jit(harness.make_step(model, tx))
            exported = jax.export.export(step, platforms=("cuda",))(
                harness.init_carry(model, tx), batch
            )
            assert exported.platforms == ("cuda",), (model.key, contender.label)
            assert "stablehlo.dot_general" in exported.mlir_module()
