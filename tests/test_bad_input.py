"""The bad-input audit: every public constructor and helper refuses bad arguments.

Every method of ``sam_optax.registry.METHODS`` is tried with bad common arguments
(``rho``, ``eps``, ``mask``, ``axis_name``) and with a wrong type for each of its other
hyperparameters; the pieces, the skeleton and the helpers have their own cases. Each
must raise a ``ValueError`` that names the argument. A public function that no case
covers fails :func:`test_every_public_function_is_audited`.
"""

from __future__ import annotations

import inspect
import re
import types

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from test_common import make_params, quadratic_loss

import sam_optax
from sam_optax import registry, sharpness

KEY = jax.random.key(0)
METHODS = {n: m for n, m in registry.METHODS.items() if m.constructor is not None}

# (argument, bad value, a fragment the message must contain besides the argument)
COMMON = [
    ("rho", -0.1, "-0.1"),
    ("rho", float("nan"), "nan"),
    ("rho", "0.05", "'0.05'"),
    ("rho", None, "None"),
    ("rho", True, "True"),
    ("rho", jnp.ones(2), "(2,)"),
    ("eps", -1e-12, "-1e-12"),
    ("eps", "tiny", "'tiny'"),
    ("axis_name", 3, "3"),
    ("axis_name", ["batch"], "['batch']"),
    ("mask", "all", "'all'"),
    ("mask", 1.0, "1.0"),
]

# Values outside a method's range, beyond rho and eps: (method, argument, value).
OUT_OF_RANGE = [
    ("asam", "eta", -0.01),
    ("fisher_sam", "eta", -1.0),
    ("swa", "start_step", -1),
    ("swa", "every", 0),
    ("swa", "every", 1.5),
    ("swa", "start_fraction", 1.5),
    ("swa", "accumulator_dtype", "nope"),
    ("wasam", "every", 0),
    ("gsam", "alpha", -0.4),
    ("wsam", "gamma", 1.0),
    ("wsam", "gamma", -0.1),
    ("wsam_coupled", "gamma", 1.0),
    ("vasso", "theta", 0.0),
    ("vasso", "theta", 1.5),
    ("friendly_sam", "sigma", -1.0),
    ("friendly_sam", "lmbda", 1.0),
    ("looksam", "k", 0),
    ("looksam", "alpha", -0.7),
    ("ae_sam", "delta", 1.0),
    ("ae_looksam", "alpha", -0.7),
    ("esam", "beta", 0.0),
    ("esam", "gamma", 0.0),
    ("esam", "gamma", 1.5),
    ("sam_every_k", "k", 0),
    ("rst", "p", 1.5),
    ("msam", "momentum", 1.5),
    ("ssam_f", "sparsity", 1.5),
    ("ssam_f", "update_every", 0),
    ("ssam_f", "num_samples", 0),
    ("ssam_d", "sparsity", -0.1),
    ("ssam_d", "drop_rate", 1.5),
    ("msam", "weight_decay", -1.0),
    ("mesa", "weight", -0.8),
    ("mesa", "temperature", 0.0),
    ("mesa", "decay", 1.5),
    ("mesa", "start_step", -1),
    ("mesa", "start_fraction", 1.5),
    ("mesa", "end_step", 2.5),
    ("mesa", "accumulator_dtype", "nope"),
    ("sampa", "lam", 1.5),
    ("sampa", "lam", -0.2),
    ("rwp", "lam", 1.5),
    ("bsam", "alpha", -0.5),
    ("bsam", "b1", 1.0),
    ("bsam", "b2", 1.5),
    ("bsam", "weight_decay", -1e-4),
    ("bsam", "damping", -0.1),
    ("bsam", "s_init", 0.0),
    ("bsam", "groups", 0),
    ("bsam", "seed", 0.5),
    ("gam", "rho_prime", -0.1),
    ("gam", "alpha", 1.5),
    ("gam", "beta", -0.1),
    ("gam", "gamma", -0.05),
    ("gam", "h_minus", "both"),
    ("lookbehind_sam", "k", 0),
    ("lookbehind_sam", "alpha", 1.5),
    ("lookbehind_sam", "perturbation", "asam"),
    ("lookbehind_sam", "eta", -0.01),
]

