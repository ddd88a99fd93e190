"""Method specifications of ``sam-optax compare``: overrides and sweeps, parsed and checked."""

from __future__ import annotations

import numpy as np
import optax
import pytest

from sam_optax import registry
from sam_optax.compare import expand_sweep, parameters, parse_method, resolve_methods
from sam_optax.compare.specs import MethodSpec, split_top_level


def test_every_registry_method_lists_its_scalar_hyperparameters():
    for name, method in registry.METHODS.items():
        params = parameters(name)
        # Every registry default is settable, with the registry's value as its default.
        for key, value in method.defaults.items():
            assert params[key].default == value, (name, key)
        for p in params.values():
            assert p.kind in ("int", "float", "bool")
            assert p.name not in ("learning_rate", "total_steps", "base_optimizer", "mask")
    assert parameters("sgd") == {}
    assert parameters("sam_every_k")["k"].kind == "int"
    assert parameters("sam")["rho"].schedule and not parameters("gsam")["alpha"].schedule


@pytest.mark.parametrize(
    "text, expected",
    [
        ("sam", {}),
        ("sam:rho=0.1", {"rho": 0.1}),
        ("sam:rho=1e-2", {"rho": 0.01}),
        ("looksam:alpha=0:k=10", {"alpha": 0, "k": 10}),
        (" looksam : layerwise=TRUE ", {"layerwise": True}),
        ("looksam:layerwise=false", {"layerwise": False}),
        ("swa:start_fraction=0.5:every=2", {"start_fraction": 0.5, "every": 2}),
    ],
)
def test_values_parse_as_numbers_and_booleans(text, expected):
    spec = parse_method(text)
    assert spec.kwargs == expected
    for key, value in expected.items():
        assert type(spec.kwargs[key]) is type(value)


def test_a_schedule_parses_where_the_constructor_takes_one():
    spec = parse_method("sam:rho=linear(0,0.1,10)")
    rho = spec.kwargs["rho"]
    np.testing.assert_allclose([rho(0), rho(5), rho(20)], [0.0, 0.05, 0.1])
    cosine = parse_method("sam:rho=cosine(0.1, 100)").kwargs["rho"]
    np.testing.assert_allclose(cosine(100), 0.0, atol=1e-8)
    assert spec.label == "sam:rho=linear(0,0.1,10)"
    # It reaches the optimizer: the registry builds SAM with the schedule.
    tx = spec.build(optax.sgd(0.1), learning_rate=0.1, total_steps=10)
    assert callable(tx.init)


@pytest.mark.parametrize(
    "text, words",
    [
        ("nosuch", ["unknown method 'nosuch'", "sam", "looksam"]),
        ("sam:eta=1", ["unknown hyperparameter 'eta'", "sam takes: rho=0.05"]),
        ("sam:rho", ["expected key=value"]),
        ("sam:rho=", ["expected key=value"]),
        ("sam:rho=0.1:rho=0.2", ["given twice"]),
        ("sam:rho=abc", ["'abc' is not a number"]),
        ("sam:rho=nan", ["not a finite number"]),
        ("sam:rho=-0.1", ["`rho`", "sam takes: rho=0.05"]),
        ("looksam:k=0", ["`k`", "looksam takes:", "alpha=0.1"]),
        ("looksam:k=2.0", ["`k` takes an integer"]),
        ("wsam:gamma=1", ["`gamma`", "wsam takes:"]),
        ("sam:rho=exp(1)", ["is not a value", "linear(init_value"]),
        ("sam:rho=linear(1)", ["schedule linear takes 3 to 3 numbers"]),
        ("sam:rho=linear(0,1,(2)", ["unbalanced parentheses"]),
        ("gsam:alpha=cosine(0.1,10)", ["`alpha` takes a number, not a schedule"]),
        ("sgd:rho=0.1", ["sgd takes no hyperparameters"]),
        ("sam:rho=__import__('os').system('x')", ["is not a value"]),
    ],
)
def test_bad_specifications_say_what_is_wrong(text, words):
    with pytest.raises(ValueError) as err:
        parse_method(text)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_sweeps_expand_to_the_grid_and_are_checked():
    specs = expand_sweep("rst:p=0.1,0.5:rho=0.02,linear(0,0.05,10)")
    assert [s.label for s in specs] == [
        "rst:p=0.1:rho=0.02",
        "rst:p=0.1:rho=linear(0,0.05,10)",
        "rst:p=0.5:rho=0.02",
        "rst:p=0.5:rho=linear(0,0.05,10)",
    ]
    with pytest.raises(ValueError, match="`p`"):
        expand_sweep("rst:p=0.5,1.5")
    with pytest.raises(ValueError, match="sets no hyperparameter"):
        expand_sweep("rst")


def test_resolve_keeps_sgd_first_repeats_once_and_same_method_twice():
    specs = resolve_methods(["sam", "sam:rho=0.1", MethodSpec("asam"), "sam"])
    assert [s.label for s in specs] == ["sgd", "sam", "sam:rho=0.1", "asam"]
    assert [s.label for s in resolve_methods(None)] == list(registry.METHODS)
    swept = resolve_methods("sam", sweep=["looksam:alpha=0,0.3", "sam:rho=0.1"])
    assert [s.label for s in swept] == [
        "sgd",
        "sam",
        "looksam:alpha=0",
        "looksam:alpha=0.3",
        "sam:rho=0.1",
    ]
    with pytest.raises(ValueError, match="no method given"):
        resolve_methods("")
    assert split_top_level("a(1,2),b", ",") == ["a(1,2)", "b"]
