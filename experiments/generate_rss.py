"""Peak RSS of `generate --run-dir` when it restores the whole train state (optimizer moments included) vs
params and router state only (orbax partial restore, dsv3_jax/runs.py).

    PYTHONPATH=$PWD python experiments/generate_rss.py --base /path/to/old/checkout [--preset tiny small]

For each preset it writes a run directory holding one checkpoint of a freshly initialised train state (the
size of a real one: params, Adam's two moments, router state), then runs `python -m dsv3_jax generate
--run-dir RUN` (8 new tokens, one CPU device) with the package from `--base` (a checkout that restores the
whole state) and from this repository, `--repeats` times each, alternating, and reports the median peak RSS
(ru_maxrss of the child). Results: experiments/results/generate_rss.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from results_io import write_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(run_dir: str, preset: str) -> int:
    """A run directory with a step-0 checkpoint of the preset's fresh train state; -> state bytes."""
    import jax
    from dsv3_jax.config import MeshConfig, run_preset
    from dsv3_jax.model import Transformer
    from dsv3_jax.sharding import make_mesh
    from dsv3_jax.train.checkpoint import Checkpointer, save_run_config
    from dsv3_jax.train.optimizer import make_optimizer
    from dsv3_jax.train.state import create_train_state

    rc = run_preset(preset)
    rc = rc.override(["mesh.data=1"])
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state = create_train_state(Transformer(rc.model), rc, mesh, make_optimizer(rc.train))
    save_run_config(run_dir, rc)
    ckpt = Checkpointer(run_dir, async_save=False)
    ckpt.save(0, state, {"position": 0}, force=True)
    ckpt.close()
    return sum(x.nbytes for x in jax.tree.leaves(state))


def peak_rss_mb(code_root: str, run_dir: str) -> float:
    """Peak RSS (MiB) of one `generate --run-dir` in a fresh child process."""
    probe = ("import resource, subprocess, sys; "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if r.returncode == 0 else -1)")
    env = dict(os.environ, PYTHONPATH=code_root, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "dsv3_jax", "generate", "--run-dir",
                          run_dir, "--prompt", "The ", "--max-new-tokens", "8"], capture_output=True, text=True,
                         env=env, cwd=code_root)
    value = float(out.stdout.strip().splitlines()[-1])
    if value < 0:
        raise RuntimeError(f"generate failed with {code_root}:\n{out.stderr}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a checkout whose generate restores the whole train state")
    ap.add_argument("--preset", nargs="+", default=["tiny", "small"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scratch", default="/tmp/generate_rss")
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args()
    rows = []
    for preset in args.preset:
        run_dir = os.path.join(args.scratch, preset)
        if not os.path.exists(os.path.join(run_dir, "config.json")):
            state_bytes = make_run(run_dir, preset)
        else:
            state_bytes = None
        whole, partial = [], []
        for _ in range(args.repeats):
            whole.append(peak_rss_mb(os.path.abspath(args.base), run_dir))
            partial.append(peak_rss_mb(REPO, run_dir))
        rows.append({"preset": preset, "state_bytes": state_bytes, "whole_state_mb": whole, "params_only_mb": partial,
                     "median_whole_mb": statistics.median(whole), "median_params_only_mb": statistics.median(partial)})
        print(rows[-1], flush=True)
    lines = ["# Peak RSS of `generate --run-dir` (experiments/generate_rss.py)", "",
             f"Median of {args.repeats} runs each, alternating, one CPU device, 8 new tokens; the run holds one "
             "checkpoint of a fresh train state.", "",
             "| preset | train state (MiB) | whole state restored: peak RSS (MiB) | params + router state only (MiB) "
             "| saved (MiB) | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        sb = "-" if r["state_bytes"] is None else f"{r['state_bytes'] / 2 ** 20:.0f}"
        w, p = r["median_whole_mb"], r["median_params_only_mb"]
        lines.append(f"| {r['preset']} | {sb} | {w:.0f} | {p:.0f} | {w - p:.0f} | {p / w:.2f} |")
    write_results(args.out, "generate_rss", lines, rows)


if __name__ == "__main__":
    main()