# Masks that only the params can refute: raised by ``tx.init(params)``.
BAD_MASKS = {
    "structure": {"dense": True, "scale": True, "vec": True},
    "non_bool_leaves": {"dense": {"kernel": 1.0, "bias": 0.0}, "scale": 1.0, "vec": 1.0},
    "array_leaves": {
        "dense": {"kernel": jnp.ones((3, 4), bool), "bias": jnp.ones(4, bool)},
        "scale": True,
        "vec": True,
    },
    "callable_structure": lambda params: [True] * 3,
}


def _accepts(fn, arg):
    return arg in inspect.signature(fn).parameters


def _build(name, **override):
    """The method as the registry builds it, with its defaults replaced by ``override``."""
    return registry.make_optimizer(
        name, optax.sgd(0.1), learning_rate=0.1, total_steps=100, num_data=1000, **override
    )


def _raises(arg, fragment=""):
    pattern = f"`{re.escape(arg)}`" + (f".*{re.escape(fragment)}" if fragment else "")
    return pytest.raises(ValueError, match=re.compile(pattern, re.DOTALL))


COMMON_CASES = [
    pytest.param(name, arg, value, fragment, id=f"{name}-{arg}-{i}")
    for name in sorted(METHODS)
    for i, (arg, value, fragment) in enumerate(COMMON)
    if _accepts(METHODS[name].constructor, arg)
]


@pytest.mark.parametrize(("name", "arg", "value", "fragment"), COMMON_CASES)
def test_common_arguments_are_validated(name, arg, value, fragment):
    with _raises(arg, fragment):
        _build(name, **{arg: value})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_hyperparameter_rejects_a_wrong_type(name):
    numeric = [
        k
        for k, v in METHODS[name].defaults.items()
        if not isinstance(v, bool) and isinstance(v, int | float)
    ]
    assert numeric, f"{name} has no numeric defaults to audit"
    for arg in numeric:
        with _raises(arg, "'abc'"):
            _build(name, **{arg: "abc"})


@pytest.mark.parametrize(("name", "arg", "value"), OUT_OF_RANGE)
def test_out_of_range_hyperparameters(name, arg, value):
    with _raises(arg, repr(value)):
        _build(name, **{arg: value})


@pytest.mark.parametrize(
    "name", [n for n in sorted(METHODS) if _accepts(METHODS[n].constructor, "mask")]
)
@pytest.mark.parametrize("kind", sorted(BAD_MASKS))
def test_mismatched_mask_fails_at_init(name, kind):
    tx = _build(name, mask=BAD_MASKS[kind])
    with _raises("mask"):
        tx.init(make_params())


def _sq(p, b):
    """Per-example losses for the Fisher mask's cases."""
    return jnp.sum(p**2) * b


def _gsam_schedule(**override):
    kwargs = {"rho_max": 0.1, "rho_min": 0.01, "lr_max": 0.1, "lr_min": 0.0}
    lr_schedule = override.pop("lr_schedule", optax.constant_schedule(0.1))
    return sam_optax.gsam_rho_schedule(lr_schedule, **{**kwargs, **override})


