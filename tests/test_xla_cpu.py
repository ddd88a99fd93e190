"""The probe's convolutions stay canonical (XLA:CPU's fast path) inside ``lax.cond``."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import sam_optax
from sam_optax import _xla_cpu
from sam_optax._xla_cpu import canonical_convolutions

# (input layout, kernel layout, output layout, input shape, kernel shape, groups, strides, dilation)
CONVS = [
    ("NWC", "WIO", "NWC", (4, 11, 6), (3, 6, 5), 1, (2,), (1,)),
    ("NCW", "OIW", "NCW", (4, 6, 11), (5, 6, 3), 1, (1,), (2,)),
    ("NHWC", "HWIO", "NHWC", (2, 7, 8, 4), (3, 3, 4, 6), 1, (2, 1), (1, 1)),
    ("NCHW", "OIHW", "NCHW", (2, 4, 7, 8), (6, 2, 3, 3), 2, (1, 2), (1, 2)),
    ("NHWC", "OIHW", "NCHW", (2, 7, 8, 4), (8, 1, 3, 3), 4, (1, 1), (1, 1)),
]


def conv_loss(layout):
    lhs_spec, rhs_spec, out_spec, _, _, groups, strides, dilation = layout

    def loss(w, x):
        y = lax.conv_general_dilated(
            x,
            w,
            strides,
            "SAME",
            rhs_dilation=dilation,
            dimension_numbers=(lhs_spec, rhs_spec, out_spec),
            feature_group_count=groups,
        )
        return jnp.sum(jnp.tanh(y) ** 2)

    return loss


def arrays(layout, seed=0):
    kw, kx = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kw, layout[4]), jax.random.normal(kx, layout[3])


def dim_labels(hlo_text):
    return re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", hlo_text)


def is_canonical(label):
    """``b<spatial>f_<spatial>io-><b><spatial>f``: Eigen's input, kernel and output order."""
    return re.fullmatch(r"b(\d+)f_(\d+)io->b(\d+)f", label) is not None


def sam_every_two_step(layout):
    """A training step of SAM every 2 steps on one convolution: the probe is in ``cond``.

    Returns ``(step, tx, w, x)`` with ``step(w, state) -> (w, state)``.
    """
    loss = conv_loss(layout)
    w, x = arrays(layout)
    tx = optax.chain(sam_optax.sam(0.05, policy=sam_optax.policies.every(2)), optax.sgd(0.1))

    def step(w, state):
        g = jax.grad(loss)(w, x)
        updates, state = tx.update(g, state, w, grad_fn=lambda v: jax.grad(loss)(v, x))
        return optax.apply_updates(w, updates), state

    return step, tx, w, x


@pytest.mark.parametrize("layout", CONVS, ids=[c[0] + "/" + c[1] for c in CONVS])
def test_rewrite_gives_the_same_values_and_gradients(layout):
    loss = conv_loss(layout)
    w, x = arrays(layout)
    grads = jax.grad(loss, argnums=(0, 1))
    want = jax.jit(grads)(w, x)
    got = jax.jit(canonical_convolutions(grads))(w, x)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jax.jit(canonical_convolutions(loss))(w, x), jax.jit(loss)(w, x), rtol=1e-6
    )


def branch_labels(grads, *args):
    """The convolutions' dimension labels of ``grads`` compiled inside a conditional branch."""

    def step(take, *args):
        return lax.cond(take, grads, lambda *a: jax.tree.map(jnp.zeros_like, a), *args)

    return dim_labels(jax.jit(step).lower(True, *args).compile().as_text())


@pytest.mark.parametrize("layout", CONVS, ids=[c[0] + "/" + c[1] for c in CONVS])
def test_convolutions_in_a_conditional_branch_are_those_of_the_top_level(layout):
    """Inside the branch XLA:CPU gets the convolutions it makes of a top-level program."""
    grads = jax.grad(conv_loss(layout), argnums=(0, 1))
    w, x = arrays(layout)
    top = dim_labels(jax.jit(grads).lower(w, x).compile().as_text())
    labels = branch_labels(canonical_convolutions(grads), w, x)
    assert len(labels) == 3  # forward, input gradient and kernel gradient
    if layout[5] == 1:
        assert sorted(labels) == sorted(top)
        assert all(is_canonical(label) for label in labels), labels
    else:  # XLA expands a grouped kernel gradient after the rewrite: only it stays off
        assert sum(not is_canonical(label) for label in labels) <= 1, labels
    assert not all(is_canonical(label) for label in branch_labels(grads, w, x))


