"""experiments/train_ab.py as users run it (a subprocess): variants that name a mesh run on it, alternating with
the one-device baseline, and a mesh larger than the process's devices is refused by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _train_ab(*variants, devices: int, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "train_ab.py"), "--preset", "tiny",
                           "--rounds", "1", "--steps", "1", "--mtp", "off", *variants],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow                       # an experiment script's run: two tiny-preset train steps compiled
def test_mesh_variant_runs_beside_the_one_device_baseline():
    r = _train_ab("one=", "data2=mesh.data=2", devices=2)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\| off \| (\w+) \| (\d+) \| ([0-9.]+)x \|", r.stdout, re.M)
    assert [name for name, *_ in rows] == ["one", "data2"] and all(int(tps) > 0 for _, tps, _ in rows)
    assert rows[0][2] == "1.000"


def test_mesh_larger_than_the_devices_is_refused():
    r = _train_ab("expert4=mesh.data=1,mesh.expert=4", "one=", devices=2, timeout=300)    # refused before any compile
    assert r.returncode != 0
    assert "needs 4 devices, this process has 2" in r.stderr and "device_count=4" in r.stderr