PIECE_CASES = [
    (lambda: sam_optax.adaptive_perturbation(eta=-1.0), "eta", "-1.0"),
    (lambda: sam_optax.adaptive_perturbation(eta="big"), "eta", "'big'"),
    (lambda: sam_optax.fisher_perturbation(eta=-0.5), "eta", "-0.5"),
    (lambda: sam_optax.fisher_perturbation(eta=[1.0]), "eta", "[1.0]"),
    (lambda: sam_optax.sharpness_aware(sam_optax.normalized_gradient, rho=0.1), "perturbation", ""),
    (
        lambda: sam_optax.sharpness_aware(
            sam_optax.normalized_gradient(), sam_optax.normalized_gradient(), rho=0.1
        ),
        "combine",
        "Perturbation",
    ),
    (
        lambda: sam_optax.sharpness_aware(
            sam_optax.normalized_gradient(), policy="always", rho=0.1
        ),
        "policy",
        "'always'",
    ),
    (lambda: sam_optax.sharpness_aware(sam_optax.normalized_gradient(), rho=-1.0), "rho", "-1.0"),
    (lambda: sam_optax.sharpness_aware(sam_optax.normalized_gradient(), rho="x"), "rho", "'x'"),
    (
        lambda: sam_optax.sharpness_aware(sam_optax.normalized_gradient(), rho=0.1, eps=-1.0),
        "eps",
        "-1.0",
    ),
    (
        lambda: sam_optax.sharpness_aware(sam_optax.normalized_gradient(), rho=0.1, mask="x"),
        "mask",
        "'x'",
    ),
    (
        lambda: sam_optax.sharpness_aware(sam_optax.normalized_gradient(), rho=0.1, axis_name=0),
        "axis_name",
        "0",
    ),
    (
        lambda: sam_optax.sharpness_aware(
            sam_optax.normalized_gradient(), rho=0.1, mask=[True]
        ).init(make_params()),
        "mask",
        "",
    ),
    (
        lambda: sam_optax.sam().update(
            make_params(), sam_optax.sam().init(make_params()), make_params(), grad_fn="grads"
        ),
        "grad_fn",
        "'grads'",
    ),
    (lambda: sharpness.ascent_sharpness("f", jnp.ones(2), 0.1), "loss_fn", "'f'"),
    (lambda: sharpness.ascent_sharpness(jnp.sum, jnp.ones(2), -0.1), "rho", "-0.1"),
    (lambda: sharpness.hessian_top_eigenvalue(jnp.sum, jnp.ones(2), key="k"), "key", "'k'"),
    (
        lambda: sharpness.hessian_top_eigenvalue(jnp.sum, jnp.ones(2), key=KEY, num_iters=0),
        "num_iters",
        "0",
    ),
    (lambda: sharpness.hessian_trace(None, jnp.ones(2), key=KEY), "loss_fn", "None"),
    (
        lambda: sharpness.hessian_trace(jnp.sum, jnp.ones(2), key=KEY, num_samples=2.0),
        "num_samples",
        "2.0",
    ),
    (
        lambda: sharpness.loss_landscape(jnp.sum, jnp.ones(2), key=KEY, directions=3),
        "directions",
        "3",
    ),
    (
        lambda: sharpness.loss_landscape(jnp.sum, jnp.ones(2), key=KEY, num_points=1),
        "num_points",
        "1",
    ),
    (lambda: sharpness.loss_landscape(jnp.sum, jnp.ones(2), key=KEY, span=0.0), "span", "0.0"),
    (lambda: sharpness.filter_normalized_direction(3, jnp.ones(2)), "key", "3"),
    (lambda: sam_optax.adaptive_perturbation(adaptive_mask="all"), "adaptive_mask", "'all'"),
    (
        lambda: sam_optax.asam(adaptive_mask={"dense": True}).init(make_params()),
        "adaptive_mask",
        "structure",
    ),
    (lambda: sam_optax.adaptive_leaves({"w": "abc"}), "params", "'abc'"),
    (lambda: sam_optax.looksam_reuse(alpha=-1.0), "alpha", "-1.0"),
    (lambda: sam_optax.policies.every(0), "k", "0"),
    (lambda: sam_optax.policies.every(2.5), "k", "2.5"),
    (lambda: sam_optax.policies.bernoulli(1.5), "p", "1.5"),
    (lambda: sam_optax.policies.bernoulli(0.5, seed="a"), "seed", "'a'"),
    (lambda: sam_optax.policies.adaptive(0), "total_steps", "0"),
    (lambda: sam_optax.policies.adaptive(10, delta=1.5), "delta", "1.5"),
    (lambda: sam_optax.policies.adaptive(10, lambda1="x"), "lambda1", "'x'"),
    (lambda: sam_optax.policies.adaptive(10, lambda2=None), "lambda2", "None"),
    (lambda: sam_optax.sharpness_sensitive_data(0.0), "gamma", "0.0"),
    (lambda: sam_optax.sharpness_sensitive_data(1.5), "gamma", "1.5"),
    (lambda: sam_optax.stochastic_weight_perturbation(0.0), "beta", "0.0"),
    (lambda: sam_optax.stochastic_weight_perturbation(0.5, seed=1.0), "seed", "1.0"),
    (lambda: sam_optax.ae_sam(total_steps=-1), "total_steps", "-1"),
    (lambda: sam_optax.vasso_perturbation(theta=0.0), "theta", "0.0"),
    (lambda: sam_optax.friendly_perturbation(sigma=-1.0), "sigma", "-1.0"),
    (lambda: sam_optax.friendly_perturbation(lmbda=1.0), "lmbda", "1.0"),
    (lambda: sam_optax.surrogate_gap(alpha=-1.0), "alpha", "-1.0"),
    (lambda: sam_optax.weighted_sharpness(gamma=1.0), "gamma", "1.0"),
    (lambda: sam_optax.gradient_norm_aware(rho=-0.2), "rho", "-0.2"),
    (lambda: sam_optax.gradient_norm_aware(alpha="a"), "alpha", "'a'"),
    (lambda: sam_optax.gradient_norm_aware(beta=2.0), "beta", "2.0"),
    (lambda: sam_optax.gradient_norm_aware(gamma=-1.0), "gamma", "-1.0"),
    (lambda: sam_optax.gradient_norm_aware(h_minus=None), "h_minus", "None"),
    (lambda: sam_optax.lookbehind_sam("sgd"), "base_optimizer", "'sgd'"),
    (
        lambda: sam_optax.sharpness_aware(
            sam_optax.normalized_gradient(),
            sam_optax.probe_gradient()._replace(probes=1.5),
            rho=0.1,
        ),
        "combine.probes",
        "1.5",
    ),
    (lambda: sam_optax.wsam_decoupled("sgd", 0.1), "base_optimizer", "'sgd'"),
    (lambda: sam_optax.wsam_decoupled(optax.sgd(0.1), -0.1), "learning_rate", "-0.1"),
    (lambda: _gsam_schedule(lr_schedule="x"), "lr_schedule", "'x'"),
    (lambda: _gsam_schedule(rho_min=-1.0), "rho_min", "-1.0"),
    (lambda: _gsam_schedule(rho_max=-1.0), "rho_max", "-1.0"),
    (lambda: _gsam_schedule(lr_min=-1.0), "lr_min", "-1.0"),
    (lambda: _gsam_schedule(lr_max=0.01, lr_min=0.1), "lr_max", "0.01"),
    (lambda: sam_optax.wasam("sgd"), "base_optimizer", "'sgd'"),
    (lambda: sam_optax.msam("fast"), "learning_rate", "'fast'"),
    (lambda: sam_optax.swa_params({}), "opt_state", "SWAState"),
    (lambda: sam_optax.msam_eval_params({}, {}), "opt_state", "MSAMState"),
    (lambda: sam_optax.ema_params(decay=-0.1), "decay", "-0.1"),
    (lambda: sam_optax.ema_params(accumulator_dtype="x"), "accumulator_dtype", "'x'"),
    (lambda: sam_optax.ema_params_of({}), "opt_state", "EMAState"),
    (lambda: sam_optax.ema_update({"a": jnp.ones(1)}, {"a": jnp.ones(1)}, 2.0), "decay", "2.0"),
    (lambda: sam_optax.ema_update({"a": jnp.ones(1)}, [jnp.ones(1)], 0.5), "new", "structure"),
    (lambda: sam_optax.ema_update({"a": jnp.ones(1, int)}, {"a": 1}, 0.5), "tree", "int32"),
    (lambda: sam_optax.trajectory_kl(jnp.ones((2, 3)), jnp.ones(3)), "teacher_logits", "(3,)"),
    (lambda: sam_optax.trajectory_kl(jnp.ones(3), jnp.ones(3), 0.0), "temperature", "0.0"),
    (lambda: sam_optax.mesa_loss({}, jnp.ones((1, 2)), jnp.ones((1, 2))), "opt_state", "MesaState"),
    (lambda: sam_optax.bsam(0.1, num_data=-1), "num_data", "-1"),
    (lambda: sam_optax.bsam(0.1, 100, damping=0.0, weight_decay=0.0), "damping", "0.0"),
    (lambda: sam_optax.bsam_sample({}, {}, KEY), "opt_state", "BSAMState"),
    (lambda: sam_optax.bsam_sample({}, sam_optax.bsam(0.1, 100).init({}), "k"), "key", "'k'"),
    (
        lambda: sam_optax.bsam_sample([1.0], sam_optax.bsam(0.1, 100).init({}), KEY),
        "params",
        "structure",
    ),
    (lambda: sam_optax.m_sharpness("sam", lambda p, b: 0.0, m=2, batch_size=8), "tx", "'sam'"),
    (lambda: sam_optax.m_sharpness(sam_optax.sam(), "f", m=2, batch_size=8), "loss_fn", "'f'"),
    (lambda: sam_optax.m_sharpness(sam_optax.sam(), abs, m=0, batch_size=8), "m", "0"),
    (lambda: sam_optax.m_sharpness(sam_optax.sam(), abs, m=3, batch_size=8), "m", "8"),
    (lambda: sam_optax.m_sharpness(sam_optax.sam(), abs, m=2, batch_size=2.0), "batch_size", ""),
    (lambda: sam_optax.accumulate("f", 2), "fn", "'f'"),
    (lambda: sam_optax.accumulate(abs, 0), "micro_batch_size", "0"),
    (lambda: sam_optax.filterwise_gaussian(seed=0.5), "seed", "0.5"),
    (lambda: sam_optax.interpolate(lam=1.5), "lam", "1.5"),
    (lambda: sam_optax.pair_grad_fn("f", jnp.ones(2), jnp.ones(2)), "loss_fn", "'f'"),
    (lambda: sam_optax.pair_grad_fn(jnp.sum, jnp.ones(2), jnp.ones(3)), "batch_b", "(3,)"),
    (lambda: sam_optax.pair_grad_fn(jnp.sum, jnp.ones(2), jnp.ones(2), mesh="m"), "mesh", "'m'"),
    (
        lambda: sam_optax.pair_grad_fn(jnp.sum, jnp.ones(2), jnp.ones(2), shard_map=True),
        "shard_map",
        "mesh",
    ),
    (
        lambda: sam_optax.pair_grad_fn(
            jnp.sum, jnp.ones(2), jnp.ones(2), mesh=jax.make_mesh((8,), ("pair",))
        ),
        "axis",
        "size 8",
    ),
    (
        lambda: sam_optax.pair_grad_fn(
            jnp.sum,
            jnp.ones(2),
            jnp.ones(2),
            mesh=jax.make_mesh((2, 4), ("pair", "data")),
            data_axis="batch",
        ),
        "data_axis",
        "'batch'",
    ),
    (
        lambda: sam_optax.sampa(optax.sgd(0.1)).update(
            jnp.ones(2),
            sam_optax.sampa(optax.sgd(0.1)).init(jnp.ones(2)),
            jnp.ones(2),
            pair_grad_fn="pair",
        ),
        "pair_grad_fn",
        "'pair'",
    ),
    (lambda: sam_optax.centralize({"kernel": "abc"}), "tree", "'abc'"),
    (lambda: sam_optax.centralize({"kernel": jnp.ones((2, 2))}, axes=0), "axes", "0"),
    (lambda: sam_optax.centralize({"kernel": jnp.ones(2)}, axes=lambda p, x: 1), "axes", "1"),
    (lambda: sam_optax.centralized_gradient(axes="last"), "axes", "'last'"),
    (lambda: sam_optax.centralized_gradient(norm="l1"), "norm", "'l1'"),
    (lambda: sam_optax.centralized_probe(axes=(0,)), "axes", "(0,)"),
    (lambda: sam_optax.gcsam(centralize_descent="yes"), "centralize_descent", "'yes'"),
    (lambda: sam_optax.sparse_mask_perturbation(sparsity=2.0), "sparsity", "2.0"),
    (lambda: sam_optax.sparse_mask_perturbation(update_every=1.5), "update_every", "1.5"),
    (lambda: sam_optax.sparse_mask_perturbation(mode="fixed"), "mode", "'fixed'"),
    (lambda: sam_optax.sparse_mask_perturbation(num_samples=0), "num_samples", "0"),
    (lambda: sam_optax.sparse_mask_perturbation(drop_rate=-0.5), "drop_rate", "-0.5"),
    (lambda: sam_optax.sparse_mask_perturbation(mode="dynamic"), "total_steps", "None"),
    (lambda: sam_optax.sparse_mask_perturbation(total_steps=0), "total_steps", "0"),
    (lambda: sam_optax.sparse_mask_perturbation(death="norm"), "death", "'norm'"),
    (lambda: sam_optax.sparse_mask_perturbation(growth=1), "growth", "1"),
    (lambda: sam_optax.sparse_mask_perturbation(seed=0.5), "seed", "0.5"),
    (lambda: sam_optax.fisher_mask("f", jnp.ones(2), jnp.ones(3)), "per_example_loss_fn", "'f'"),
    (lambda: sam_optax.fisher_mask(_sq, jnp.ones(2), jnp.ones(())), "batch", "()"),
    (lambda: sam_optax.fisher_mask(_sq, jnp.ones(2), jnp.ones(3), 1.5), "sparsity", "1.5"),
    (lambda: sam_optax.fisher_mask(_sq, "w", jnp.ones(3)), "params", "'w'"),
    (
        lambda: sam_optax.fisher_mask(_sq, jnp.ones(2), jnp.ones(3), num_samples=0),
        "num_samples",
        "0",
    ),
    (lambda: sam_optax.set_sparse_mask({}, jnp.ones(2, bool)), "opt_state", "SparseMaskState"),
    (
        lambda: sam_optax.set_sparse_mask(sam_optax.ssam().init(jnp.ones(2)), jnp.ones(3, bool)),
        "mask",
        "bool[3]",
    ),
    (
        lambda: sam_optax.restore_checkpoint_state(
            {"count": jnp.zeros([], jnp.int32)}, sam_optax.sam().init(make_params())
        ),
        "restored",
        "probes is missing",
    ),
]


