"""Routed experts for a handful of tokens (decode and speculative verify steps): which computation to use.

One MoE layer's routed experts (random weights of the preset's shapes, fp32, random distinct top-k routing)
on N tokens, for each candidate:
  blocked  expert_kernels.local_experts (the training kernel: a loop over all E experts and row blocks)
  gather   dispatch.gather (the chosen experts' weights gathered per pair, then per-pair matmuls)
  dense    dispatch.dense (every expert on every token; only while E * N <= 2048 rows)
  few      expert_few.few_local (blocks of R rows of each chosen expert; R = rows_per_block), and the
           same with R fixed at 2 and 8 (few_r2, few_r8)
  experts  a loop over the distinct chosen experts, all N token rows each, scaled by the gate (0 for
           tokens that did not choose it)
  pairs    a loop over the N*K pairs, one 1-row product per pair, weights read in place
Each candidate runs `--reps` times inside one jitted fori_loop (the routing shifted every repetition so no
weight read is loop-invariant); the candidates alternate over `--repeats` rounds; medians per layer call,
and the median per-round ratio of each to `blocked`. This is what dispatch.FEW_PAIRS_PER_EXPERT is set from.

    python experiments/bench_moe_few.py [--presets tiny,small] [--tokens 1,2,4,8,16,32,64]
Writes experiments/results/bench_moe_few.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax import lax

from dsv3_jax.config import PRESETS
from dsv3_jax.model import dispatch, expert_few, expert_kernels
from results_io import write_results

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def experts(x, idx, w, w1, w2):
    """A loop over the distinct chosen experts (static bound min(P, E), lax.cond past the count)."""
    e, f = w1.shape[0], w1.shape[2] // 2
    chosen = jnp.zeros((e,), bool).at[idx.reshape(-1)].set(True)                                  # [E]
    used = jnp.nonzero(chosen, size=min(idx.size, e), fill_value=0)[0]
    w = w.astype(x.dtype)

    def run(j, y):
        h = x @ lax.dynamic_index_in_dim(w1, used[j], keepdims=False)                             # [N, 2F]
        gate = jnp.where(idx == used[j], w, 0).sum(1)                                              # [N]
        return y + ((nn.silu(h[:, :f]) * h[:, f:]) @ lax.dynamic_index_in_dim(w2, used[j], keepdims=False)
                    ) * gate[:, None]
    return lax.fori_loop(0, used.shape[0], lambda j, y: lax.cond(j < chosen.sum(), run, lambda j, y: y, j, y),
                         jnp.zeros((x.shape[0], w2.shape[2]), x.dtype))


def pairs(x, idx, w, w1, w2):
    """A loop over the N*K pairs: row x[n] through expert idx[n,k] (weights read in place), added into y[n]."""
    f = w1.shape[2] // 2
    k = idx.shape[1]
    flat, wf = idx.reshape(-1), w.reshape(-1).astype(x.dtype)

    def body(p, y):
        ex, t = flat[p], p // k
        h = lax.dynamic_index_in_dim(x, t) @ lax.dynamic_index_in_dim(w1, ex, keepdims=False)      # [1, 2F]
        o = ((nn.silu(h[:, :f]) * h[:, f:]) @ lax.dynamic_index_in_dim(w2, ex, keepdims=False)) * wf[p]
        return lax.dynamic_update_index_in_dim(y, lax.dynamic_index_in_dim(y, t) + o, t, 0)
    return lax.fori_loop(0, flat.shape[0], body, jnp.zeros((x.shape[0], w2.shape[2]), x.dtype))


def candidates(cfg):
    """name -> f(x, idx, w, w_gate_up [E,D,2,F], w_down)."""
    def flat(fn):
        return lambda x, i, w, a, b: fn(x, i, w, a.reshape(a.shape[0], a.shape[1], -1), b)
    return {"blocked": lambda x, i, w, a, b: expert_kernels.local_experts(cfg, "blocked", x, i, w, a, b),
            "gather": lambda x, i, w, a, b: dispatch.gather(cfg, x, i, w, a, b),
            "dense": lambda x, i, w, a, b: dispatch.dense(cfg, x, i, w, a, b),
            "few": flat(expert_few.few_local),
            "few_r2": flat(lambda *a: expert_few.few_local(*a, rows=2)),
            "few_r8": flat(lambda *a: expert_few.few_local(*a, rows=8)),
            "experts": flat(experts),
            "pairs": flat(pairs)}


def timer(fn, args, reps):
    """A callable returning microseconds per layer call of fn, `reps` calls in one device call."""
    e = args[3].shape[0]
    run = jax.jit(lambda x, idx, w, a, b: lax.fori_loop(
        0, reps, lambda j, x: x + 1e-3 * fn(x, (idx + 5 * j) % e, w, a, b), x))
    run(*args).block_until_ready()

    def once():
        t = time.perf_counter()
        run(*args).block_until_ready()
        return (time.perf_counter() - t) / reps * 1e6
    return once


def measure(preset, n, reps, repeats, seed=0):
    cfg = PRESETS[preset]
    e, d, f, k = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    rng = np.random.default_rng([seed, n])
    args = (jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
            jnp.asarray(np.argsort(rng.random((n, e)), 1)[:, :k], jnp.int32),
            jnp.asarray(rng.random((n, k)), jnp.float32),
            jnp.asarray(rng.standard_normal((e, d, 2, f)) / np.sqrt(d), jnp.float32),
            jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), jnp.float32))
    fns = {name: fn for name, fn in candidates(cfg).items() if name != "dense" or e * n <= 2048}
    want = np.asarray(fns["blocked"](*args))
    err = max(float(np.abs(np.asarray(fn(*args)) - want).max()) for fn in fns.values())
    timers = {name: timer(fn, args, reps) for name, fn in fns.items()}
    us = {name: [] for name in fns}
    for _ in range(repeats):
        for name, once in timers.items():
            us[name].append(once())
    return {"preset": preset, "tokens": n, "pairs": n * k, "experts": e, "max_abs_diff": err,
            "us": {name: statistics.median(v) for name, v in us.items()},
            "min_us": {name: min(v) for name, v in us.items()},
            "speedup_vs_blocked": {name: statistics.median(b / t for b, t in zip(us["blocked"], v))
                                   for name, v in us.items()}}


def table(rows, key="us"):
    names = list(candidates(PRESETS["tiny"]))
    lines = ["| preset | tokens N | pairs N*K | N*K / E | " + " | ".join(f"{n} us" for n in names)
             + " | few / blocked speed-up | max abs diff |",
             "|---|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in rows:
        cells = [f"{r[key][n]:.0f}" if n in r[key] else "-" for n in names]
        lines.append(f"| {r['preset']} | {r['tokens']} | {r['pairs']} | {r['pairs'] / r['experts']:.2g} | "
                     + " | ".join(cells) + f" | {r['speedup_vs_blocked']['few']:.2f}x | {r['max_abs_diff']:.1e} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=20, help="layer calls per device call")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    ap.add_argument("--out", default=RESULTS)
    a = ap.parse_args()
    rows = []
    for preset in a.presets.split(","):
        for n in (int(t) for t in a.tokens.split(",")):
            rows.append(measure(preset, n, a.reps, a.repeats))
            print(table(rows[-1:])[-1], flush=True)
    load = os.getloadavg()[0]
    lines = ["# Routed experts for a handful of tokens", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared: 1-min load average {load:.1f} "
             f"at the end), jax {jax.__version__} ({jax.default_backend()}). One MoE layer's routed experts, "
             f"fp32, random weights and routing; microseconds per layer call (median of {a.repeats} alternating "
             f"rounds of {a.reps} calls in one device call) and the median per-round speed-up of `few` over "
             "`blocked` (the training kernel, which decode steps of more than E pairs took before). "
             "Candidates: experiments/bench_moe_few.py. `dense` only while E x N <= 2048 rows.", ""] + table(rows) + [
        "", "The same rounds' minimum (less disturbed by the other processes on a shared machine):", ""] + table(
        rows, "min_us")
    write_results(a.out, "bench_moe_few", lines, {"load_average": load, "rows": rows})


if __name__ == "__main__":
    main()
