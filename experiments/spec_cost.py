"""Where a speculative decoding step's time goes, and the speed-up it can reach on this machine.

A self-speculative step (dsv3_jax/infer/speculative.py) runs MTP module 1 on two positions (the draft) and the
main model on two tokens (the verification); plain decoding runs the main model on one token. With draft
acceptance a, a step emits 1 + a tokens, so against plain decoding

    speed-up = (1 + a) * c1 / (c2 + cm + overhead)  <=  (1 + a) / (c2/c1 + cm/c1)

where c1 / c2 are the device times of a one- / two-token main-model pass (head included) and cm that of the
MTP draft pass (two positions write their latents, the last one alone runs attention, FFN and head, as
speculative.py drafts). This script measures c1, c2 and cm on the device (N passes inside one `lax.fori_loop`,
one host round trip, `block_until_ready`, after compiling; the passes alternate over several repeats; medians),
at batch 1 and batch 8, and prints the bound at the measured acceptance and at a = 1.

It also times the matmul kernels alone: a chain of four [256,768] x [768,256] MLP pairs (the tiny preset's
dense-MLP shapes) on 1 and on 2 rows, in XLA and, when torch is installed, in torch. A 2-row product that
costs as much as a 1-row one is what lets speculation pay off; the ratio shows how far this machine's kernels
are from that.

    python experiments/spec_cost.py [--run-dir RUN] [--acceptance A]
Writes experiments/results/spec_cost.{md,json}; the last printed line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import PRESETS
from dsv3_jax.infer import init_cache, split_variables
from dsv3_jax.infer.decode import forward, main_logits, mtp_forward
from dsv3_jax.testing import random_variables

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONTEXT = 176      # cached tokens the passes attend to (a 48-token prompt + 128 new, as in bench_decode)


def pass_fn(cfg, kind: str, batch: int, tokens: int, n: int):
    """jit(params, rs, cache) -> ids: n passes of `kind` ('main' or 'mtp') over `tokens` new tokens per row,
    each pass feeding its argmax to the next (so none can be skipped), in one fori_loop."""
    def fn(params, rs, cache):
        def body(i, carry):
            cache, tok = carry
            pos = jnp.broadcast_to(CONTEXT + jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
            if kind == "main":
                h0, cache = forward(cfg, params, rs, cache, tok, pos)
                logits = main_logits(cfg, params, h0)
            else:
                h = jnp.broadcast_to(params["embedding"][tok], tok.shape + (cfg.hidden_size,))
                logits, _, cache = mtp_forward(cfg, params, rs, cache, h, tok, pos, k=0, outputs_from=tokens - 1)
                logits = jnp.concatenate([logits] * tokens, axis=1)             # same shape as the main pass
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, n, body, (cache, jnp.zeros((batch, tokens), jnp.int32)))[1]
    return jax.jit(fn)


def pass_costs(cfg, params, rs, batch: int, n: int, repeats: int) -> dict:
    """Median device microseconds per pass for main T=1, main T=2 and MTP T=2 at `batch` rows."""
    cache = init_cache(cfg, batch, CONTEXT + 16)
    fns = {"main_1": pass_fn(cfg, "main", batch, 1, n), "main_2": pass_fn(cfg, "main", batch, 2, n),
           "mtp_2": pass_fn(cfg, "mtp", batch, 2, n)}
    for f in fns.values():
        f(params, rs, cache).block_until_ready()                                  # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(params, rs, cache).block_until_ready()
            times[k].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_costs(n: int, repeats: int) -> dict:
    """Microseconds per [256,768] x [768,256] MLP pair on 1 and 2 rows: XLA, and torch when installed."""
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((256, 768), np.float32) * 0.05, rng.standard_normal((768, 256), np.float32) * 0.05)
          for _ in range(4)]
    out = {}
    jws = [(jnp.asarray(a), jnp.asarray(b)) for a, b in ws]

    def chain(x):
        def body(i, x):
            for a, b in jws:
                x = jnp.tanh(jax.nn.silu(x @ a) @ b)
            return x
        return jax.lax.fori_loop(0, n, body, x)
    fns = {m: (jax.jit(chain), jnp.full((m, 256), 0.01, jnp.float32)) for m in (1, 2)}
    for f, x in fns.values():
        f(x).block_until_ready()
    times = {m: [] for m in fns}
    for _ in range(repeats):
        for m, (f, x) in fns.items():
            t0 = time.perf_counter()
            f(x).block_until_ready()
            times[m].append((time.perf_counter() - t0) / (4 * n) * 1e6)
    out["xla"] = {m: statistics.median(v) for m, v in times.items()}
    try:
        import torch
    except ImportError:
        return out
    tws = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in ws]
    times = {1: [], 2: []}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for m in (1, 2):
                x = torch.full((m, 256), 0.01)
                t0 = time.perf_counter()
                for _ in range(n):
                    for a, b in tws:
                        x = torch.tanh(torch.nn.functional.silu(x @ a) @ b)
                if r:                                                             # round 0 warms up
                    times[m].append((time.perf_counter() - t0) / (4 * n) * 1e6)
    out["torch"] = {m: statistics.median(v) for m, v in times.items()}
    return out


def bound(c: dict, acceptance: float) -> float:
    """(1 + a) / (c2/c1 + cm/c1): the speed-up of a speculative step with no overhead beyond its two passes."""
    return (1 + acceptance) * c["main_1"] / (c["main_2"] + c["mtp_2"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="training run directory (default: random tiny weights; costs do not "
                                      "depend on the weights)")
    ap.add_argument("--acceptance", type=float, default=0.91,
                    help="draft acceptance to evaluate the bound at (bench_decode measures it)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--passes", type=int, default=100, help="passes per device call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.run_dir:
        from dsv3_jax.infer.cli import load_run
        cfg, variables, _ = load_run(args.run_dir)
        label = args.run_dir
    else:
        cfg = PRESETS["tiny"]
        variables, label = random_variables(cfg, 0), "random tiny"
    params, rs = split_variables(variables)

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        c = pass_costs(cfg, params, rs, b, args.passes, args.repeats)
        rows.append({"batch": b, **{k: round(v, 1) for k, v in c.items()},
                     "c2_over_c1": round(c["main_2"] / c["main_1"], 3), "cm_over_c1": round(c["mtp_2"] / c["main_1"], 3),
                     "bound_at_acceptance": round(bound(c, args.acceptance), 3), "bound_at_1": round(bound(c, 1.0), 3)})
        print(f"batch {b}: {rows[-1]}", flush=True)
    mm = matmul_costs(args.passes, args.repeats)
    print(f"matmul pairs (us): {mm}", flush=True)

    lines = ["# Speculative step cost model", "",
             f"Model: {label} ({cfg.num_hidden_layers} layers + 1 MTP block). {os.cpu_count()} CPU cores, jax "
             f"{jax.__version__}. Device microseconds per pass ({args.passes} passes per device call, median of "
             f"{args.repeats} alternating repeats), {CONTEXT} cached tokens.", "",
             f"Bound = (1 + a) / (c2/c1 + cm/c1), the speed-up over plain decoding of a speculative step that costs "
             f"only its two passes; a = {args.acceptance} (measured by bench_decode) and a = 1.", "",
             "| batch | main, 1 token (c1) | main, 2 tokens (c2) | MTP draft, 2 positions (cm) | c2/c1 | cm/c1 | "
             f"bound at a={args.acceptance} | bound at a=1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['main_1']:.0f} | {r['main_2']:.0f} | {r['mtp_2']:.0f} | {r['c2_over_c1']:.2f} | "
                     f"{r['cm_over_c1']:.2f} | {r['bound_at_acceptance']:.2f}x | {r['bound_at_1']:.2f}x |")
    lines += ["", "Matmul kernels alone, microseconds per [256,768] x [768,256] MLP pair (four distinct pairs):", "",
              "| library | 1 row | 2 rows | 2 rows / 1 row |", "|---|---|---|---|"]
    for lib, t in mm.items():
        lines.append(f"| {lib} | {t[1]:.1f} | {t[2]:.1f} | {t[2] / t[1]:.2f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "spec_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    summary = {"model": label, "acceptance": args.acceptance, "rows": rows,
               "matmul_2rows_over_1row": {lib: round(t[2] / t[1], 3) for lib, t in mm.items()}}
    with open(os.path.join(args.out, "spec_cost.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n".join(lines))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