@pytest.mark.parametrize(
    ("make", "arg", "fragment"), PIECE_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(PIECE_CASES)]
)
def test_pieces_skeleton_and_helpers(make, arg, fragment):
    with _raises(arg, fragment):
        make()


def test_registry_rejects_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        registry.make_optimizer("nope", optax.sgd(0.1))
    with pytest.raises(ValueError, match="`sgd` takes no hyperparameters"):
        registry.make_optimizer("sgd", optax.sgd(0.1), rho=0.1)
    with _raises("rho", "-1"):
        registry.make_optimizer("sam", optax.sgd(0.1), rho=-1)


@pytest.mark.parametrize("step_fn", [3, "step", None])
def test_profile_step_refuses_what_is_not_a_step(step_fn):
    with _raises("step_fn", repr(step_fn)):
        sam_optax.profile_step(step_fn, jax.ShapeDtypeStruct((2,), jnp.float32))


def _public_functions():
    """Every public function of sam_optax and of the public modules it lists."""
    found = {}
    for name in sam_optax.__all__:
        obj = getattr(sam_optax, name)
        if isinstance(obj, types.ModuleType):
            for sub in dir(obj):
                fn = getattr(obj, sub)
                if (
                    not sub.startswith("_")
                    and inspect.isfunction(fn)
                    and fn.__module__ == obj.__name__
                ):
                    found[f"{name}.{sub}"] = fn
        elif inspect.isfunction(obj):
            found[name] = obj
    return found


