"""The ablation scripts' CI-sized runs (`--quick`: 2 arms, a few steps, a smaller model), as users run them:
a subprocess with the repo on PYTHONPATH. They must write the table, the run records and the plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, *extra: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)                         # one CPU device, as the scripts are run
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out),
                        "--work-dir", str(out / "work"), *extra], env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_ablate_balance_quick(tmp_path):
    _run("ablate_balance.py", tmp_path, "--steps", "4")
    table = (tmp_path / "ablate_balance_quick.md").read_text()
    assert "| no balancing | 2 |" in table and "not run" in table         # 2 arms x 2 seeds, the rest marked
    for kind in ("maxvio", "load", "bias", "val"):
        assert (tmp_path / f"ablate_balance_quick_{kind}.png").stat().st_size > 1000
    rec = json.loads((tmp_path / "ablate_balance_quick_runs" / "sign_sched_s0.json").read_text())
    assert len(rec["steps"]) == 4 and len(rec["expert_counts"]) == 4             # per-step load was logged
    assert any(abs(b) > 0 for layer in rec["router_bias"][-1] for b in layer)    # the bias moved
    again = _run("ablate_balance.py", tmp_path, "--steps", "4")                  # finished arms are reused
    assert again.stdout.count("reusing") == 4


@pytest.mark.slow
def test_ablate_mtp_quick(tmp_path):
    _run("ablate_mtp.py", tmp_path, "--steps", "3", "--seeds", "1")
    table = (tmp_path / "ablate_mtp_quick.md").read_text()
    assert "Second-token acceptance" in table
    rec = json.loads((tmp_path / "ablate_mtp_quick_runs" / "d1_s0.json").read_text())
    assert 0 <= rec["acceptance"][0] <= 1
    assert (tmp_path / "ablate_mtp_quick.png").stat().st_size > 1000
