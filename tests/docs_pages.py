"""Runs the Python blocks of a documentation page as a reader pastes them.

The blocks of a page run in order in one fresh module, so a page must define (or import)
everything it uses before it uses it. A block that cannot run on its own (a script for
many hosts, a line of a loop the reader already has) starts with a comment
``# Fragment: <why>``, visible on the page; it is compiled, not run.
"""

from __future__ import annotations

import pathlib
import re
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```$", flags=re.M | re.S)
FRAGMENT = "# Fragment: "


def python_blocks(page: pathlib.Path) -> list[str]:
    """The fenced Python blocks of ``page``, in order."""
    return FENCE.findall(page.read_text())


def run_page(page: pathlib.Path, monkeypatch) -> types.ModuleType:
    """Runs every block of ``page`` but its fragments in one module; returns the module.

    The module is registered in ``sys.modules`` (through ``monkeypatch``, so it is gone
    after the test) for dataclasses, Equinox modules and pickling.
    """
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(DOCS)).removesuffix(".md"))
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    for i, block in enumerate(python_blocks(page), 1):
        code = compile(block, f"{page.relative_to(ROOT)}, block {i}", "exec")
        if not block.startswith(FRAGMENT):
            exec(code, module.__dict__)
    return module