# Functions whose every argument some case above gets wrong.
AUDITED = {
    "adaptive_leaves",
    "adaptive_perturbation",
    "fisher_perturbation",
    "sharpness_aware",
    "restore_checkpoint_state",
    "sharpness.ascent_sharpness",
    "sharpness.filter_normalized_direction",
    "sharpness.hessian_top_eigenvalue",
    "sharpness.hessian_trace",
    "sharpness.loss_landscape",
    "looksam_reuse",
    "policies.every",
    "policies.bernoulli",
    "policies.adaptive",
    "sharpness_sensitive_data",
    "stochastic_weight_perturbation",
    "vasso_perturbation",
    "friendly_perturbation",
    "surrogate_gap",
    "weighted_sharpness",
    "gradient_norm_aware",
    "gsam_rho_schedule",
    "swa_params",
    "msam_eval_params",
    "ema_params",
    "ema_params_of",
    "ema_update",
    "trajectory_kl",
    "mesa_loss",
    "bsam_sample",
    "m_sharpness",
    "accumulate",
    "profile_step",  # its other arguments are whatever the step takes
    "filterwise_gaussian",
    "interpolate",
    "pair_grad_fn",
    "centralize",
    "centralized_gradient",
    "centralized_probe",
    "kernel_axes",  # a rule: any key path and leaf give axes or None
    "sparse_mask_perturbation",
    "fisher_mask",
    "set_sparse_mask",
}


