"""The six notebooks under notebooks/: stored with their outputs (so they render where people read them), and
each runs top to bottom in a real Jupyter kernel (nbclient + ipykernel), as users run them.

A cell promises a plot when it calls `plt.show()` or displays an `Image`; such a cell must leave an image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_mla", "02_routing", "03_balancing", "04_mtp_speculative", "05_sharding", "06_released_weights"]


def _promises_plot(cell) -> bool:
    return "plt.show()" in cell.source or "Image(" in cell.source


def _check_outputs(nb, name: str) -> None:
    """No cell failed, every code cell ran, and every cell that promises a plot shows an image."""
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        where = f"{name} code cell {i}"
        assert cell.execution_count is not None, f"{where} was not executed"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{where} raised {errors[0].ename}: {errors[0].evalue}"
        if _promises_plot(cell):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{where} promises a plot but shows none"


def test_the_six_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    _check_outputs(nb, path.name)
    assert nb.cells[0].cell_type == "markdown" and "Inputs" in nb.cells[0].source   # says what it needs


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_in_a_kernel(path, monkeypatch):
    """Execute a fresh copy (outputs cleared) in a kernel with the repository importable; any error fails."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # The kernel inherits this environment: the repo on the path, one CPU device (05 asks for 8 itself).
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    _check_outputs(nb, path.name)
