"""The documentation site: it builds in strict mode and documents every public name."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

import sam_optax
import sam_optax.flax

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_griffe_rst", ROOT / "docs" / "_griffe_rst.py")
_griffe_rst = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_griffe_rst)
markdown_from_rst = _griffe_rst.markdown_from_rst


def test_rst_math_and_roles_become_markdown():
    text = (
        "Summary with :func:`sam` and :math:`\\rho`.\n\n"
        "    .. math::\n\n"
        "        e = \\rho g\n"
        "        / \\lVert g \\rVert\n\n"
        "    After.\n"
    )
    assert markdown_from_rst(text) == (
        "Summary with `sam` and $\\rho$.\n\n"
        "    $$\n"
        "    e = \\rho g\n"
        "    / \\lVert g \\rVert\n"
        "    $$\n\n"
        "    After."
    )


def test_every_public_name_has_an_api_entry():
    documented = set()
    for page in (ROOT / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: (\S+)", page.read_text(), flags=re.M))
    public = {f"sam_optax.{name}" for name in sam_optax.__all__}
    public |= {f"sam_optax.flax.{name}" for name in sam_optax.flax.__all__}
    assert sorted(public - documented) == []


def test_site_names_the_repository_of_pyproject():
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert yaml.safe_load((ROOT / "mkdocs.yml").read_text())["repo_url"] == urls["Repository"]


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path):
    # Strict: a broken link, a reference mkdocstrings cannot resolve or a docstring
    # griffe cannot parse is an error.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    methods = (tmp_path / "api" / "methods" / "index.html").read_text()
    assert 'class="arithmatex"' in methods and ".. math::" not in methods
    # The notebooks are stored executed: their pages show the figures.
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = (tmp_path / "notebooks" / notebook.stem / "index.html").read_text()
        assert "data:image/png" in page, notebook.name
