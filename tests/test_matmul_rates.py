"""experiments/matmul_rates.py as users run it (a subprocess, the repo on PYTHONPATH), at a tiny size and pinned
to one core: both libraries' processes run, every product shape gets a positive rate per library and round, and
the table's ratio is the median of the per-round ratios it reports."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow                       # an experiment script's smoke run (two processes importing jax / torch)
def test_matmul_rates_tiny_run(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "matmul_rates.py"), "--rounds", "2",
                        "--gflop", "0.002", "--repeats", "1", "--cores", "1", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "matmul_rates.json").read_text())
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    from matmul_rates import SHAPES
    names = [s[0] for s in SHAPES]
    assert len(data["rounds"]) == 2 and [row["what"] for row in data["rows"]] == names
    for rnd in data["rounds"]:
        assert set(rnd) == {"xla", "torch"}
        assert all(rnd[lib][n] > 0 for lib in ("xla", "torch") for n in names)
    for row in data["rows"]:
        want = statistics.median(rnd["xla"][row["what"]] / rnd["torch"][row["what"]] for rnd in data["rounds"])
        assert abs(row["xla_over_torch"] - want) < 1e-12
    table = (tmp_path / "matmul_rates.md").read_text()
    assert table.count("\n| ") == len(names) + 1 and "XLA / torch" in table
    assert data["pinned_cores"] == 1 and "pinned to 1 core(s)" in table
