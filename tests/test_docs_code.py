"""Every Python block of the documentation runs, page by page, as a reader pastes it.

See ``docs_pages.py`` for the rules (one module per page, ``# Fragment: <why>``). The
pages with a test module of their own run there, where their results are checked too.
"""

from __future__ import annotations

import re

import pytest
from docs_pages import DOCS, FRAGMENT, python_blocks, run_page

PAGES = [page for page in sorted(DOCS.rglob("*.md")) if python_blocks(page)]
# Each of these pages runs in its test module, which checks what the page prints.
OWN_TESTS = {
    "guides/equinox.md": "test_equinox.py",
    "guides/mixed_precision.md": "test_mixed_precision.py",
}
# Pages that compile several training steps take over a few seconds.
SLOW = {"guides/flax.md", "multi_device.md"}
PARAMS = [
    pytest.param(page, marks=[pytest.mark.slow] if rel in SLOW else [], id=rel)
    for page in PAGES
    for rel in [str(page.relative_to(DOCS))]
    if rel not in OWN_TESTS
]


def test_every_python_fence_is_seen():
    # A block the pattern misses (indented, or tagged py/python3) would go untested.
    for page in DOCS.rglob("*.md"):
        fences = re.findall(r"^\s*```\s*(py\w*)", page.read_text(), flags=re.M)
        assert fences.count("python") == len(fences) == len(python_blocks(page)), page


def test_pages_with_their_own_tests_have_them():
    for rel, module in OWN_TESTS.items():
        assert python_blocks(DOCS / rel), rel
        assert f'"{rel}"' in (DOCS.parent / "tests" / module).read_text(), module


def test_fragments_say_why():
    fragments = [b for page in PAGES for b in python_blocks(page) if b.startswith(FRAGMENT)]
    assert fragments, "the fragment marker is used; keep this test honest"
    for block in fragments:
        reason = block.splitlines()[0].removeprefix(FRAGMENT)
        assert len(reason.split()) >= 4, f"say why the block cannot run: {block[:80]!r}"


@pytest.mark.parametrize("page", PARAMS)
def test_page_runs_top_to_bottom(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a page writes lands here
    run_page(page, monkeypatch)