def test_convolutions_inside_a_nested_jit_are_rewritten():
    layout = CONVS[1]
    inner = jax.jit(conv_loss(layout))
    w, x = arrays(layout)
    grads = jax.grad(lambda w, x: 2.0 * inner(w, x), argnums=(0, 1))
    labels = branch_labels(canonical_convolutions(grads), w, x)
    assert len(labels) == 3 and all(is_canonical(label) for label in labels), labels
    for a, b in zip(
        jax.jit(canonical_convolutions(grads))(w, x), jax.jit(grads)(w, x), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_closure_over_traced_values_and_callbacks():
    """The probe closes over the step's tracers and may run host callbacks."""
    layout = CONVS[0]
    loss = conv_loss(layout)
    w, x = arrays(layout)
    seen = []

    @jax.jit
    def step(w, x, scale):
        def fn(v):
            jax.debug.callback(lambda: seen.append(1))
            return jax.grad(lambda v: scale * loss(v, x))(v)

        return lax.cond(scale > 0, canonical_convolutions(fn), jnp.zeros_like, w)

    got = step(w, x, 3.0)
    jax.block_until_ready(got)
    np.testing.assert_allclose(got, 3.0 * jax.jit(jax.grad(loss))(w, x), rtol=1e-5)
    assert seen == [1]
    jax.block_until_ready(step(w, x, -1.0))
    assert seen == [1]


def test_a_sharpness_aware_step_with_a_policy_keeps_its_convolutions_canonical():
    """SAM every 2 steps on a 1-D CNN: the probe sits in ``lax.cond``, all convs canonical."""
    layout = CONVS[0]
    step, tx, w, x = sam_every_two_step(layout)
    loss = conv_loss(layout)
    compiled = jax.jit(step).lower(w, tx.init(w)).compile()
    assert "conditional" in compiled.as_text()
    labels = dim_labels(compiled.as_text())
    assert len(labels) == 4  # the clean pass's and the probe's forward and kernel gradient
    assert all(is_canonical(label) for label in labels), labels
    w1, state = jax.jit(step)(w, tx.init(w))
    assert int(state[0].probes) == 1
    # The probing step equals plain SAM's.
    sam = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
    g = jax.grad(loss)(w, x)
    updates, _ = sam.update(g, sam.init(w), w, grad_fn=lambda v: jax.grad(loss)(v, x))
    np.testing.assert_allclose(w1, optax.apply_updates(w, updates), rtol=1e-5, atol=1e-6)


def test_a_nested_jit_with_its_own_shardings_is_kept_as_it_is():
    layout = CONVS[0]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    inner = jax.jit(conv_loss(layout), out_shardings=device)
    w, x = arrays(layout)
    grads = jax.grad(lambda w, x: inner(w, x))
    closed, _, _ = _xla_cpu._staged(grads, w, x)

    def nested_jits(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("jit", "pjit"):
                yield e
                yield from nested_jits(e.params["jaxpr"].jaxpr)

    kept = [
        e
        for e in nested_jits(_xla_cpu._rewritten(closed.jaxpr))
        if any(isinstance(s, jax.sharding.Sharding) for s in e.params["out_shardings"])
    ]
    assert kept and all(e in closed.jaxpr.eqns[0].params["jaxpr"].jaxpr.eqns for e in kept)
    np.testing.assert_allclose(
        jax.jit(canonical_convolutions(grads))(w, x), jax.jit(grads)(w, x), rtol=1e-6
    )


def _exported_ops(fn, args, platform):
    """How often each StableHLO op occurs in ``fn`` exported for ``platform``."""
    module = jax.export.export(jax.jit(fn), platforms=(platform,))(*args).mlir_module()
    return collections.Counter(re.findall(r"stablehlo\.\w+", module))


@pytest.mark.parametrize("layout", CONVS[:2], ids=[c[0] for c in CONVS[:2]])
def test_a_gpu_program_carries_no_rewrite(layout, monkeypatch):
    """Exported for CUDA (no GPU needed), SAM every 2 steps has the ops it would have
    without the rewrite; only the CPU export carries the extra transposes. The
    platform selection may add a ``case`` with a constant index, which XLA folds
    away, so those wrappers are not counted."""
    step, tx, w, _ = sam_every_two_step(layout)
    args = (w, tx.init(w))
    gpu, cpu = _exported_ops(step, args, "cuda"), _exported_ops(step, args, "cpu")
    monkeypatch.setattr(_xla_cpu, "canonical_convolutions", lambda fn: fn)
    plain = _exported_ops(step, args, "cuda")
    wrappers = ("stablehlo.case", "stablehlo.return")
    assert {k: v for k, v in gpu.items() if k not in wrappers} == {
        k: v for k, v in plain.items() if k not in wrappers
    }
    assert cpu["stablehlo.transpose"] > plain["stablehlo.transpose"]


@pytest.mark.parametrize("with_conv", [True, False], ids=["conv", "no-conv"])
def test_fn_is_traced_once_and_a_program_without_convolutions_is_left_alone(with_conv):
    """The CPU variant is built from the one jaxpr of ``fn``; without a convolution
    there is no platform selection at all, so no platform pays for the rewrite."""
    layout = CONVS[0]
    loss = conv_loss(layout) if with_conv else lambda w, x: jnp.sum(jnp.tanh(w * jnp.sum(x)) ** 2)
    traces = []

    def fn(w, x):
        traces.append(1)
        return jax.grad(loss)(w, x)

    w, x = arrays(layout)
    staged = str(jax.make_jaxpr(canonical_convolutions(fn))(w, x))
    assert len(traces) == 1
    assert ("platform_index" in staged) == with_conv
    assert staged.count("conv_general_dilated") == (4 if with_conv else 0)  # 2 per variant
    np.testing.assert_allclose(
        jax.jit(canonical_convolutions(fn))(w, x), jax.jit(fn)(w, x), rtol=1e-6
    )
