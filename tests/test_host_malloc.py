"""dsv3_jax.host_malloc: with reuse_freed_memory, a jitted step with large temporaries stops page-faulting
fresh memory on every call (what it buys the train step: experiments/results/train_speed.md)."""

import json
import os
import subprocess
import sys

import pytest

from dsv3_jax import host_malloc
from dsv3_jax.host_malloc import TRIM_THRESHOLD, TUNABLES, supported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, resource, sys
from dsv3_jax.host_malloc import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "on" else False     # "on": restarts this child once
import jax, jax.numpy as jnp
@jax.jit
def step(a, b):                     # two temporaries of 32 MiB each (above glibc's largest mmap threshold)
    return (jnp.tanh(a @ b) * jnp.cos(a @ (b + 1))).sum()
a, b = jnp.ones((4096, 64), jnp.float32) / 64, jnp.ones((64, 2048), jnp.float32)
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(step(a, b))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": min(faults[8:])}))    # after the heap's first growth
"""


def _faults_per_call(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_reuse_freed_memory_stops_per_step_page_faults():
    if not supported():
        pytest.skip("C library is not glibc")
    off, on = _faults_per_call("off"), _faults_per_call("on")
    assert on["applied"]
    # Fewest faults of the last 12 calls. One 16 MiB buffer of fresh pages is 4096 faults: the default
    # allocator faults at least that on every call (else the test could not tell the settings apart); with
    # the settings the heap is reused (0 faults on most calls; now and then a few calls in a row fault
    # while the heap regrows, hence the minimum, not the median).
    assert off["faults"] >= 4096, off
    assert on["faults"] < off["faults"] / 20, (off, on)


TOP_CHILD = """
import ctypes, importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("host_malloc", sys.argv[2])    # alone: no jax import, fast
host_malloc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_malloc)
if sys.argv[1] == "on":
    assert host_malloc.reuse_freed_memory()          # restarts this child once with the settings
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 2 ** 31 + 2 ** 28                             # 2.25 GiB, freed at the heap's top
def use_and_free():
    block = libc.malloc(size)
    assert block
    ctypes.memset(block, 1, size)
    libc.free(block)
use_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
use_and_free()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_large_free_top_of_the_heap_is_kept():
    """glibc trims the free top of the heap once it reaches trim_threshold; the bench step frees more than
    2 GiB there every step, so the settings must never trim (a 2 GiB threshold re-faulted it)."""
    if not supported():
        pytest.skip("C library is not glibc")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = lambda mode, extra: json.loads(subprocess.run(
        [sys.executable, "-c", TOP_CHILD, mode, host_malloc.__file__], capture_output=True, text=True, check=True, timeout=120,
        env=dict(env, **extra)).stdout.strip().splitlines()[-1])["faults"]
    pages = (2 ** 31 + 2 ** 28) // 4096
    # The same settings with the old 2 GiB - 1 threshold fault the block in again (so this test can fail):
    old = TUNABLES.replace(f"trim_threshold={TRIM_THRESHOLD}", "trim_threshold=2147483647")
    assert run("off", {"GLIBC_TUNABLES": old}) > pages // 2
    assert run("on", {}) < pages // 100


@pytest.mark.parametrize("env,coordinator,restarts", [
    ({"JAX_PLATFORMS": "cpu"}, None, True),
    ({"JAX_PLATFORMS": "cuda"}, None, False),
    ({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.check=0"}, None, False),   # the opt-out
    ({}, "localhost:1234", False),          # multi-process, platform unnamed: jax must not start first
    ({"JAX_PLATFORMS": "cpu"}, "localhost:1234", True),
])
def test_train_cli_restarts_with_the_settings_only_on_cpu(monkeypatch, env, coordinator, restarts):
    """The decision of `python -m dsv3_jax train`: restart with the settings where XLA:CPU runs the step."""
    import argparse
    from dsv3_jax import __main__ as cli, host_malloc
    if not supported():
        pytest.skip("C library is not glibc")
    for k in ("JAX_PLATFORMS", "GLIBC_TUNABLES", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(host_malloc.os, "execv", lambda *a: calls.append(a))      # the restart itself
    cli._reuse_host_memory_on_cpu(argparse.Namespace(coordinator=coordinator))
    assert bool(calls) == restarts


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_train_cli_runs_with_the_settings(tmp_path):
    """The path users run: the train CLI on CPU restarts itself once with the settings (same process, new
    environment: read from /proc while it trains) and trains."""
    import time
    from dsv3_jax.host_malloc import TUNABLES
    if not supported():
        pytest.skip("C library is not glibc")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-m", "dsv3_jax", "train", "--preset", "tiny", "--run-dir",
                             str(tmp_path / "run"), "--no-progress", "train.steps=2", "train.global_batch_size=2",
                             "train.seq_len=32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    seen, deadline = False, time.time() + 120
    while not seen and proc.poll() is None and time.time() < deadline:
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as fh:
                raw = fh.read()         # glibc splits GLIBC_TUNABLES at ':' in place when it reads it
                seen = all(part.encode() in raw for part in TUNABLES.split(":"))
        except OSError:
            pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert seen, "the train CLI did not restart with the malloc settings"
    assert json.loads(out.strip().splitlines()[-1])["step"] == 2
