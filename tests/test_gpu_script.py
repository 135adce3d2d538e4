"""experiments/gpu_run.sh: the GPU run's script, exercised here by its `--cpu` dry run (tiny sizes, no installs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu_run.sh"


def _run(*args, out: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=out.parent, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_script_parses_and_refuses_unknown_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    p = _run("--help", out=tmp_path / "out", timeout=30)
    assert p.returncode == 0 and "--cpu" in p.stdout and "989e12" in p.stdout
    p = _run("--gpu-please", out=tmp_path / "out", timeout=30)
    assert p.returncode == 2 and "unknown argument" in p.stderr


@pytest.mark.slow
def test_cpu_dry_run_writes_every_result_under_out(tmp_path):
    """The whole script on the CPU: every step runs and succeeds (the tests beside a CLI training run, then
    the benchmarks on that run), and $OUT holds the summary (versions, each step's status, the MFU figure against
    the stated peak, the decode ratios by batch), the log, each benchmark's own files and the run's metrics."""
    out = tmp_path / "out"
    p = _run("--cpu", out=out, timeout=1500)
    summary = (out / "summary.md").read_text()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert summary.startswith("# Dry run on the CPU") and "jax: " in summary and "device: cpu" in summary
    for name in ("tests", "train_run", "bench_train_ragged", "bench_train_gathered", "bench_moe", "bench_decode",
                 "spec_drafts"):
        assert re.search(rf"^\| {name} \| ok \| \d+ \|", summary, re.M), summary
    assert re.search(r"^\| tests \| ok \| \d+ \| \d+ passed", summary, re.M), summary
    assert "MFU" in summary and "peak 989 TFLOP/s" in summary, summary
    assert "speculative / plain decode tokens/s" in summary, summary
    assert re.search(r"^Decode by batch, one request per batch \(train_run\): batch 1: .*; batch 2: ", summary, re.M)
    assert re.search(r"^Drafts per step, batch 1 .*K=1: .*K=2: ", summary, re.M), summary
    assert re.search(r"^MoE, routed experts alone, .*E=8 blocked: .*E=8 gathered: .*E=8 ragged: ", summary,
                     re.M), summary
    assert "bench_moe_cudnn" not in summary                           # a GPU-only step

    for impl in ("ragged", "gathered"):
        train = json.loads((out / f"bench_train_{impl}" / "bench_train.md").read_text().split("```")[1])
        assert (train["preset"], train["dtype"], train["moe_impl"]) == ("tiny", "bfloat16", impl)
        assert train["peak_flops"] == 989e12 and 0 < train["mfu"] < 1 and 0 < train["mfu_no_mtp"] < 1
        assert abs(train["mfu"] - train["model_flops_per_s"] / 989e12) < 1e-12
        assert f"moe_impl={impl}, batch 2 x 16): MTP on" in summary, summary
    decode = json.loads((out / "bench_decode" / "bench_decode.json").read_text())["summary"]
    assert decode["preset"] == "tiny" and decode["tokens_per_forward"] >= 1
    assert decode["speculative_model"].endswith("train_run")         # the run trained beside the tests
    steps = [json.loads(line) for line in (out / "train_run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == 3 and "val_loss" in steps[-1]
    log = (out / "run.log").read_text()
    assert "install: skipped (--cpu dry run)" in log and "Traceback" not in log
    assert not list(out.glob(".*")), "temporary files left in $OUT"


def test_failures_are_written_as_they_happen(tmp_path):
    """conftest's hook: with DSV3_FAILURES_FILE set, a failing test's report is in the file (a passing or
    xfailing one is not), whatever becomes of the run afterwards."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_broken():\n    assert 1 + 1 == 3, 'arithmetic moved'\n"
        "@pytest.mark.xfail\ndef test_known():\n    assert False\n")
    failures = tmp_path / "failures.txt"
    env = dict(os.environ, DSV3_FAILURES_FILE=str(failures))
    env.pop("PYTEST_XDIST_WORKER", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout[-2000:]
    text = failures.read_text()
    assert "==== test_some.py::test_broken (call)" in text and "arithmetic moved" in text
    assert "test_ok" not in text and "test_known" not in text
