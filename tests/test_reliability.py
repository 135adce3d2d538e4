"""Reliability: crashes, corrupt checkpoints, a full disk, non-finite steps, bad input and impossible configs
all end in a clear error or a resume that loses nothing; no pickle and no eval anywhere in the package.
docs/reliability.md lists each fault tried here and what it cost.

Every in-process run in this file uses one model and one train step, so XLA compiles it once: a persistent
compilation cache (a temporary folder, for this module only) serves the later runs, and the step carries a
fault injector that makes the loss NaN for any batch holding token MARK (no text corpus here contains it, so
elsewhere it multiplies the loss by exactly 1). The crash test runs the real CLI in subprocesses, unpatched.
"""

from __future__ import annotations

import threading

from reliability_utils import *  # noqa: F401,F403  (imports, helpers, the corpus fixture)

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
    elif kind == "bytes_flipped":                             # 16 bytes inside the largest array file, same size.
        # Depending on where the middle of the file falls (the layout varies between saves), orbax's chunk
        # decoder fails or orbax reads it happily and only our checksum notices; see also
        # test_array_bytes_that_no_longer_match_their_checksum_are_rejected.
        with open(arrays[-1], "r+b") as fh:
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
    with pytest.warns(UserWarning, match=r"checkpoint step 6 .* could not be restored"):
        summary = train(None, str(run_dir), resume=True, progress=False)
    assert "from checkpoint step 4" in capfd.readouterr().err
    assert (summary["start_step"], summary["end_step"]) == (4, 6)
    assert [p.name.split("-")[0] for p in (run_dir / "bad_checkpoints").iterdir()] == ["6"]   # kept, not deleted
    assert_same_losses(run_dir, ref_dir)
    assert_same(summary["state"], ref_state)
    assert_same(restore(run_dir)[1], ref_state)


def test_array_bytes_that_no_longer_match_their_checksum_are_rejected(reference, tmp_path):
    """Arrays orbax reads without complaint but whose bytes differ from those saved (simulated by changing
    the checksum recorded for one array, which is what a silent bit flip in that array looks like to the
    check): the restore names the mismatch and falls back to step 4."""
    _, ref_dir, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    meta_path = run_dir / "checkpoints" / "6" / "data" / "metadata"
    meta = json.loads(meta_path.read_text())
    key = next(k for k in meta["state_checksums"] if "lm_head" in k and "params" in k)
    meta["state_checksums"][key] = (meta["state_checksums"][key] + 1) % 2 ** 32
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"checkpoint step 6 .* could not be restored \(CheckpointError: "
                                         r"1 array\(s\) differ from the checksums"):
        step, state, data = restore(run_dir)
    assert step == 4 and data["step"] == 4
    assert_same(state, restore(ref_dir, 4)[1])


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


def _from_orbax(thread: threading.Thread) -> bool:
    """Whether orbax started `thread` (its writers are orbax Thread subclasses or run orbax functions); other
    threads a run leaves behind, such as a multiprocessing queue's feeder, are not a checkpoint's writers."""
    target = getattr(thread, "_target", None)
    return any(str(getattr(x, "__module__", "") or "").startswith("orbax") for x in (type(thread), target))


def test_full_disk_during_async_save_reports_it_and_keeps_the_last_checkpoint(reference, tmp_path, capsys,
                                                                               monkeypatch):
    """The save of step 4 fails in the background: the CLI exits 1 naming step 4 and the intact step 2, which
    restores; once there is room again, --resume ends exactly like the uninterrupted run. The failed save's
    other writers (the arrays' threads, which orbax leaves running when the JSON item fails) have ended by
    the time the error is reported: the resume in this process saves step 4 again into the same temporary
    folder, and raced them before (OSError: Directory not empty)."""
    rc, ref_dir, ref_state = reference
    run_dir = tmp_path / "run"
    cls, save_fn = _enospc_on_data_write(2)
    monkeypatch.setattr(cls, "_save_fn", save_fn)
    threads_before = set(threading.enumerate())
    assert main(cli(rc, run_dir)) == 1
    left_running = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()
                    and _from_orbax(t)]
    assert not left_running, left_running
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

    # Windows are cut from the training part of the split; map them back to stream positions.
    train_pos, _ = split_train_val(np.arange(n_tokens), tc.val_fraction, min_val_tokens=tc.seq_len + 1)
    train_tok = tokens[train_pos]
    windows = {train_tok[i * tc.seq_len: i * tc.seq_len + tc.seq_len + 1].tobytes(): i
               for i in range(len(train_tok) // tc.seq_len)}
    for s in poison_steps:
        i = windows[batches(tokens, s)[s - 1][0].tobytes()]
        tokens[train_pos[i * tc.seq_len + tc.seq_len // 2]] = MARK  # inside the window, not on its edges
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