def test_every_public_function_is_audited():
    constructors = {m.constructor for m in METHODS.values()}
    missing = [
        name
        for name, fn in _public_functions().items()
        if fn not in constructors
        and name not in AUDITED
        and inspect.signature(fn).parameters  # a function without arguments cannot be misused
    ]
    assert not missing, f"add bad-input cases for {missing} to tests/test_bad_input.py"
    assert set(_public_functions()) >= AUDITED


def _full(name):
    return registry.make_optimizer(
        name, optax.identity(), learning_rate=0.1, total_steps=100, num_data=1000
    )


def _structure(name, params):
    """What the members of a chain (or of a wrapper's NamedTuple) receive, one by one."""
    return tuple(jax.tree.structure(child) for child in _full(name).init(params))


STATE_REFUSED = re.compile(r"sam_optax\.\w+: `state` is not this method's state|number of .*states")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_of_another_method_is_refused(name):
    """Every method whose state has another structure is refused by name, not crashed on.

    A chain of another length is refused by optax.chain itself; states of the same
    structure (SAM's and ASAM's, say) hold the same counts and are interchangeable.
    """
    params = make_params()
    grads = jax.grad(quadratic_loss)(params)
    tx = _full(name)
    others = [o for o in sorted(METHODS) if _structure(o, params) != _structure(name, params)]
    assert others
    for other in others:
        with pytest.raises(ValueError, match=STATE_REFUSED):
            tx.update(grads, _full(other).init(params), params, grad_fn=jax.grad(quadratic_loss))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_initialised_for_other_params_is_refused(name):
    small, big = {"w": jnp.ones(1)}, {"w": jnp.ones(3)}
    tx = _full(name)
    grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
    selection = {  # for ESAM's data selection; the other methods ignore them
        "per_example_loss_fn": lambda p, b: jnp.sum(p["w"] ** 2) * b,
        "batch": jnp.arange(4.0),
    }
    same = jax.tree.map(
        lambda a, b: a.shape == b.shape,
        jax.eval_shape(tx.init, small),
        jax.eval_shape(tx.init, big),
    )
    if all(jax.tree.leaves(same)):  # no params-shaped state: nothing to mismatch
        out, _ = tx.update(grad_fn(big), tx.init(small), big, grad_fn=grad_fn, **selection)
        want, _ = tx.update(grad_fn(big), tx.init(big), big, grad_fn=grad_fn, **selection)
        chex.assert_trees_all_equal(out, want)
        return
    with pytest.raises(ValueError, match=r"sam_optax\.\w+: `state` leaf .*\(1,\).*\(3,\)"):
        tx.update(grad_fn(big), tx.init(small), big, grad_fn=grad_fn, **selection)


