"""``sam_optax.profile_step``: FLOPs, bytes, collectives and times of a compiled step.

The expected figures are worked out by hand from the shapes: a matrix product of
``[m, k] @ [k, n]`` is ``2 m k n`` floating-point operations, an array's bytes are its
elements times 4 (float32), and each explicit collective of a ``shard_map`` program is
one instruction whose result has a known per-device shape.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from docs_pages import FRAGMENT
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax.profile import COLLECTIVES, CollectiveStats, collectives

M, K, N = 64, 32, 16


def spec(shape, sharding=None):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)


def test_flops_and_bytes_of_a_matrix_product_on_one_device():
    profile = sam_optax.profile_step(lambda a, b: a @ b, spec((M, K)), spec((K, N)))
    assert profile.flops == 2 * M * K * N
    assert profile.argument_bytes == 4 * (M * K + K * N)
    assert profile.output_bytes == 4 * M * N
    assert profile.alias_bytes == 0
    assert profile.collectives == {kind: CollectiveStats(0, 0) for kind in COLLECTIVES}
    assert min(profile.trace_s, profile.lower_s, profile.compile_s) > 0
    assert min(profile.trace_cpu_s, profile.lower_cpu_s, profile.compile_cpu_s) > 0


def test_a_function_is_traced_afresh_each_time_and_a_jitted_one_keeps_its_options():
    traces = []

    def f(x, scale):
        traces.append(1)
        return x * scale

    for _ in range(2):
        sam_optax.profile_step(f, spec((8,)), 2.0)
    assert len(traces) == 2
    donated = jax.jit(f, donate_argnums=0, static_argnums=1)
    profile = sam_optax.profile_step(donated, spec((8,)), 2.0)
    assert profile.alias_bytes == 4 * 8  # the output reuses the donated input


@pytest.fixture(scope="module")
def mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))


def test_each_collective_kind_is_counted_once_with_its_per_device_result_bytes(mesh):
    """8 devices, a [64, 16] array sharded by rows: each device holds [8, 16]."""
    shard = functools.partial(
        jax.shard_map, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False
    )
    rows, cols = 64, 16
    local = rows // 8 * cols  # elements per device
    programs = {
        "all-reduce": (lambda x: jax.lax.psum(x, "data"), local),
        "all-gather": (lambda x: jax.lax.all_gather(x, "data", tiled=True)[:8], 8 * local),
        "reduce-scatter": (
            lambda x: jnp.tile(jax.lax.psum_scatter(x, "data", tiled=True), (8, 1)),
            local // 8,
        ),
        "all-to-all": (lambda x: jax.lax.all_to_all(x, "data", 1, 1, tiled=True), local),
        "collective-permute": (
            lambda x: jax.lax.ppermute(x, "data", [(i, (i + 1) % 8) for i in range(8)]),
            local,
        ),
    }
    x = spec((rows, cols), NamedSharding(mesh, P("data")))
    for kind, (body, elements) in programs.items():
        profile = sam_optax.profile_step(shard(body), x)
        assert profile.collectives[kind] == CollectiveStats(1, 4 * elements), kind
        assert profile.argument_bytes == 4 * local  # one device's shard
        others = {k: v for k, v in profile.collectives.items() if k != kind}
        assert all(v == CollectiveStats(0, 0) for v in others.values()), (kind, others)


def test_a_sharded_sum_all_reduces_one_scalar_per_device(mesh):
    x = spec((64, 16), NamedSharding(mesh, P("data")))
    profile = sam_optax.profile_step(jnp.sum, x)
    assert profile.collectives["all-reduce"] == CollectiveStats(1, 4)


def test_asynchronous_pairs_and_tuples_count_once():
    hlo = """
      %ags = (f32[2,4]{1,0}, f32[16,4]{1,0}) all-gather-start(f32[2,4]{1,0} %p)
      %agd = f32[16,4]{1,0} all-gather-done((f32[2,4]{1,0}, f32[16,4]{1,0}) %ags)
      %cp = bf16[3]{0} collective-permute(bf16[3]{0} %q), source_target_pairs={{0,1}}
      ROOT %ar = (f32[], pred[2]{0}) all-reduce(f32[] %a, pred[2]{0} %b), to_apply=%or
    """
    stats = collectives(hlo)
    assert stats["all-gather"] == CollectiveStats(1, 4 * 16 * 4)
    assert stats["collective-permute"] == CollectiveStats(1, 2 * 3)
    assert stats["all-reduce"] == CollectiveStats(1, 4 + 2)


def test_bad_step_fn_is_explained():
    with pytest.raises(ValueError, match="`step_fn` must be a function"):
        sam_optax.profile_step(3.0, spec((2,)))


def test_the_guide_profiles_erm_and_sam_as_written():
    """The Python blocks of docs/scale.md run in order on the 8 test devices (but its
    fragment, which needs libtpu)."""
    text = (Path(__file__).parents[1] / "docs" / "scale.md").read_text()
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert sum(b.startswith(FRAGMENT) for b in blocks) == 1
    for block in (b for b in blocks if not b.startswith(FRAGMENT)):
        exec(compile(block, "docs/scale.md", "exec"), namespace)
    erm, sam = namespace["erm"], namespace["sam"]
    assert 1.95 <= sam.flops / erm.flops <= 2.05  # two forward and backward passes
    assert sam.argument_bytes == erm.argument_bytes + 8  # SAM adds two int32 counters
    # FSDP on 8 devices: the probe gathers the weights again.
    assert sam.collectives["all-gather"].count > erm.collectives["all-gather"].count > 0
