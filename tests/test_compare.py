"""``sam-optax compare``: datasets, counting, hooks, the registry, the CLI end to end."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import compare, registry
from sam_optax.cli import main
from sam_optax.pieces import Policy, empty_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_FIELDS = {
    "method",
    "test_acc_mean",
    "test_acc_std",
    "train_loss",
    "sharpness",
    "grads_per_step",
    "probe_fraction",
    "time_per_step",
    "rel_cost",
    "curves",
}

# Public names that build transformations but are not methods: the generic skeleton.
BUILDING_BLOCKS = {"sharpness_aware"}


def _returns_transformation(obj) -> bool:
    annotation = inspect.signature(obj).return_annotation
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return "GradientTransformation" in name


def test_every_public_method_is_in_the_registry():
    registered = {m.constructor for m in registry.METHODS.values()}
    constructors = [
        name
        for name in sam_optax.__all__
        if inspect.isfunction(getattr(sam_optax, name))
        and _returns_transformation(getattr(sam_optax, name))
        and name not in BUILDING_BLOCKS
    ]
    assert "sam" in constructors  # the scan sees the methods
    missing = [n for n in constructors if getattr(sam_optax, n) not in registered]
    assert not missing, f"public methods without a registry entry: {missing}"


def test_every_registry_entry_builds_and_takes_the_extra_arguments():
    params = {"w": jnp.array([1.0, -2.0])}
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    base = optax.sgd(0.1)
    for name in registry.METHODS:
        tx = registry.make_optimizer(name, base, learning_rate=0.1, total_steps=10)
        state = tx.init(params)
        updates, _ = tx.update(
            jax.grad(loss)(params),
            state,
            params,
            grad_fn=jax.grad(loss),
            per_example_loss_fn=lambda p, b: (b @ p["w"]) ** 2,
            batch=jnp.eye(2),
        )
        assert np.all(np.isfinite(np.asarray(updates["w"]))), name


def test_label_noise_flips_exactly_the_fraction_to_other_classes():
    clean = compare.load_dataset("digits")
    noisy = compare.load_dataset("digits", label_noise=0.4)
    changed = noisy["y_train"] != clean["y_train"]
    assert changed.sum() == round(0.4 * clean["y_train"].size)
    np.testing.assert_array_equal(noisy["y_test"], clean["y_test"])
    np.testing.assert_array_equal(noisy["x_train"], clean["x_train"])
    again = compare.load_dataset("digits", label_noise=0.4)
    np.testing.assert_array_equal(again["y_train"], noisy["y_train"])
    other = compare.load_dataset("digits", label_noise=0.4, seed=1)
    assert np.any(other["y_train"] != noisy["y_train"])
    assert set(np.unique(noisy["y_train"])) == set(range(10))


def test_grad_counter_counts_backward_passes_that_run():
    counter = compare._GradCounter(batch_size=4)
    x = jnp.arange(4.0)

    def loss(w, n, counting):
        return jnp.mean(counter.tap((w * x[:n]) ** 2, counting))

    @jax.jit
    def step(w, probe, counting):
        g = jax.grad(loss)(w, 4, counting)
        g_p = jax.lax.cond(probe, lambda: jax.grad(loss)(w + 1.0, 2, counting), lambda: g)
        _ = loss(w, 4, counting)  # a forward pass is not a gradient evaluation
        return g + g_p

    for probe in (True, False, True):
        step(1.0, probe, True)
    assert counter.take() == 3 + 2 * 0.5
    assert counter.take() == 0.0
    # Switched off (the timing after training), the same compiled step counts nothing.
    step(1.0, True, False)
    assert counter.take() == 0.0
    assert step._cache_size() == 1


def _every_third_then_half_batch(rho=0.05):
    """Probes on every third step, then uses ESAM's hook: a gradient on half of the batch."""

    def decide(g, state, ctx):
        return ctx.count % 3 == 0, state

    def update_fn(updates, state, params, *, per_example_loss_fn, batch, **extra):
        sub = jax.tree.map(lambda x: x[: x.shape[0] // 2], batch)
        g = jax.grad(lambda p: jnp.mean(per_example_loss_fn(p, sub)))(params)
        return jax.tree.map(lambda a, b: 0.5 * (a + b), updates, g), state

    return optax.chain(
        sam_optax.sharpness_aware(
            sam_optax.normalized_gradient(), policy=Policy(empty_init, decide), rho=rho
        ),
        optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn),
    )


@pytest.mark.slow
def test_counts_probe_fraction_and_hooks(monkeypatch):
    zeros = lambda params, opt_state: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
    method = registry.Method(
        "custom",
        _every_third_then_half_batch,
        {"rho": 0.05},
        "test",
        "1 + 1/3 + 1/2",
        eval_params=zeros,
    )
    monkeypatch.setitem(registry.METHODS, "custom", method)
    result = compare.run_compare("digits", "custom", seeds=1, steps=30, progress=False)
    rows = {r["method"]: r for r in result.rows}
    assert rows["sgd"]["grads_per_step"] == 1.0 and rows["sgd"]["probe_fraction"] == 0.0
    np.testing.assert_allclose(rows["custom"]["grads_per_step"], 1 + 10 / 30 + 0.5)
    np.testing.assert_allclose(rows["custom"]["probe_fraction"], 10 / 30)
    # Evaluated on eval_params (all zeros): every prediction is class 0.
    y_test = compare.load_dataset("digits")["y_test"]
    np.testing.assert_allclose(rows["custom"]["test_acc_mean"], np.mean(y_test == 0), rtol=1e-6)
    assert rows["sgd"]["test_acc_mean"] > 0.5


@pytest.mark.parametrize(
    "args, words",
    [
        (["--methods", "sam,nosuch"], ["'nosuch'", "sgd", "sam", "asam"]),
        (["--dataset", "cifar10"], ["'cifar10'", "mnist1d", "digits"]),
        (["--label-noise", "1.0"], ["[0, 1)", "1.0"]),
        (["--label-noise", "-0.1"], ["[0, 1)"]),
        (["--steps", "0"], ["steps", "positive"]),
        (["--seeds", "-2"], ["seeds", "positive"]),
        (["--steps", "ten"], ["--steps", "ten"]),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, words, capsys, tmp_path):
    assert main(["compare", "--out", str(tmp_path), *args]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    for word in words:
        assert word in err
    assert not os.listdir(tmp_path)


def _check_run(out, capsys, methods):
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| method | test acc. (%)") and len(lines) == 2 + len(methods)
    assert [line.split("|")[1].strip() for line in lines[2:]] == methods
    with open(out / "results.json") as f:
        results = json.load(f)
    assert [r["method"] for r in results["rows"]] == methods
    for row in results["rows"]:
        assert ROW_FIELDS <= set(row)
        assert 0.0 <= row["test_acc_mean"] <= 1.0 and np.isfinite(row["sharpness"])
        assert len(row["curves"]) == 1 and len(row["curves"][0]) == len(results["curve_steps"])
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["sgd"]["grads_per_step"] == 1.0 and rows["sgd"]["rel_cost"] == 1.0
    assert rows["sam"]["grads_per_step"] == 2.0 and rows["sam"]["probe_fraction"] == 1.0
    assert {"device", "versions", "date"} <= set(results["environment"])
    with open(out / "compare.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return results


@pytest.mark.slow
def test_compare_digits_end_to_end(tmp_path, capsys):
    argv = ["compare", "--dataset", "digits", "--methods", "sam", "--seeds", "1"]
    argv += ["--steps", "24", "--batch-size", "64", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    results = _check_run(tmp_path, capsys, ["sgd", "sam"])
    assert results["config"]["steps"] == 24 and results["curve_steps"][-1] == 24


@pytest.mark.slow
def test_compare_mnist1d_end_to_end_with_label_noise(tmp_path, capsys):
    argv = ["compare", "--methods", "sam", "--seeds", "1", "--steps", "16"]
    argv += ["--label-noise", "0.4", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    results = _check_run(tmp_path, capsys, ["sgd", "sam"])
    assert results["config"]["dataset"] == "mnist1d"
    assert results["config"]["label_noise"] == 0.4


@pytest.mark.slow
def test_record_script_writes_its_section_only(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "record_compare", os.path.join(ROOT, "benchmarks", "record_compare.py")
    )
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    readme = tmp_path / "README.md"
    begin, end = "<!-- BEGIN compare -->", "<!-- END compare -->"
    readme.write_text(f"# Benchmarks\n\nother `{begin}` quoted\n\n{begin}\nold\n{end}\ntail\n")
    argv = ["--dataset", "digits", "--methods", "sgd", "--seeds", "1", "--steps", "8"]
    assert record.main([*argv, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nother `") and text.endswith("\ntail\n")
    assert "old" not in text and text.count(begin) == 2  # the quoted one and the section's
    assert f"other `{begin}` quoted" in text
    assert "Label noise 0 %" in text and "Label noise 40 %" in text
    assert text.count("| sgd |") == 2 and "jax" in text
