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
from sam_optax.compare.training import _GradCounter
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
BUILDING_BLOCKS = {"sharpness_aware", "ema_params"}  # MESA's EMA, registered as `mesa`


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
        tx = registry.make_optimizer(name, base, learning_rate=0.1, total_steps=10, num_data=100)
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
    counter = _GradCounter(batch_size=4)
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


def test_grad_counter_counts_each_member_of_a_vmapped_pair():
    """SAMPa's and RWP's pair oracle: two gradients in one vmapped program count 2."""
    counter = _GradCounter(batch_size=4)
    x = jnp.arange(4.0)

    def loss(w, batch):
        return jnp.mean(counter.tap((w * batch) ** 2, jnp.asarray(True)))

    jax.jit(sam_optax.pair_grad_fn(loss, x, x + 1.0))(1.0, 2.0)
    assert counter.take() == 2.0


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


def test_methods_that_ignore_their_gradient_count_only_their_own():
    """bSAM and SAMPa take two gradients of their own; the loop's clean pass is forward only."""
    result = compare.run_compare(
        "digits", "bsam,sampa", seeds=1, steps=6, progress=False, timing=False
    )
    rows = {r["method"]: r for r in result.rows}
    assert rows["bsam"]["grads_per_step"] == 2.0 and rows["sampa"]["grads_per_step"] == 2.0


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
        (["--methods", "sam:nosuch=1"], ["'nosuch'", "rho=0.05 (float or schedule)"]),
        (["--methods", "looksam:k=2.5"], ["`k` takes an integer", "alpha=0.1"]),
        (["--methods", "sam:rho=-1"], ["`rho`", "-1", "sam takes: rho=0.05"]),
        (["--methods", "sam:rho=__import__('os')"], ["is not a value", "linear("]),
        (["--methods", "looksam:layerwise=yes"], ["true or false", "layerwise"]),
        (["--methods", "gsam:alpha=linear(0,1,5)"], ["`alpha` takes a number, not a schedule"]),
        (["--sweep", "sam"], ["sets no hyperparameter"]),
        (["--sweep", "sam:rho=0.1,,0.2"], ["empty value"]),
        (["--base", "lamb"], ["'lamb'", "sgd, adamw"]),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(args, words, capsys, tmp_path):
    assert main(["compare", "--out", str(tmp_path), *args]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    for word in words:
        assert word in err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_unusable_out_fails_before_training(where, tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(compare.run, "Setup", lambda *a: trained.append(a))
    (tmp_path / "taken").write_text("")
    out = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "sub"
    assert main(["compare", "--methods", "sam", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and str(out) in err
    assert not trained


def _row(method, acc, loss):
    return dict(
        method=method,
        name=method,
        overrides={},
        test_acc_mean=acc,
        test_acc_std=0.0,
        train_loss=loss,
        sharpness=float("nan") if loss != loss else 1.0,
        grads_per_step=2.0,
        probe_fraction=1.0,
        time_per_step=float("nan"),
        rel_cost=float("nan"),
        curves=[[acc]],
    )


def _result():
    config = dict(dataset="digits", label_noise=0.0, seeds=1, steps=1, base="sgd")
    rows = [_row("sgd", 0.9, 0.1), _row("sam", 0.1, float("nan"))]
    return compare.CompareResult(rows, [1], config, {})


def test_a_diverged_run_is_valid_json_and_reads_diverged(tmp_path):
    result = _result()
    assert "| sam | 10.00 ± 0.00 | diverged | – |" in result.to_markdown()
    result.save(tmp_path)
    text = (tmp_path / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["sam"]["train_loss"] is None and rows["sam"]["finite"] is False
    assert rows["sgd"]["finite"] is True and rows["sgd"]["rel_cost"] is None


def test_a_failed_save_leaves_no_results(tmp_path, monkeypatch):
    def broken(self, path, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken)
    with pytest.raises(OSError, match="No space left"):
        _result().save(tmp_path)
    assert os.listdir(tmp_path) == []


def _check_run(out, capsys, methods, timed=True):
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
    assert rows["sgd"]["grads_per_step"] == 1.0
    assert rows["sgd"]["rel_cost"] == (1.0 if timed else None)
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
def test_compare_with_overrides_and_a_sweep(tmp_path, capsys):
    argv = ["compare", "--dataset", "digits", "--methods", "sam,sam:rho=0.1", "--seeds", "1"]
    argv += ["--sweep", "looksam:alpha=0,0.3:k=2", "--steps", "12", "--no-timing"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    labels = ["sgd", "sam", "sam:rho=0.1", "looksam:alpha=0:k=2", "looksam:alpha=0.3:k=2"]
    results = _check_run(tmp_path, capsys, labels, timed=False)
    rows = {r["method"]: r for r in results["rows"]}
    assert rows["sam:rho=0.1"]["overrides"] == {"rho": "0.1"}
    assert rows["looksam:alpha=0.3:k=2"]["probe_fraction"] == 0.5
    # The two rho values train differently; the two looksam rows probe alike.
    assert rows["sam"]["train_loss"] != rows["sam:rho=0.1"]["train_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "results.json"]


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
    argv = ["--settings", "digits:0,digits:0.4", "--methods", "sgd", "--seeds", "1", "--steps", "8"]
    assert record.main([*argv, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nother `") and text.endswith("\ntail\n")
    assert "old" not in text and text.count(begin) == 2  # the quoted one and the section's
    assert f"other `{begin}` quoted" in text
    assert "digits, label noise 0 %" in text and "digits, label noise 40 %" in text
    assert text.count("| sgd |") == 2 and "jax" in text
