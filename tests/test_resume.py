"""Whole-run behaviour through train(): resume equals an uninterrupted run, checkpoints move across meshes,
and two processes equal one."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dsv3_jax.config import MeshConfig
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.checkpoint import Checkpointer
from dsv3_jax.train.loop import train
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.state import state_shardings
from train_utils import make_run, write_corpus

MESH_222 = MeshConfig(data=2, expert=2, tensor=2)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(l) for l in fh]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """10 steps on a (2,2,2) mesh with checkpoints at 5 and 10."""
    root = tmp_path_factory.mktemp("runs")
    corpus = write_corpus(root / "corpus.txt")
    rc = make_run(MESH_222, data=corpus)
    run_dir = str(root / "straight")
    summary = train(rc, run_dir, progress=False)
    return rc, run_dir, summary, corpus


def test_resume_equals_uninterrupted(straight_run, tmp_path):
    """Stop after step 5 (its checkpoint, taken from the same deterministic run), --resume, 5 more steps:
    identical losses, params and biases (bit-exact: same programs on the same data)."""
    rc, straight_dir, summary, _ = straight_run
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(straight_dir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "10"))        # as if it had stopped at 5
    resumed = train(None, resumed_dir, resume=True, progress=False)
    assert resumed["start_step"] == 5 and resumed["end_step"] == 10
    a, b = read_metrics(straight_dir), read_metrics(resumed_dir)
    assert [r["step"] for r in b] == list(range(1, 11))                 # the log reads like one run
    np.testing.assert_array_equal([r["loss"] for r in b], [r["loss"] for r in a])
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 (resumed["state"].params, resumed["state"].router_state),
                 (summary["state"].params, summary["state"].router_state))


@pytest.mark.parametrize("shape", [MeshConfig(data=8), MeshConfig(data=1)])
def test_checkpoint_restores_onto_other_meshes(straight_run, shape):
    rc, run_dir, summary, _ = straight_run
    devices = jax.devices()[:8 if shape.data == 8 else 1]
    mesh = make_mesh(shape, devices)
    model, opt = Transformer(rc.model), make_optimizer(rc.train)
    abstract, shardings = state_shardings(model, rc, mesh, opt)
    ckpt = Checkpointer(run_dir)
    step, state, data_state = ckpt.restore(abstract, shardings)
    ckpt.close()
    assert step == 10 and data_state["step"] == 10
    leaf = state.params["moe_layers"]["layers"]["moe"]["experts_gate_up"]
    assert len(leaf.sharding.device_set) == len(devices)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 state, summary["state"])


def test_fresh_run_refuses_existing_dir(straight_run):
    rc, run_dir, _, _ = straight_run
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    with pytest.raises(FileExistsError, match="--resume"):
        train(rc, run_dir, progress=False)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == before


def test_resuming_a_finished_run_trains_nothing_and_says_so(straight_run, tmp_path, capsys):
    """`train --resume` on a run already at train.steps (a restarted job after its last checkpoint) exits 0,
    says there is nothing to train and prints the run's last metrics (they were all null); asking for fewer
    steps than the run has is refused with exit 2. Neither touches the run's files."""
    from dsv3_jax.__main__ import main
    _, straight_dir, summary, _ = straight_run
    run = str(tmp_path / "done")
    shutil.copytree(straight_dir, run)
    files = {p: open(os.path.join(run, p), "rb").read() for p in ("config.json", "metrics.jsonl")}
    steps = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert main(["train", "--run-dir", run, "--resume", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "already reached train.steps=10: nothing to train" in err
    assert json.loads(out.strip().splitlines()[-1])["loss"] == summary["last"]["loss"]
    assert main(["train", "--run-dir", run, "--resume", "--no-progress", "train.steps=5"]) == 2
    assert "is at step 10, past train.steps=5; give train.steps above 10" in capsys.readouterr().err
    assert {p: open(os.path.join(run, p), "rb").read() for p in files} == files
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == steps


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train(None, str(tmp_path / "empty"), resume=True, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(straight_run, tmp_path):
    """2 processes x 4 CPU devices (one JAX runtime over gloo) give the losses of 1 process x 8 devices."""
    rc, straight_dir, _, corpus = straight_run
    port = _free_port()
    run_dir = str(tmp_path / "mp")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    overrides = [f"{s}.{k}={json.dumps(v)}" for s, d in (("model", dataclasses.asdict(rc.model)), ("train", dataclasses.asdict(rc.train)))
                 for k, v in d.items() if not isinstance(v, (dict, list)) and v is not None]
    procs = [subprocess.Popen([sys.executable, "-m", "dsv3_jax", "train", "--run-dir", run_dir, "--no-progress",
                               "--mesh", "data=2,expert=2,tensor=2", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), *overrides],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    a, b = read_metrics(straight_dir), read_metrics(run_dir)
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)


def test_metrics_line_cut_by_a_crash_counts_as_lost():
    from dsv3_jax.train.loop import _logged_step
    assert _logged_step('{"step": 3}\n') == 3
    assert _logged_step('{"step": 4, "lo') == float("inf") and _logged_step("garbage\n") == float("inf")
