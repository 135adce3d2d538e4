"""Reliability: crashes, corrupt checkpoints, a full disk, non-finite steps, bad input and impossible configs
all end in a clear error or a resume that loses nothing; no pickle and no eval anywhere in the package.
docs/reliability.md lists each fault tried here and what it cost.

Every in-process run in this file uses one model and one train step, so XLA compiles it once: a persistent
compilation cache (a temporary folder, for this module only) serves the later runs, and the step carries a
fault injector that makes the loss NaN for any batch holding token MARK (no text corpus here contains it, so
elsewhere it multiplies the loss by exactly 1). The crash test runs the real CLI in subprocesses, unpatched.
"""

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


# ----------------------------------------------------------------------------------------------------------
# Fixtures: one compile for the module, one reference run


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache as cc
    values = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
              "jax_persistent_cache_min_compile_time_secs": 0.0}
    old = {k: getattr(jax.config, k) for k in values}
    for k, v in values.items():
        jax.config.update(k, v)
    cc.reset_cache()
    yield values["jax_compilation_cache_dir"]
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _nan_injector(make_loss_fn):
    def make_poisoned_loss_fn(model, rc):
        loss_fn = make_loss_fn(model, rc)

        def poisoned(params, router_state, tokens, step):
            total, aux = loss_fn(params, router_state, tokens, step)
            return total * jnp.where(jnp.any(tokens == MARK), jnp.nan, 1.0).astype(total.dtype), aux
        return poisoned
    return make_poisoned_loss_fn


@pytest.fixture(scope="module")
def injector():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_lib, "make_loss_fn", _nan_injector(step_lib.make_loss_fn))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def reference(compile_cache, injector, corpus, tmp_path_factory):
    """6 uninterrupted steps on the 8-device data mesh, checkpoints at 2, 4 and 6."""
    rc = rel_run(data=corpus)
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    summary = train(rc, run_dir, progress=False)
    assert summary["end_step"] == 6 and sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4", "6"]
    return rc, run_dir, summary["state"]


# ----------------------------------------------------------------------------------------------------------
# Corrupt or truncated checkpoints


