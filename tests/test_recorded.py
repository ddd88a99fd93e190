"""The recorded sweeps and the generated method guide: complete, and what the scripts write."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from sam_optax import registry
from sam_optax.compare import parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "benchmarks", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _script("sweep")
choosing = _script("choosing")


def test_every_method_has_a_grid_of_at_least_four_values_with_the_papers():
    for name in registry.METHODS:
        if name == "sgd":
            continue
        grid = sweep.GRIDS[name]
        assert "rho" in grid or "rho" not in parameters(name), name
        for key, values in grid.items():
            assert len(values) >= 4, (name, key)
            paper = parameters(name)[key].paper
            assert float(paper) in [float(v) for v in values], (name, key, paper)


def test_every_recorded_sweep_is_saved_for_each_setting():
    for setting, method, key in sweep.plan(list(sweep.SETTINGS), list(sweep.GRIDS), "all"):
        path = sweep.OUT / setting / f"{method}_{key}.json"
        assert path.exists(), path
        rows = json.loads(path.read_text())["rows"]
        assert json.loads(path.read_text())["config"]["seeds"] == 3
        swept = [r for r in rows if r["overrides"]]
        default = float(parameters(method)[key].default)
        expected = {float(v) for v in sweep.GRIDS[method][key]} - {default}
        assert {float(r["overrides"][key]) for r in swept} >= expected, path


def test_the_sweep_tables_are_what_the_script_writes():
    text = sweep.report(sweep.OUT, sweep.REPORT, list(sweep.SETTINGS), write=False)
    assert sweep.REPORT.read_text() == text
    for line in text.splitlines():
        if line.startswith("!["):
            assert (sweep.REPORT.parent / line.split("](")[1][:-1]).exists(), line


def test_the_method_guide_is_what_the_script_writes():
    data = choosing.load(choosing.HERE / "compare")
    assert choosing.PAGE.read_text() == choosing.page(data, sweep.OUT)
    assert choosing.PAGE.with_suffix(".png").exists()
    # Built from the current registry: every method is on the page, at its defaults.
    for name in registry.METHODS:
        if name != "sgd":
            assert f"`{name}`" in choosing.PAGE.read_text(), name
            for setting in choosing.SETTINGS:
                assert data[setting][name]["overrides"] == {}


def test_every_family_has_a_page():
    for name, method in registry.METHODS.items():
        _, page = registry.FAMILIES[method.family]
        assert name == "sgd" or os.path.exists(os.path.join(ROOT, "docs", "methods", page))


@pytest.mark.slow
def test_a_quick_sweep_runs_resumes_and_reports(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--settings", "clean", "--methods", "ae_sam"]
    assert sweep.main(argv) == 0
    saved = tmp_path / "clean" / "ae_sam_rho.json"
    rows = json.loads(saved.read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "sgd",
        "ae_sam:rho=0.02",
        "ae_sam:rho=0.1",
        "ae_sam:rho=0.2",
    ]
    references = json.loads((tmp_path / "clean" / "defaults.json").read_text())["rows"]
    assert [r["method"] for r in references] == ["sgd", "sam", "ae_sam"]
    report = (tmp_path / "SWEEPS.md").read_text()
    assert "| 0.05 (default) |" in report and "![ae_sam: accuracy against rho]" in report
    assert (tmp_path / "ae_sam_rho.png").read_bytes()[:4] == b"\x89PNG"
    before = saved.stat().st_mtime_ns
    assert sweep.main([*argv, "--no-report"]) == 0  # resumes: nothing is run again
    assert saved.stat().st_mtime_ns == before
