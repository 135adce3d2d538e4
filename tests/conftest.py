"""Shared pytest setup: run JAX on the host CPU with 8 virtual devices (set before jax is imported)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (set before jax is imported), inherited by the CLI
# subprocesses and by pytest-xdist's workers (pytest.ini's -n 2; the controller reads this file before it
# starts them): many files compile the same tiny programs in fresh jit closures or fresh processes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="dsv3_xla_cache_")
    atexit.register(shutil.rmtree, _CACHE, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# This process compiles with LLVM's optimisations off: the same HLO and programs, numerics equal up to the
# order of fp32 sums (scalar loops instead of vector ones), and compiles in about half the time, which is most
# of the suite's time (experiments/results/test_time.md). XLA reads XLA_FLAGS once, when its first client
# starts; the flags go back to their former value right after, so subprocesses (the CLI, the path users run)
# compile as users' processes do. DSV3_TEST_LLVM_OPT=1 keeps the default optimisation here too.
if os.environ["JAX_PLATFORMS"] == "cpu" and os.environ.get("DSV3_TEST_LLVM_OPT") != "1":
    _flags = os.environ["XLA_FLAGS"]
    os.environ["XLA_FLAGS"] = _flags + " --xla_backend_optimization_level=0"
    import jax  # noqa: E402
    jax.jit(lambda x: x + 1)(1).block_until_ready()
    os.environ["XLA_FLAGS"] = _flags

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _random_variables(cfg, seed: int = 0):
    """`dsv3_jax.testing.random_variables` with the layout the HF parity tests rely on (as numpy arrays):
    norm scales U(0.5, 1.5), router kernels with logits of std ~2 (so the unbiased scores s spread over
    (0, 1)), and grouped routing biases of magnitude ~5 (see its docstring)."""
    import jax
    from dsv3_jax.testing import random_variables
    v = random_variables(cfg, seed, norm_range=(0.5, 1.5), router_std=2.0 / np.sqrt(cfg.hidden_size), bias="grouped")
    return jax.tree_util.tree_map(np.array, v)


@pytest.fixture(scope="session")
def random_variables():
    """`random_variables(cfg, seed=0)` -> variables dict (see _random_variables)."""
    return _random_variables


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny DeepSeek-V3 saved by transformers' own save_pretrained, plus a byte-level tokenizer.json
    (tests/hf_utils.py); skipped without torch, transformers and tokenizers. Tests only read it."""
    for module in ("torch", "transformers", "tokenizers"):
        pytest.importorskip(module)
    from hf_utils import write_transformers_checkpoint
    path = str(tmp_path_factory.mktemp("released"))
    write_transformers_checkpoint(path)
    return path


def pytest_runtest_logreport(report):
    """With DSV3_FAILURES_FILE set (experiments/gpu_run.sh sets it): each failure's report is appended to that
    file as soon as it happens, so a run cut off by its time limit still says why its tests failed (pytest
    prints the reports only at the end). Under xdist the controller writes, the workers do not."""
    path = os.environ.get("DSV3_FAILURES_FILE")
    if path and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
