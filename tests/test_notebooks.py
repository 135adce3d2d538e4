"""Every notebook under notebooks/ runs top to bottom (its code cells, in order, in one namespace).

Notebooks are project files, so running their cells here is no different from importing a module."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys):
    nb = json.loads(path.read_text())
    namespace: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        code = compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec")
        exec(code, namespace)  # noqa: S102 - running the project's own notebook cells
    assert "x" in namespace and capsys.readouterr().out
