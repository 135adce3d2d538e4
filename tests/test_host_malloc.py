"""dsv3_jax.host_malloc: with reuse_freed_memory, a jitted step with large temporaries stops page-faulting
fresh memory on every call (what it buys the train step: experiments/results/train_speed.md)."""

import json
import os
import subprocess
import sys

import pytest

from dsv3_jax.host_malloc import supported

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
