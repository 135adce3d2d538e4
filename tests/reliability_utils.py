"""Shared helpers of the reliability tests (test_reliability.py, test_bad_input.py, test_crash.py)."""
# ruff: noqa: F401  (re-exported to the three test modules)

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.__main__ import main
from dsv3_jax.config import MeshConfig, RunConfig
from dsv3_jax.data import make_train_iterator, split_train_val
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train import loop as loop_lib
from dsv3_jax.train import step as step_lib
from dsv3_jax.train.checkpoint import CheckpointError, Checkpointer, load_run_config
from dsv3_jax.train.loop import TrainingStopped, train
from dsv3_jax.train.optimizer import make_optimizer
from dsv3_jax.train.state import state_shardings
from train_utils import make_run, write_corpus

REPO = Path(__file__).resolve().parents[1]
MARK = 0                                   # the poison token id of the fault injector
REL_MODEL = dict(num_hidden_layers=2, num_nextn_predict_layers=0)   # one dense + one MoE layer (router bias);
                                                                    # the crash test runs the full test model
REL_TRAIN = dict(steps=6, checkpoint_every=2, keep_checkpoints=10, eval_every=3, log_every=1)


def rel_run(mesh: MeshConfig = MeshConfig(), model_changes=None, **train_changes) -> RunConfig:
    return make_run(mesh, model_changes={**REL_MODEL, **(model_changes or {})}, **{**REL_TRAIN, **train_changes})


def cli_overrides(rc: RunConfig) -> list[str]:
    """`section.field=value` for every model and train field (the CLI starts from the tiny preset)."""
    return [f"{s}.{k}={json.dumps(v)}" for s, d in (("model", dataclasses.asdict(rc.model)),
                                                   ("train", dataclasses.asdict(rc.train)))
            for k, v in d.items() if not isinstance(v, dict) and v is not None]


def cli(rc: RunConfig, run_dir, *extra, mesh: str = "data=8") -> list[str]:
    return ["train", "--run-dir", str(run_dir), "--no-progress", "--mesh", mesh, *cli_overrides(rc), *extra]


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(l) for l in fh]


@functools.lru_cache
def _one_device_target(rc: RunConfig):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    return state_shardings(Transformer(rc.model), rc, mesh, make_optimizer(rc.train))


def restore(run_dir, step=None):
    """-> (step, state, data state) restored onto one device."""
    rc = load_run_config(str(run_dir))
    abstract, shardings = _one_device_target(dataclasses.replace(rc, train=dataclasses.replace(rc.train, data=None)))
    ckpt = Checkpointer(str(run_dir))
    try:
        return ckpt.restore(abstract, shardings, step)
    finally:
        ckpt.close()


STATE_FIELDS = ("step", "params", "opt_state", "router_state", "rng", "skipped", "total_skipped")


def assert_same(a, b, fields=STATE_FIELDS):
    for f in fields:
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f),
                     getattr(a, f), getattr(b, f))


def assert_same_losses(run_dir, ref_dir):
    a, b = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(b) + 1))
    for key in ("loss", "ce", "grad_norm", "val_loss"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key


def snapshot(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}




@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
