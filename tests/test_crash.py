"""kill -9 during training and during asynchronous saves, five times in a row: resuming loses nothing."""

from __future__ import annotations

from reliability_utils import *  # noqa: F401,F403  (imports, helpers, the corpus fixture)

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
