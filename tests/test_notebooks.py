"""The notebooks under notebooks/ run top to bottom without an error.

Each is executed with nbclient in a fresh kernel ("python3": the ipykernel of the environment
running the tests), from the repository root. The committed notebooks carry no outputs; this test
is what keeps them working. Nothing about their timings is asserted.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NEEDS = ("nbclient", "nbformat", "ipykernel", "matplotlib")
INSTALL_HINT = "pip install -e '.[notebooks]'"


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_sparse_formats_and_kernels.ipynb",
        "02_pruning_and_quantizing_minilm.ipynb",
        "03_pipelines_tour.ipynb",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_errors(path: Path):
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"executing the notebooks needs {', '.join(missing)}: {INSTALL_HINT}")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []) if out.output_type == "error"]
    assert not errors
    assert all(cell.get("execution_count") for cell in nb.cells if cell.cell_type == "code" and cell.source.strip())
