"""A/B of train-step variants (config overrides or code patches), alternating in one process (so every
variant sees the same machine state), on the bench preset's one-device step of experiments/bench_train.py.

    python experiments/train_ab.py [--preset bench] [--rounds 3] [--steps 4] [--mtp both|on|off]
        NAME=OVERRIDE[,OVERRIDE...] ...      e.g. "no skip=model.attention_causal_block=0" "default="
        NAME=@PATCH ...                      e.g. "before=@before_session8" "now="
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python experiments/train_ab.py --mtp off \
        "one=" "data2=mesh.data=2" "expert2=mesh.data=1,mesh.expert=2"      (meshes of virtual CPU devices)

A variant is config overrides, or `@PATCH`: a function of experiments/ab_variants.py that puts an earlier
form of the code back while that variant's step is traced. The first variant is the baseline. Each round
times every variant (median of --steps steps after a warm-up step, and the process CPU time of those steps,
steadier than wall clock when other jobs share the cores); the table gives per-variant medians over rounds
and the median over rounds of the per-round ratio baseline time / variant time, for both clocks.
Results of these runs: experiments/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_train import make_runner  # noqa: E402  (sets JAX_PLATFORMS=cpu unless set)
from ab_variants import PATCHES  # noqa: E402
from dsv3_jax.config import run_preset
from dsv3_jax.host_malloc import reuse_freed_memory


def parse_variant(text: str):
    """-> (name, config overrides, patch name or None)."""
    name, _, spec = text.partition("=")
    if spec.startswith("@"):
        if spec[1:] not in PATCHES:
            raise SystemExit(f"unknown patch {spec[1:]!r} in {text!r}; "
                             f"experiments/ab_variants.py has {sorted(PATCHES)}")
        return name, [], spec[1:]
    return name, [o for o in spec.split(",") if o], None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mtp", choices=("both", "on", "off"), default="both")
    p.add_argument("variants", nargs="+", help="NAME=OVERRIDE[,OVERRIDE...] or NAME=@PATCH; the first is the baseline")
    args = p.parse_args()
    if os.environ["JAX_PLATFORMS"] == "cpu":
        reuse_freed_memory()        # the malloc settings bench_train.py and the train CLI run with
    base = run_preset(args.preset)
    tokens = base.train.global_batch_size * base.train.seq_len
    runs = {}
    for mtp in (("on", "off") if args.mtp == "both" else (args.mtp,)):
        for text in args.variants:
            name, overrides, patch = parse_variant(text)
            extra = [] if mtp == "on" else ["model.num_nextn_predict_layers=0"]
            undo = PATCHES[patch]() if patch else None
            runs[(mtp, name)] = make_runner(base.override(overrides + extra))      # traced and compiled here
            if undo:
                undo()
    times = {key: [] for key in runs}
    cpu = {key: [] for key in runs}
    for r in range(args.rounds):
        for key, run in runs.items():
            c = time.process_time()
            times[key].append(run(args.steps))
            cpu[key].append((time.process_time() - c) / (args.steps + 1))       # + the warm-up step
        print(f"round {r + 1}: " + ", ".join(f"{m}/{n} {tokens / times[(m, n)][-1]:.0f} tok/s" for m, n in runs),
              flush=True)
    print("| MTP | variant | tok/s (median) | vs first, wall | CPU s/step (median) | vs first, CPU |\n"
          "|---|---|---|---|---|---|")
    for key in runs:
        first = (key[0], parse_variant(args.variants[0])[0])
        ratio, cpu_ratio = (statistics.median(b / t for b, t in zip(clock[first], clock[key]))
                            for clock in (times, cpu))
        print(f"| {key[0]} | {key[1]} | {tokens / statistics.median(times[key]):.0f} | {ratio:.3f}x | "
              f"{statistics.median(cpu[key]):.2f} | {cpu_ratio:.3f}x |")


if __name__ == "__main__":
    main()
