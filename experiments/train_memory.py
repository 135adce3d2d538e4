"""What the one-device train step asks of memory and FLOPs per MoE dispatch, from the compiler alone: the step
exactly as `train` jits it (dsv3_jax/pod/compile.py), compiled for this machine's first device, never run.

Why: on the H200 the small preset's step with `ragged` dispatch did not fit at its own batch (64 x 1024) and
ran at 1.5% MFU at batch 16 (experiments/results/gpu.md). XLA:GPU and XLA:CPU both expand ragged_dot densely
(over every expert), so this CPU compile shows that cost without a GPU: the temporaries and FLOPs of each
dispatch at the same config. XLA:CPU does no rematerialisation, so its temporaries bound what XLA:GPU keeps
from above (the GPU log: 131 GiB before rematerialisation, 109 GiB after).

    python experiments/train_memory.py [--preset small] [--impls ragged,gathered,blocked,dense] [--dtype bf16]
        [--batches 16,64] [key=value overrides]

Writes experiments/results/train_memory.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from dsv3_jax.config import run_preset  # noqa: E402
from dsv3_jax.params import train_flops_per_step  # noqa: E402
from dsv3_jax.pod.compile import compile_train_step  # noqa: E402
from results_io import write_results  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2 ** 30


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--impls", default="ragged,gathered,blocked,dense")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (model.dtype)")
    ap.add_argument("--batches", default="", help="global batch sizes (default: the preset's)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    rows = []
    batches = [[f"train.global_batch_size={b}"] for b in args.batches.split(",") if b] or [[]]
    for batch in batches:
        for impl in args.impls.split(","):
            rc = run_preset(args.preset).override([f"model.moe_impl={impl}", f"model.dtype={args.dtype}",
                                                   *args.overrides, *batch])
            r = compile_train_step(rc, jax.devices()[:1])
            model_flops = train_flops_per_step(rc.model, rc.train.global_batch_size, rc.train.seq_len, True)
            rows.append({"impl": impl, "batch": rc.train.global_batch_size, "seq_len": rc.train.seq_len,
                         "model_flops": model_flops, **r})
            print(f"batch {rc.train.global_batch_size}, {impl}: temporaries {r.get('temp_bytes', 0) / GIB:.1f} GiB, "
                  f"compiled FLOPs {(r.get('flops_per_device') or 0) / model_flops:.2f}x the model's", flush=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"# Train-step memory and FLOPs per MoE dispatch, compiled only ({args.preset} preset, {args.dtype}, "
             f"sequences of {rows[0]['seq_len']} tokens, one device)", "",
             f"Machine: {platform.machine()}, jax {jax.__version__} ({jax.devices()[0].platform}; compiled, not "
             f"run). Command: `python experiments/train_memory.py {command}`. "
             "Temporaries: memory_analysis().temp_size_in_bytes of the step as `train` jits it. Compiled FLOPs: "
             "cost_analysis()'s count over the model FLOPs of the MFU convention (bench_train.py); above 1 is "
             "work the dispatch adds.", "",
             "| batch | dispatch | temporaries GiB | params + optimizer GiB | compiled FLOPs / model FLOPs "
             "| compile s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        state = (r.get("params_bytes", 0) + r.get("opt_state_bytes", 0)) / GIB
        flops = f"{r['flops_per_device'] / r['model_flops']:.2f}" if r.get("flops_per_device") else "-"
        temp = r.get("temp_bytes", 0) / GIB
        lines.append(f"| {r['batch']} | {r['impl']} | {temp:.1f} | {state:.2f} | {flops} | "
                     f"{r.get('compile_s')} |")
    write_results(args.out, "train_memory", lines, rows, keep_from="## Reading")
    return rows


if __name__ == "__main__":
    main()
