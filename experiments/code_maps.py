"""How many memory mappings a decode configuration's compiled programs take, and how many configurations a
process can compile before Linux's limit (vm.max_map_count) aborts it: the measurements behind
dsv3_jax/code_maps.py's guard.

For each preset (random weights: the programs do not depend on the values), each batch size and plain /
speculative decoding, one `generate` call of 48-token prompts and 128 new tokens (bench_decode's request) in a
fresh configuration: the mappings this process holds before and after (/proc/self/maps), and the call's
seconds (mostly compiling). Then `jax.clear_caches()` and the mappings left. The guard is off while measuring
(its fraction set past 1), so the counts are the programs' own.

With --loop N: one process decodes N new configurations in a row (the tiny preset at batch sizes 1..N,
16 new tokens), as a notebook sweep or a serving process meeting new batch sizes would, with the guard on
(or off: --no-guard), and records the mappings after each call and the calls where the guard cleared. Without
the guard, the process is expected to die in LLVM once the mappings reach the limit.

    python experiments/code_maps.py [--presets tiny,bench] [--batches 1,4,8]
    python experiments/code_maps.py --loop 60 [--no-guard]
Writes experiments/results/code_maps.{md,json,png} (--loop: code_maps_loop.{md,json,png}).
"""

from __future__ import annotations

import argparse
import gc
import os
import time
import warnings

import jax
import numpy as np

from dsv3_jax import code_maps
from dsv3_jax.config import PRESETS
from dsv3_jax.infer import generate
from dsv3_jax.testing import random_variables
from results_io import write_results

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT, NEW = 48, 128


def measure(preset: str, batches: list[int]) -> dict:
    cfg = PRESETS[preset]
    v = random_variables(cfg, 0)
    rng = np.random.default_rng(0)
    rows = []
    start = code_maps.maps_in_use()
    for b in batches:
        prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, PROMPT)] for _ in range(b)]
        for spec in (False, True):
            before, t0 = code_maps.maps_in_use(), time.perf_counter()
            generate(cfg, v, prompts, NEW, speculative=spec)
            rows.append({"batch": b, "speculative": spec, "added": code_maps.maps_in_use() - before,
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(preset, rows[-1], flush=True)
    held = code_maps.maps_in_use()
    jax.clear_caches()
    gc.collect()
    return {"preset": preset, "layers": cfg.num_hidden_layers, "start": start, "held": held,
            "after_clear": code_maps.maps_in_use(), "rows": rows}


def loop(n: int, guard: bool, out: str) -> dict:
    """N new configurations in one process (module docstring); the mappings after each, and the guard's clears."""
    cfg = PRESETS["tiny"]
    v = random_variables(cfg, 0)
    limit, rows = code_maps.map_limit(), []
    for b in range(1, n + 1):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(cfg, v, [[1 + i % 7 for i in range(8)]] * b, 16)
        cleared = any("compiled programs were dropped" in str(w.message) for w in caught)
        rows.append({"batch": b, "maps": code_maps.maps_in_use(), "cleared": cleared,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    clears = [r["batch"] for r in rows if r["cleared"]]
    lines = ["# Many decode configurations in one process", "",
             f"Machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), vm.max_map_count "
             f"= {limit}. Command: `python experiments/code_maps.py --loop {n}" + ("" if guard else " --no-guard") +
             "`: the tiny preset (random weights) decodes 16 new tokens after 8-token prompts at batch sizes 1.."
             f"{n}, one call each, in one process, with `generate`'s guard " + ("on" if guard else "off") + ".", "",
             f"Calls: {len(rows)} of {n}, all returned. The guard cleared before the calls at batch sizes "
             f"{clears or 'none'}; the most mappings held after a call: {max(r['maps'] for r in rows)}; seconds "
             f"per call: median {sorted(r['seconds'] for r in rows)[len(rows) // 2]}, the calls right after a clear "
             f"{[r['seconds'] for r in rows if r['cleared']]}."]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["batch"] for r in rows], [r["maps"] for r in rows], marker=".", label="mappings after the call")
    ax.axhline(limit, color="red", label="vm.max_map_count")
    ax.axhline(code_maps.CLEAR_AT * limit, color="gray", ls="--", label="the guard clears past this")
    ax.set_xlabel("call (a new batch size each)")
    ax.set_title("One process decoding new shapes, guard " + ("on" if guard else "off"))
    ax.set_ylabel("memory mappings")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    fig.savefig(os.path.join(out, "code_maps_loop.png"), dpi=120)
    summary = {"limit": limit, "guard": guard, "rows": rows}
    write_results(out, "code_maps_loop", lines, summary, keep_from="## Reading")
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,bench")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--loop", type=int, default=0, help="N new configurations in one process (0: the table)")
    ap.add_argument("--no-guard", action="store_true", help="--loop with the guard off")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    limit = code_maps.map_limit()
    if code_maps.maps_in_use() is None or limit is None:
        raise SystemExit("code_maps.py reads /proc (Linux only)")
    if args.loop:
        if args.no_guard:
            code_maps.CLEAR_AT = 2.0
        return loop(args.loop, not args.no_guard, args.out)
    code_maps.CLEAR_AT = 2.0                                # measure the programs' own mappings
    runs = [measure(p, [int(b) for b in args.batches.split(",")]) for p in args.presets.split(",")]

    lines = ["# Memory mappings of compiled decode programs", "",
             f"Machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}), "
             f"vm.max_map_count = {limit}. Command: `python experiments/code_maps.py --presets {args.presets} "
             f"--batches {args.batches}`. One `generate` call per row ({PROMPT}-token random prompts, {NEW} new "
             "tokens, random weights), each a configuration this process had not compiled; mappings added by the "
             "call (/proc/self/maps), the call's seconds (mostly compiling), and the configurations like it that "
             "fit under the limit.", "",
             "| preset | batch | decoding | mappings added | seconds | such configurations under the limit |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["rows"]:
            lines.append(f"| {run['preset']} ({run['layers']} layers) | {r['batch']} | "
                         f"{'speculative' if r['speculative'] else 'plain'} | {r['added']} | {r['seconds']} | "
                         f"{limit // max(r['added'], 1)} |")
    lines += ["", "After the calls, `jax.clear_caches()`:", "", "| preset | mappings at the start | held after the "
              "calls | after the clear |", "|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['preset']} | {run['start']} | {run['held']} | {run['after_clear']} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / (2 * len(runs))
    batches = sorted({r["batch"] for run in runs for r in run["rows"]})
    for i, run in enumerate(runs):
        for j, spec in enumerate((False, True)):
            ys = [next(r["added"] for r in run["rows"] if r["batch"] == b and r["speculative"] == spec)
                  for b in batches]
            ax.bar(np.arange(len(batches)) + (2 * i + j) * width, ys, width,
                   label=f"{run['preset']}, {'speculative' if spec else 'plain'}")
    ax.set_xticks(np.arange(len(batches)) + width * (len(runs) - 0.5), [f"batch {b}" for b in batches])
    ax.set_ylabel("mappings added by one new configuration")
    ax.set_title(f"Compiled decode programs (vm.max_map_count = {limit})")
    ax.set_ylim(0, 1.4 * max(r["added"] for run in runs for r in run["rows"]))
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "code_maps.png"), dpi=120)
    summary = {"limit": limit, "runs": runs}
    write_results(args.out, "code_maps", lines, summary, keep_from="## Reading")
    return summary


if __name__ == "__main__":
    main()
