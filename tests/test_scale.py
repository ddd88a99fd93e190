"""``benchmarks/scale.py --quick``: its tables, their targets and the recorded sections.

The figures are read from compiled programs of tiny models, so only what holds at any
size is checked: a two-gradient step has about twice ERM's FLOPs, every row has its
columns, and a ``shard_map`` step with per-device gradients all-reduces its output.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import scale  # noqa: E402


def rows(markdown: str) -> dict[str, list[str]]:
    """The table's rows by method label, as lists of cells."""
    out = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0].strip("`")] = cells
    return out


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    readme = tmp_path_factory.mktemp("scale") / "README.md"
    readme.write_text("# Benchmarks\n\nKept.\n")
    argv = ["--quick", "--record", "--readme", str(readme), "--models", "vit_b16"]
    scale.main([*argv, "--layouts", "fsdp,shard_map", "--methods", "sam"])
    return readme.read_text()


@pytest.mark.slow
def test_quick_run_records_one_table_per_layout_with_its_targets(recorded):
    assert recorded.startswith("# Benchmarks\n\nKept.\n")
    for layout in ("fsdp", "shard_map"):
        key = f"scale-vit_b16-{layout}"
        match = re.search(rf"<!-- BEGIN {key}-(\w+) -->(.*?)<!-- END {key}-\1 -->", recorded, re.S)
        assert match, layout
        body = match.group(2)
        header = next(line for line in body.splitlines() if line.startswith("| method"))
        table = rows(body)
        assert set(table) == {"sgd (ERM)", "sam"}
        for cells in table.values():
            assert len(cells) == header.count("|") - 1
        assert table["sgd (ERM)"][1] == "1.000"
        assert 1.9 <= float(table["sam"][1]) <= 2.1  # two gradients
        assert table["sam"][-1] == "pass" or table["sam"][-1].startswith("FAIL: ")
        assert table["sgd (ERM)"][-1] == "—"
        assert "GFLOP per device" in body and "per-device params" in body
        if layout == "shard_map":  # ERM averages its gradient, SAM its output
            assert table["sgd (ERM)"][6] != "0" and table["sam"][6] != "0"


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        scale.contenders(["sam", "nope"])


def test_fsdp_spec_shards_the_largest_dimension_that_divides():
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    assert scale.fsdp_spec(jnp.zeros((3, 16, 8)), 8) == P(None, "data")
    assert scale.fsdp_spec(jnp.zeros((5, 3)), 8) == P()
    assert scale.fsdp_spec(jnp.zeros(()), 8) == P()


def test_an_unknown_tpu_topology_is_named():
    """``--tpu`` compiles for a TPU topology with libtpu's compile-only client; without
    libtpu, or for a topology it does not know, the run stops and says why."""
    with pytest.raises(SystemExit, match="--tpu 'v0:1x1': no such TPU topology here"):
        scale.main(["--quick", "--tpu", "v0:1x1"])


def test_esam_selects_on_each_device_under_jit_only(monkeypatch):
    """Under jit ESAM gets ``groups`` = the number of devices; under shard_map each
    device already sees its own batch."""
    seen, original = [], scale.registry.make_optimizer

    def spy(name, *args, **kwargs):
        seen.append(kwargs.get("groups"))
        return original(name, *args, **kwargs)

    monkeypatch.setattr(scale.registry, "make_optimizer", spy)
    esam = scale.contenders(["esam"], devices=8)[1]
    esam.make(None), esam.make("data")
    assert seen == [8, None]
