"""Every moe_impl through the CLI on a (data 2, expert 2, tensor 2) mesh of 8 host CPU devices, as users
run it (`python -m dsv3_jax train --preset tiny --mesh data=2,expert=2,tensor=2 model.moe_impl=X`): the
logged losses equal the same command's on one device.

1e-4 relative: every implementation computes the same sums in fp32, only split over shards and ordered
differently (rounding near 1e-7 relative); a dropped, duplicated or misrouted token-expert pair, or a
missing psum, moves the loss by far more. Slow: each run compiles a train step (about a minute of CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SMALL = ["train.steps=2", "train.global_batch_size=8", "train.seq_len=32", "train.eval_batches=1",
         "train.checkpoint_every=100", "train.warmup_steps=1"]


def train_losses(run_dir: Path, devices: int, *args: str) -> list:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "dsv3_jax", "train", "--preset", "tiny", "--run-dir", str(run_dir),
                        *args, *SMALL], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory):
    """The shared baseline: the preset's default dispatch on one device ("auto": blocked on CPU)."""
    return train_losses(tmp_path_factory.mktemp("one") / "run", 1)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "dense", "blocked", "ragged", "gathered", "expert_parallel"])
def test_mesh_losses_equal_one_device(one_device_losses, impl, tmp_path):
    losses = train_losses(tmp_path / "run", 8, "--mesh", "data=2,expert=2,tensor=2", f"model.moe_impl={impl}")
    assert len(losses) == len(one_device_losses) == 2
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-4)


@pytest.mark.slow
def test_mesh_losses_equal_one_device_with_pod_memory_options(one_device_losses, tmp_path):
    """The per-layer memory options of experiments/results/pod_memory.md (one capacity buffer, one kernel
    pass per slot, layer inputs offloaded) and the pod plan's zero3 + FSDP sharding (expert weights gathered
    over `data` inside the expert-parallel region, gradients reduce-scattered) change no loss."""
    losses = train_losses(tmp_path / "run", 8, "--mesh", "data=2,expert=2,tensor=2", "model.moe_impl=expert_parallel",
                          "model.moe_capacity_fractions=[1.0]", "model.moe_slot_passes=true",
                          "model.remat_policy=offload_inputs", "mesh.zero3=true", "mesh.fsdp=true")
    assert len(losses) == len(one_device_losses) == 2
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-4)
