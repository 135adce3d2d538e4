"""Compile time of a preset's train step (default v3-671b) with 4 vs 61 scanned layers (issue: the 61-layer compile stays
within 1.5x of the 4-layer one), for a TPU slice's compile-only devices, in one process, alternating.

    PYTHONPATH=$PWD python experiments/plan_compile_time.py --topology v5p-1024 --rounds 1
    PYTHONPATH=$PWD python experiments/plan_compile_time.py --preset tiny --topology v5p-8 mesh.data=4 \\
        model.scan_unroll=1 train.global_batch_size=8

Writes experiments/results/plan_compile_time.md. The machine may be shared: the ratio within one run is the
figure; absolute seconds are not.
"""

from __future__ import annotations

import argparse
import os
import statistics

from dsv3_jax.config import run_preset
from dsv3_jax.pod.plan import plan_one, recommended
from dsv3_jax.pod.topology import parse_topology


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", default="v5p-1024")
    ap.add_argument("--preset", default="v3-671b", help="v3-671b: the recommended setup; others: --mesh data=N")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--layers", default="4,61")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", default=os.path.join("experiments", "results", "plan_compile_time.md"))
    args = ap.parse_args()
    topo = parse_topology(args.topology)
    devices = topo.devices()
    base = run_preset(args.preset)
    setup = (recommended(base, topo) if args.preset == "v3-671b" else []) + list(args.overrides)
    layers = [int(x) for x in args.layers.split(",")]
    times: dict[int, list] = {n: [] for n in layers}
    rows = {}
    for _ in range(args.rounds):
        for n in layers:
            r = plan_one(base.override(setup + [f"model.num_hidden_layers={n}"]), topo, devices=devices)
            times[n].append(r["compile_s"])
            rows[n] = r
            print(f"{n} layers: compile {r['compile_s']} s, lower {r['lower_s']} s, fits {r['fits']}", flush=True)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = med[layers[-1]] / med[layers[0]]
    with open(args.out, "w") as fh:
        fh.write(f"# Compile time vs depth ({args.preset} train step, {topo.describe()})\n\n"
                 f"Setup: `{' '.join(setup)}`; {args.rounds} round(s), median.\n\n"
                 "| layers | compile s (median) | lower s | runs |\n|---|---|---|---|\n")
        for n in layers:
            fh.write(f"| {n} | {med[n]:.1f} | {rows[n]['lower_s']} | {times[n]} |\n")
        fh.write(f"\nRatio {layers[-1]} / {layers[0]} layers: **{ratio:.2f}x** (the layer stacks are scanned: "
                 f"one compiled body whatever the depth).\n")
    print(f"ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
