"""The notebooks: each opens in Colab, is stored executed, and runs top to bottom from scratch."""

from __future__ import annotations

import importlib.util
import pathlib
import tomllib

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("execute", ROOT / "notebooks" / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)
# The one place that names the repository: pyproject.toml's [project.urls].
REPOSITORY = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
GITHUB = REPOSITORY.removeprefix("https://github.com/")


def test_the_four_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_flax.ipynb",
        "03_methods.ipynb",
        "04_sharpness.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_in_colab_and_is_stored_executed(path):
    nb = nbformat.read(path, as_version=4)
    badge = f"https://colab.research.google.com/github/{GITHUB}/blob/main/notebooks/{path.name}"
    assert badge in nb.cells[0].source
    install = nb.cells[1]
    assert install.cell_type == "code"
    assert "import google.colab" in install.source
    assert f"git+{REPOSITORY}" in install.source
    # Stored as notebooks/execute.py leaves them: every cell run once, in order, without
    # an error or a warning, with its figures, and no per-cell timings.
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        "run python notebooks/execute.py"
    )
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    stderr = "".join(out.text for out in outputs if out.get("name") == "stderr")
    assert "Warning" not in stderr, stderr
    assert any("image/png" in out.get("data", {}) for out in outputs), "no figure stored"
    assert not any("execution" in cell.metadata for cell in code)
    assert nb.metadata.kernelspec.name == "python3"  # Colab's kernel, not the script's


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """The kernel of notebooks/execute.py (this interpreter, the worktree first on the path)."""
    for name, value in execute.kernel_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # figures are drawn, not stored


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel):
    # execute() clears the stored outputs first: every output below is fresh.
    nb = execute.execute(nbformat.read(path, as_version=4), timeout=600)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