def corrupt(step_dir: Path, kind: str) -> None:
    """Damage the arrays of one checkpoint step the way a bad disk, a copy cut short or a stray write would."""
    files = sorted(p for p in (step_dir / "state").rglob("*") if p.is_file())
    arrays = sorted((p for p in files if p.parent.name == "d" and "ocdbt" in str(p)), key=lambda p: p.stat().st_size)
    assert files and arrays
    rng = np.random.default_rng(0)
    if kind == "truncated":                                   # every file cut in half
        for p in files:
            os.truncate(p, p.stat().st_size // 2)
    elif kind == "emptied":
        for p in files:
            os.truncate(p, 0)
    elif kind == "overwritten":                               # every file replaced by noise of the same size
        for p in files:
            p.write_bytes(rng.integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes())
    elif kind == "bytes_flipped":                             # 16 bytes inside the largest array file, same size:
        with open(arrays[-1], "r+b") as fh:                   # orbax reads it happily, only our checksum notices
            fh.seek(arrays[-1].stat().st_size // 2)
            chunk = fh.read(16)
            fh.seek(-16, os.SEEK_CUR)
            fh.write(bytes(b ^ 0xFF for b in chunk))
    elif kind == "arrays_deleted":
        for p in arrays:
            p.unlink()
    else:
        raise ValueError(kind)


CORRUPTIONS = ["truncated", "emptied", "overwritten", "bytes_flipped", "arrays_deleted"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(reference, tmp_path, kind):
    _, ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    corrupt(run_dir / "checkpoints" / "6", kind)
    with pytest.warns(UserWarning, match=r"checkpoint step 6 .* could not be restored"):
        step, state, data = restore(run_dir)
    assert step == 4 and data["step"] == 4
    assert_same(state, restore(ref_dir, 4)[1])


def test_resume_skips_a_corrupt_checkpoint_and_loses_nothing(reference, tmp_path, capfd):
    """The newest step has flipped bytes: --resume warns naming it, sets it aside, restarts from step 4, and
    ends with the losses, params, optimizer state and router biases of the uninterrupted run."""
    _, ref_dir, ref_state = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    corrupt(run_dir / "checkpoints" / "6", "bytes_flipped")
    with pytest.warns(UserWarning, match=r"checkpoint step 6 .* could not be restored \(CheckpointError: "
                                         r"\d+ array\(s\) differ from the checksums"):
        summary = train(None, str(run_dir), resume=True, progress=False)
    assert "from checkpoint step 4" in capfd.readouterr().err
    assert (summary["start_step"], summary["end_step"]) == (4, 6)
    assert [p.name.split("-")[0] for p in (run_dir / "bad_checkpoints").iterdir()] == ["6"]   # kept, not deleted
    assert_same_losses(run_dir, ref_dir)
    assert_same(summary["state"], ref_state)
    assert_same(restore(run_dir)[1], ref_state)


def test_no_restorable_checkpoint_is_a_clear_error(reference, tmp_path, capsys):
    rc, ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    for s in ("2", "4", "6"):
        corrupt(run_dir / "checkpoints" / s, "truncated")
    before = snapshot(run_dir)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"no checkpoint .* could be restored"):
        train(None, str(run_dir), resume=True, progress=False)
    with pytest.warns(UserWarning):
        assert main(cli(rc, run_dir, "--resume")) == 1
    err = capsys.readouterr().err
    assert "error: no checkpoint" in err and all(f"step {s}:" in err for s in (2, 4, 6))
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------------------------------------
# --resume on something that is not this run


def test_resume_refuses_an_empty_dir_and_another_model(reference, tmp_path, capsys):
    rc, ref_dir, _ = reference
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no run"):
        train(rc, str(empty), resume=True, progress=False)
    assert main(cli(rc, empty, "--resume")) == 2
    assert "error:" in capsys.readouterr().err and list(empty.iterdir()) == []

    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    before = snapshot(run_dir)
    other = rel_run(model_changes=dict(hidden_size=32), data=rc.train.data)
    with pytest.raises(ValueError, match=r"different model .*hidden_size"):
        train(other, str(run_dir), resume=True, progress=False)
    assert main(cli(rc, run_dir, "model.hidden_size=32", "--resume")) == 2
    err = capsys.readouterr().err
    assert "error: --resume" in err and "hidden_size" in err
    assert snapshot(run_dir) == before


# ----------------------------------------------------------------------------------------------------------
# A full disk during a save


def _enospc_on_data_write(n: int):
    """Patch orbax's JSON writer (it runs in the background commit thread of an async save) to fail with
    ENOSPC on its n-th call, as a full disk would; -> the patched function."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
    original, calls = jh.JsonCheckpointHandler._save_fn, []

    async def save_fn(self, x, directory):
        calls.append(str(directory))
        if len(calls) == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)
    return jh.JsonCheckpointHandler, save_fn


def test_full_disk_during_async_save_reports_it_and_keeps_the_last_checkpoint(reference, tmp_path, capsys,
                                                                               monkeypatch):
    """The save of step 4 fails in the background: the CLI exits 1 naming step 4 and the intact step 2, which
    restores; once there is room again, --resume ends exactly like the uninterrupted run."""
    rc, ref_dir, ref_state = reference
    run_dir = tmp_path / "run"
    cls, save_fn = _enospc_on_data_write(2)
    monkeypatch.setattr(cls, "_save_fn", save_fn)
    assert main(cli(rc, run_dir)) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: saving checkpoint step 4 .* failed \(OSError: \[Errno 28\] No space left on device",
                     err), err
    assert "the last finished checkpoint, step 2, is intact" in err
    ckpt = Checkpointer(str(run_dir))
    assert ckpt.all_steps() == [2]
    ckpt.close()
    step, state, _ = restore(run_dir)
    assert step == 2
    assert_same(state, restore(ref_dir, 2)[1])

    monkeypatch.undo()
    assert main(cli(rc, run_dir, "--resume")) == 0
    assert "from checkpoint step 2" in capsys.readouterr().err
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]   # the failed save's leftovers
    assert_same_losses(run_dir, ref_dir)
    assert_same(restore(run_dir)[1], ref_state)


def test_full_disk_on_a_real_tmpfs(reference, tmp_path):
    """The run directory on a tmpfs with room for about one and a half checkpoints (needs root to mount)."""
    rc, ref_dir, _ = reference
    size = sum(p.stat().st_size for p in (Path(ref_dir) / "checkpoints" / "2").rglob("*") if p.is_file())
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) + (256 << 10)}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the patched full-disk test covers the logic")
    try:
        with pytest.raises(CheckpointError, match=r"saving checkpoint step \d+ .* failed .*No space left on device"
                                                  r".*the last finished checkpoint, step 2, is intact"):
            train(rc, str(mnt / "run"), progress=False)
        step, state, _ = restore(mnt / "run")
        assert step == 2
        assert_same(state, restore(ref_dir, 2)[1])
    finally:   # a writer thread that failed on the full disk (tensorboard's) may still hold a file open a while
        for _ in range(5):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(1)
        else:
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)


# ----------------------------------------------------------------------------------------------------------
# Non-finite loss or gradients


def poisoned_corpus(path: Path, rc: RunConfig, poison_steps: set, n_tokens: int = 24_000) -> str:
    """A .npy token stream (ids 1..255) where exactly the batches of `poison_steps` (1-based) hold MARK."""
    tc = rc.train
    tokens = np.random.default_rng(0).integers(1, 256, n_tokens).astype(np.int32)

    def batches(tok, n):
        train_tok, _ = split_train_val(tok, tc.val_fraction, min_val_tokens=tc.seq_len + 1)
        it = make_train_iterator(train_tok, tc.seq_len, tc.global_batch_size, tc.seed)
        return [next(it) for _ in range(n)]

    windows = {tokens[i * tc.seq_len: i * tc.seq_len + tc.seq_len + 1].tobytes(): i
               for i in range(len(tokens) // tc.seq_len)}
    for s in poison_steps:
        i = windows[batches(tokens, s)[s - 1][0].tobytes()]
        tokens[i * tc.seq_len + tc.seq_len // 2] = MARK            # inside the window, not on its edges
    hit = {s for s, b in enumerate(batches(tokens, tc.steps), start=1) if (b == MARK).any()}
    assert hit == set(poison_steps), hit
    np.save(path, tokens)
    return str(path)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(reference, tmp_path):
    """Step 3 is non-finite once (skipped: nothing changes, the next step trains again); steps 6 and 7 are
    non-finite in a row with max_consecutive_skips=2: TrainingStopped, and the checkpoint it leaves (step 7)
    holds the state of the last good step, 5."""
    rc = rel_run(steps=10, checkpoint_every=1, max_consecutive_skips=2)
    rc = dataclasses.replace(rc, train=dataclasses.replace(
        rc.train, data=poisoned_corpus(tmp_path / "tokens.npy", rc, {3, 6, 7})))
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"2 consecutive steps had a non-finite loss or gradient; stopped at "
                                              r"step 7 with the last good state saved"):
        train(rc, str(run_dir), progress=False)

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0, 1, 1]
    assert [r["total_skipped"] for r in rows] == [0, 0, 1, 1, 1, 2, 3]
    assert [np.isfinite(r["loss"]) for r in rows] == [True, True, False, True, True, False, False]

    ckpt = {s: restore(run_dir, s)[1] for s in (2, 3, 4, 5, 7)}
    kept = ("params", "opt_state", "router_state")
    assert_same(ckpt[3], ckpt[2], kept + ("step",))          # the skipped update changed nothing
    assert (int(ckpt[3].skipped), int(ckpt[3].total_skipped), int(ckpt[3].step)) == (1, 1, 2)
    assert int(ckpt[4].step) == 3 and int(ckpt[4].skipped) == 0     # ... and training went on
    with pytest.raises(AssertionError):
        assert_same(ckpt[4], ckpt[3], ("params",))
    assert_same(ckpt[7], ckpt[5], kept + ("step",))          # the last checkpoint is the last good state
    assert (int(ckpt[7].skipped), int(ckpt[7].total_skipped), int(ckpt[7].step)) == (2, 3, 4)
    assert restore(run_dir)[0] == 7                            # and it is what --resume would load
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ckpt[7].params))


@pytest.mark.parametrize("error", [TrainingStopped("2 consecutive steps had a non-finite loss or gradient; "
                                                   "stopped at step 7 with the last good state saved"),
                                   CheckpointError("saving checkpoint step 4 in D failed (OSError: ...)")])
def test_cli_reports_a_stopped_or_failed_run(error, tmp_path, capsys, monkeypatch):
    """The CLI turns TrainingStopped and CheckpointError into `error: ...` and exit status 1 (the runs that
    raise them are above)."""
    def fail(*a, **k):
        raise error
    monkeypatch.setattr(loop_lib, "train", fail)
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    assert capsys.readouterr().err == f"error: {error}\n"


# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything is built or compiled, and nothing written


def _input_case(kind: str, tmp_path: Path, monkeypatch) -> tuple[dict, dict, type, str]:
    """-> (train changes, model changes, exception type, message pattern)."""
    if kind == "npy_id_too_large":
        np.save(tmp_path / "t.npy", np.r_[np.arange(200), 300, np.arange(200)].astype(np.int32))
        return dict(data=str(tmp_path / "t.npy")), {}, ValueError, r"t\.npy: 1 token id\(s\) out of range for " \
                                                                    r"vocab_size 256: values \[300\]"
    if kind == "npy_id_negative":
        np.save(tmp_path / "t.npy", np.r_[np.arange(200), -1].astype(np.int32))
        return dict(data=str(tmp_path / "t.npy")), {}, ValueError, r"out of range for vocab_size 256: values \[-1\]"
    if kind == "bin_id_too_large":
        np.r_[np.arange(500) % 256, 256, 65535].astype(np.uint16).tofile(tmp_path / "t.bin")
        return dict(data=str(tmp_path / "t.bin")), {}, ValueError, r"t\.bin: 2 token id\(s\) out of range"
    if kind == "text_with_bigger_tokenizer":            # bytes (256 ids) into a 128-row embedding
        write_corpus(tmp_path / "c.txt", 5000)
        return dict(data=str(tmp_path / "c.txt")), dict(vocab_size=128), ValueError, \
            r"tokenizer has 256 ids but model\.vocab_size=128"
    if kind == "hf_tokenizer_bigger_than_model":
        tokenizers = pytest.importorskip("tokenizers")
        tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tk.save(str(tmp_path / "tokenizer.json"))
        write_corpus(tmp_path / "c.txt", 5000)
        return dict(data=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tokenizer.json")), {}, ValueError, \
            r"tokenizer has 300 ids but model\.vocab_size=256"
    if kind == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        return dict(data=str(tmp_path / "empty.txt")), {}, ValueError, r"empty\.txt has no tokens"
    if kind == "empty_npy":
        np.save(tmp_path / "e.npy", np.zeros(0, np.int32))
        return dict(data=str(tmp_path / "e.npy")), {}, ValueError, r"e\.npy has no tokens"
    if kind == "folder_without_text":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG")
        return dict(data=str(tmp_path / "folder")), {}, ValueError, r"folder has no tokens: no text files"
    if kind == "missing_path":
        return dict(data=str(tmp_path / "nope.txt")), {}, FileNotFoundError, r"data path not found: .*nope\.txt"
    if kind == "unreadable_file":
        path = tmp_path / "secret.txt"
        write_corpus(path, 5000)
        path.chmod(0)
        if os.access(path, os.R_OK):                      # root reads anything: make the read fail instead
            import builtins
            from dsv3_jax.data import pipeline

            def fake_open(file, *a, **k):
                if os.fspath(file) == str(path):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return builtins.open(file, *a, **k)
            monkeypatch.setattr(pipeline, "open", fake_open, raising=False)
        return dict(data=str(path)), {}, OSError, r"cannot read .*secret\.txt: Permission denied"
    if kind == "not_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
        return dict(data=str(tmp_path / "latin1.txt")), {}, ValueError, r"latin1\.txt is not UTF-8"
    if kind == "float_npy":
        np.save(tmp_path / "f.npy", np.ones(500, np.float32))
        return dict(data=str(tmp_path / "f.npy")), {}, ValueError, r"expected an integer token array"
    if kind == "seq_len_beyond_positions":
        write_corpus(tmp_path / "c.txt", 5000)
        return dict(data=str(tmp_path / "c.txt"), seq_len=300), {}, ValueError, \
            r"train\.seq_len=300 is longer than model\.max_position_embeddings=256"
    if kind == "corpus_shorter_than_a_sequence":
        (tmp_path / "short.txt").write_text("tiny")
        return dict(data=str(tmp_path / "short.txt")), {}, ValueError, r"too small|fewer than"
    raise ValueError(kind)


INPUT_CASES = ["npy_id_too_large", "npy_id_negative", "bin_id_too_large", "text_with_bigger_tokenizer",
               "hf_tokenizer_bigger_than_model", "empty_file", "empty_npy", "folder_without_text", "missing_path",
               "unreadable_file", "not_utf8", "float_npy", "seq_len_beyond_positions",
               "corpus_shorter_than_a_sequence"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if train() gets as far as building the model (and so compiling anything)."""
    def refuse(*a, **k):
        raise AssertionError("train() reached the model before rejecting its input")
    monkeypatch.setattr(loop_lib, "Transformer", refuse)


@pytest.mark.parametrize("kind", INPUT_CASES)
def test_bad_input_is_a_clear_error_before_anything_runs(kind, tmp_path, monkeypatch, capsys, no_model):
    train_changes, model_changes, exc, pattern = _input_case(kind, tmp_path, monkeypatch)
    rc = rel_run(model_changes=model_changes, **train_changes)
    run_dir = tmp_path / "run"
    with pytest.raises(exc, match=pattern):
        train(rc, str(run_dir), progress=False)
    assert main(cli(rc, run_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err) and "Traceback" not in err, err
    assert not run_dir.exists()


def test_bad_input_exit_code_of_the_real_cli(tmp_path):
    """One case through `python -m dsv3_jax train` itself: exit status 2, one line, no traceback."""
    np.save(tmp_path / "t.npy", np.r_[np.arange(200), 999].astype(np.int32))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "dsv3_jax", "train", "--run-dir", str(tmp_path / "run"),
                        "--no-progress", "--data", str(tmp_path / "t.npy")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: ") and "values [999]" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Impossible configs: a ValueError naming the field, through train() and the CLI


MESH_CASES = [
    # (mesh, model changes, train changes, pattern)
    (MeshConfig(data=1, tensor=8), dict(num_attention_heads=4), {}, r"num_attention_heads=4 is not divisible by the "
                                                                    r"tensor axis \(8\)"),
    (MeshConfig(data=1, expert=8), dict(n_routed_experts=12), {}, r"n_routed_experts=12 is not divisible by the "
                                                                  r"expert axis \(8\)"),
    (MeshConfig(data=4, expert=2), {}, dict(global_batch_size=12), r"global_batch_size=12 is not divisible by data "
                                                                   r"x expert = 8"),
    (MeshConfig(data=3), {}, {}, r"has 3 devices, but there are 8 devices"),
    (MeshConfig(data=3, expert=-1), {}, {}, r"needs a multiple of 3 devices, but there are 8"),
    (MeshConfig(data=2, tensor=4), dict(vocab_size=258), {}, r"vocab_size=258 is not divisible by the tensor "
                                                              r"axis \(4\)"),
]


@pytest.mark.parametrize("mesh,model_changes,train_changes,pattern", MESH_CASES)
def test_impossible_mesh_configs_name_the_field(mesh, model_changes, train_changes, pattern, corpus, tmp_path,
                                                capsys, no_model):
    rc = rel_run(mesh, model_changes=model_changes, data=corpus, **train_changes)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=pattern):
        train(rc, str(run_dir), progress=False)
    axes = ",".join(f"{k}={getattr(mesh, k)}" for k in ("data", "expert", "tensor"))
    assert main(cli(rc, run_dir, mesh=axes)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert not run_dir.exists()


@pytest.mark.parametrize("override,pattern", [
    ("train.steps=abc", r"override 'train\.steps=abc': the value has the wrong type"),
    ("train.steps=0", r"TrainConfig\.steps must be >= 1"),
    ("model.n_group=3", r"n_group"),
    ("train.nope=1", r"train has no field 'nope'"),
    ("mesh.data=0", r"sizes must be positive"),
])
def test_bad_overrides_are_clear_errors(override, pattern, tmp_path, capsys, no_model):
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Security: no pickle, no eval/exec, config text is data


FORBIDDEN = {
    r"\bpickle\b": "pickle (checkpoints are orbax, weights safetensors, the rest JSON)",
    r"\b(cloudpickle|dill|shelve|marshal|joblib)\b": "a pickle-like serializer",
    r"allow_pickle\s*=\s*True": "np.load that may unpickle",
    r"torch\.load\b": "torch.load (unpickles)",
    r"\beval\s*\(": "eval(",
    r"\bexec\s*\(": "exec(",
    r"yaml\.(unsafe_)?load\s*\(": "yaml.load",
}


def test_package_source_has_no_pickle_and_no_eval():
    files = sorted((REPO / "dsv3_jax").rglob("*.py"))
    assert len(files) > 10
    found = [f"{f.relative_to(REPO)}:{n}: {what}: {line.strip()}"
             for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
             for pattern, what in FORBIDDEN.items() if re.search(pattern, line)]
    assert not found, "\n".join(found)


def test_config_text_is_never_evaluated(tmp_path, capsys, no_model):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for override in (f"train.seq_len={payload}", f"model.hidden_size={payload}", f"train.data={payload}"):
        code = main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", override])
        assert code == 2 and capsys.readouterr().err.startswith("error: ")
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# kill -9, five times in a row, during training and during asynchronous saves


KILLS, CRASH_STEPS = 5, 20


def _step_dirs(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _unfinished(run_dir: Path) -> list[str]:
    d = run_dir / "checkpoints"
    return sorted(p.name for p in d.iterdir() if "tmp" in p.name) if d.is_dir() else []


def _wait_for(cond, proc, timeout: float, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(interval)
    raise TimeoutError(f"gave up after {timeout}s")


@pytest.mark.slow
def test_kill9_five_times_then_resume_equals_uninterrupted(tmp_path):
    """`python -m dsv3_jax train` killed with SIGKILL five times (the even attempts the moment an asynchronous
    save is in flight, the odd ones at a random moment), each time continued with --resume: the same losses,
    params, optimizer state and router biases as one uninterrupted run, and no unfinished checkpoint loaded."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    rc = make_run(MeshConfig(data=2), data=corpus, steps=CRASH_STEPS, checkpoint_every=1, keep_checkpoints=3,
                  eval_every=10)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def command(run_dir, *extra):
        return [sys.executable, "-m", "dsv3_jax", *cli(rc, run_dir, *extra, mesh="data=2")]

    straight = tmp_path / "straight"                    # also fills the compilation cache for the restarts
    p = subprocess.run(command(straight), env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]

    run_dir, rng, history = tmp_path / "killed", random.Random(20240229), []
    for attempt in range(KILLS + 1):
        log_path = tmp_path / f"attempt{attempt}.log"
        before, started = max(_step_dirs(run_dir), default=0), time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command(run_dir, *(["--resume"] if attempt else [])), env=env, cwd=REPO,
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                if attempt == KILLS:                    # the last one runs to the end
                    assert proc.wait(timeout=900) == 0, log_path.read_text()[-3000:]
                    break
                # after this attempt has finished a checkpoint of its own ...
                assert _wait_for(lambda: max(_step_dirs(run_dir), default=0) > before, proc, 600), \
                    f"attempt {attempt} ended early:\n" + log_path.read_text()[-3000:]
                if attempt % 2 == 0:                    # ... the moment a save is being written, or ...
                    assert _wait_for(lambda: _unfinished(run_dir), proc, 120, interval=0.002)
                    time.sleep(rng.uniform(0, 0.02))
                else:                                   # ... at a random moment
                    time.sleep(rng.uniform(0, 1.5))
                at = dict(after_s=round(time.monotonic() - started, 2), saving=_unfinished(run_dir))
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        steps, leftovers = _step_dirs(run_dir), _unfinished(run_dir)
        history.append(dict(attempt=attempt, killed=at, finished=steps, unfinished=leftovers))
        # the newest listed step is a finished one (older ones may be half-deleted by orbax's clean-up; the
        # next clean-up deletes them again, and a resume never goes past a newer good step to them)
        assert (run_dir / "checkpoints" / str(steps[-1]) / "commit_success.txt").exists(), history

    (tmp_path / "kills.json").write_text(json.dumps(history, indent=1))
    print(json.dumps(history))
    logs = [(tmp_path / f"attempt{a}.log").read_text() for a in range(KILLS + 1)]
    for a in range(1, KILLS + 1):                       # each resume loaded the newest finished step, cleanly
        assert f"from checkpoint step {history[a - 1]['finished'][-1]}" in logs[a], (history, logs[a][-2000:])
        assert "could not be restored" not in logs[a], logs[a][-3000:]
    assert sum(bool(h["unfinished"]) for h in history[:KILLS]) >= 1, history   # killed mid-save at least once
    assert not _unfinished(run_dir)                     # the restarts cleaned up the interrupted saves

    assert_same_losses(run_dir, straight)
    step_a, state_a, data_a = restore(run_dir)
    step_b, state_b, data_b = restore(straight)
    assert step_a == step_b == CRASH_STEPS and data_a == data_b
    assert_same(state_a, state_b)
