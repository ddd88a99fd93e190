"""Execute the notebooks in place and store their outputs, figures included.

Run from the repository root, on a CPU, after any change to a notebook or to what it
calls (registry defaults, the comparison)::

    python notebooks/execute.py                      # every notebook, one at a time
    python notebooks/execute.py 03_methods.ipynb     # only some

Each notebook runs top to bottom in a fresh kernel of this interpreter, with this
checkout first on the path and JAX on the CPU, so the stored outputs come from the code
next to them. Apart from the wall-clock times some cells print, the outputs are the same
from run to run: every random draw in the notebooks has a fixed seed. Cell timings and
the kernel's own metadata are not stored, so a re-run changes only what the notebooks
show. The tests (``tests/test_notebooks.py``) execute every notebook from scratch with
the same kernel.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL = "sam-optax-notebooks"


def kernel_env(directory: pathlib.Path) -> dict[str, str]:
    """Writes a kernel spec for this interpreter under ``directory``; returns the env to use.

    The spec lives in its own Jupyter path, so nothing outside the project's install is
    needed (no user-level kernel, no ``python`` on ``PATH``). The returned variables put
    ``directory`` on the Jupyter path, this checkout first on ``PYTHONPATH`` and JAX on
    the CPU.
    """
    spec = directory / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    return {
        "JUPYTER_PATH": str(directory),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }


def execute(nb: nbformat.NotebookNode, timeout: int = 1800) -> nbformat.NotebookNode:
    """Runs ``nb`` from scratch in the kernel of :func:`kernel_env`; returns it with outputs.

    Stored outputs are cleared first; the notebook's metadata is kept as it was (so that
    Colab still opens it with its own Python 3 kernel).
    """
    nb = copy.deepcopy(nb)
    metadata = copy.deepcopy(nb.metadata)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=timeout,
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    client.execute()  # raises CellExecutionError at the first cell that fails
    nb.metadata = metadata
    return nb


def main(names: list[str]) -> None:
    paths = [HERE / name for name in names] or sorted(HERE.glob("*.ipynb"))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(kernel_env(pathlib.Path(tmp)))
        for path in paths:
            start = time.perf_counter()
            nb = execute(nbformat.read(path, as_version=4))
            nbformat.write(nb, path)
            print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