# The structural hyperparameters that optax.inject_hyperparams must leave as numbers.
STATIC = {"looksam": {"k"}, "ae_sam": {"total_steps"}, "ae_looksam": {"total_steps"}}
STATIC.update(esam={"gamma", "groups"}, bsam={"groups"})
STATIC["lookbehind_sam"] = {"k"}
STATIC["ssam_d"] = {"sparsity", "update_every", "num_samples"}  # a count and shapes
REQUIRED = {"total_steps": 10, "base_optimizer": optax.sgd(0.1), "learning_rate": 0.1}
REQUIRED["num_data"] = 1000


@pytest.mark.parametrize(
    "name", sorted({m.constructor.__name__: n for n, m in METHODS.items()}.values())
)
def test_inject_hyperparams_error_says_static_args(name):
    """Each refusal names its argument and says `static_args`; with them, init works."""
    constructor = METHODS[name].constructor
    parameters = inspect.signature(constructor).parameters
    kwargs = {
        k: v
        for k, v in REQUIRED.items()
        if k in parameters and parameters[k].default is inspect.Parameter.empty
    }
    static = ()
    for _ in range(len(parameters)):
        tx = optax.inject_hyperparams(constructor, static_args=static)(**kwargs)
        try:
            tx.init(make_params())
            break
        except ValueError as err:
            arg = re.search(r"static_args=\('(\w+)',\)", str(err))
            assert arg and f"`{arg.group(1)}`" in str(err), err
            static = (*static, arg.group(1))
    assert set(static) == STATIC.get(name, set())
