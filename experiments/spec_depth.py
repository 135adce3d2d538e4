"""What a speculative step costs against the model's depth: the draft is one MTP module (a Transformer block
plus the shared head) whatever the depth, while the verify runs every layer, so the draft's share of a step,
and with it the speed-up speculation can reach, depends on how many layers the main model has. DeepSeek-V3
has 61 layers and one MTP module; the bench preset has 4.

For each depth L of `--depths` (the `--preset` shape with num_hidden_layers = L, random weights: the step's
cost does not depend on what the weights learned, apart from how evenly the router spreads tokens) and each
batch B of `--batches`: device microseconds per step in calls of CHUNK steps from one prefill of B random
48-token prompts (per-layer weights where `generate` uses them), plain and with one draft, alternating
(spec_drafts.py's `step_costs`); the speculative step in plain steps; and the bound that leaves,
tokens per forward / step ratio, at `--tokens-per-forward` (default 1.85: the bench run's measured figure,
experiments/results/bench_decode.md).

    PYTHONPATH=$PWD python experiments/spec_depth.py [--depths 2,4,8,12] [--batches 1,8]
Writes experiments/results/spec_depth.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np

from bench_decode import model_shape
from dsv3_jax.config import PRESETS
from dsv3_jax.infer import split_variables
from dsv3_jax.infer.decode import CHUNK
from dsv3_jax.testing import random_variables
from results_io import write_results
from spec_drafts import PROMPT, step_costs

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plot(out_dir: str, rows: list, tpf: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for b in sorted({r["batch"] for r in rows}):
        mine = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["layers"])
        ax.plot([r["layers"] for r in mine], [r["bound"] for r in mine], "o-", label=f"batch {b}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("main-model layers (one MTP module)")
    ax.set_ylabel(f"bound: {tpf} tokens per forward / step ratio")
    ax.set_title("speculative decoding's bound against depth (random weights)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "spec_depth.png"), dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--depths", default="2,4,8,12")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens-per-forward", type=float, default=1.85)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    argv = argv if argv is not None else __import__("sys").argv[1:]
    rows = []
    for depth in [int(x) for x in args.depths.split(",")]:
        cfg = PRESETS[args.preset].replace(num_hidden_layers=depth, dtype="float32")
        variables = random_variables(cfg, 0)
        params, rs = split_variables(variables)
        shape = model_shape(cfg, variables)
        rng = np.random.default_rng(depth)
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, PROMPT)] for _ in range(b)]
            step_us, step_ratio = step_costs(cfg, params, rs, prompts, [1], args.repeats)
            rows.append({**shape, "batch": b, "plain_step_us": step_us[0], "spec_step_us": step_us[1],
                         "step_over_plain": step_ratio[1], "bound": args.tokens_per_forward / step_ratio[1]})
            print(f"{depth} layers ({shape['weights_mib']:.0f} MiB), batch {b}: plain {step_us[0]:.0f} us, "
                  f"speculative {step_us[1]:.0f} us, {step_ratio[1]:.2f} plain steps, bound "
                  f"{rows[-1]['bound']:.2f}x", flush=True)
        del variables, params, rs
    lines = ["# A speculative step's cost against the main model's depth", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}. Command: "
             f"`python experiments/spec_depth.py {' '.join(argv)}`. The {args.preset} preset with "
             "num_hidden_layers set per row, random fp32 weights, one MTP module; greedy steps in calls of "
             f"{CHUNK} from a prefill of {PROMPT}-token random prompts, median device microseconds per step over "
             f"{args.repeats} alternating repeats (spec_drafts.py's `step_costs`), one draft per step. Bound = "
             f"{args.tokens_per_forward} tokens per forward / (speculative step / plain step): the speed-up a "
             "batch reaches at that acceptance when no row waits for another.", "",
             "| layers | weights MiB | batch | plain step us | speculative step us | step / plain | bound |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layers']} | {r['weights_mib']:.0f} | {r['batch']} | {r['plain_step_us']:.0f} | "
                     f"{r['spec_step_us']:.0f} | {r['step_over_plain']:.2f} | **{r['bound']:.2f}x** |")
    write_results(args.out, "spec_depth", lines, {"argv": argv, "tokens_per_forward": args.tokens_per_forward,
                                                  "rows": rows}, keep_from="## Reading")
    plot(args.out, rows, args.tokens_per_forward)
    return {"rows": rows}


if __name__ == "__main__":
    main()
