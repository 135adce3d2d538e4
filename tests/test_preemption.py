"""SIGTERM (a TPU VM or scheduler taking the machine back): the step in flight finishes, a checkpoint is
saved, the process exits 0, and --resume goes on to the same losses as an uninterrupted run."""

from __future__ import annotations

from reliability_utils import *  # noqa: F401,F403  (imports, helpers, the corpus fixture)

STEPS = 40


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resume_matches_uninterrupted(tmp_path, corpus):
    """`python -m dsv3_jax train` sent SIGTERM after a few steps: exit 0, a finished checkpoint at the step it
    stopped after (checkpoint_every is past the end, so no other save exists), and --resume reaches the same
    losses, bit for bit, as one uninterrupted run (the same compiled step on the same data positions)."""
    rc = rel_run(MeshConfig(data=2), data=corpus, steps=STEPS, checkpoint_every=1000, eval_every=1000)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def command(run_dir, *extra):
        return [sys.executable, "-m", "dsv3_jax", *cli(rc, run_dir, *extra, mesh="data=2")]

    straight = tmp_path / "straight"
    p = subprocess.run(command(straight), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]

    run_dir = tmp_path / "preempted"
    proc = subprocess.Popen(command(run_dir), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while _logged_steps(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])["step"]
    assert 3 <= stopped < STEPS, f"stopped after step {stopped} of {STEPS}"
    assert "SIGTERM: stopped after step" in err
    assert sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit()) == [stopped]

    p = subprocess.run(command(run_dir, "--resume"), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"from checkpoint step {stopped}" in p.stderr
    assert_same_losses(run_dir, straight)


def test_every_process_stops_after_the_same_step(monkeypatch):
    """With several processes the flag is all-gathered: a SIGTERM seen by one process only stops all of them,
    and only at a sync step, so they agree on the step (the all-gather is faked as two processes' flags)."""
    from jax.experimental import multihost_utils
    other_flag = [0]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.array([int(x), other_flag[0]], np.int32))
    p = loop_lib.Preemption()
    sync = loop_lib.PREEMPT_SYNC_EVERY
    assert not p.should_stop(sync)
    other_flag[0] = 1                       # the signal reached the other process only
    assert not p.should_stop(sync + 1)      # between syncs nobody stops
    assert p.should_stop(2 * sync)
    other_flag[0] = 0
    p.requested = True                      # reached this one only
    assert p.should_stop(2 * sync)
