"""The plain attention core, causal: the full masked [T,S] form (`mla.attention_core`) against the causal
block skip (`mla.causal_attention_core`) at several block sizes, forward + backward, alternating in one
process. Default shapes: the bench preset's (batch 8, 8 heads, T = 256, K = 48, V = 32), fp32.

    python experiments/bench_attention.py [--rounds 7] [--blocks 128,64,32] [--t 256] [--patch NAME]

--patch NAME also times every variant with a patch of experiments/ab_variants.py in effect (e.g.
core_bwd_contracting_rows: the core's backward before session 8), labelled "(NAME)".

Prints per-variant medians and the median over rounds of full time / variant time, for the wall clock and
for the process CPU time (all threads; steadier when other jobs share the cores). Results:
experiments/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ab_variants import PATCHES  # noqa: E402
from dsv3_jax.host_malloc import reuse_freed_memory  # noqa: E402
from dsv3_jax.model.mla import attention_core, causal_attention_core  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--blocks", default="128,64,32")
    p.add_argument("--b", type=int, default=8)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--t", type=int, default=256)
    p.add_argument("--patch", default=None, help="a patch of experiments/ab_variants.py, timed as well")
    args = p.parse_args()
    if os.environ["JAX_PLATFORMS"] == "cpu":
        reuse_freed_memory()        # the malloc settings bench_train.py and the train CLI run with
    r = np.random.default_rng(0)
    b, h, t = args.b, args.h, args.t
    q, k = (jnp.asarray(r.normal(size=(b, h, t, 48)), jnp.float32) for _ in range(2))
    v, ct = (jnp.asarray(r.normal(size=(b, h, t, 32)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]
    variants = {"full": lambda q, k, v: attention_core(q, k, v, mask)}
    for block in map(int, args.blocks.split(",")):
        variants[f"skip {block}"] = lambda q, k, v, block=block: causal_attention_core(q, k, v, block)
    steps = {}
    for patch in [None] + ([args.patch] if args.patch else []):
        undo = PATCHES[patch]() if patch else None
        for n, f in variants.items():
            step = jax.jit(jax.value_and_grad(lambda q, k, v, f=f: (f(q, k, v) * ct).sum(), (0, 1, 2)))
            jax.block_until_ready(step(q, k, v))                       # traced (with the patch) and compiled
            steps[n if patch is None else f"{n} ({patch})"] = step
        if undo:
            undo()
    times = {n: [] for n in steps}
    cpu = {n: [] for n in steps}
    for _ in range(args.rounds):
        for n, f in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(3):
                jax.block_until_ready(f(q, k, v))
            times[n].append((time.perf_counter() - t0) / 3)
            cpu[n].append((time.process_time() - c0) / 3)
    print(f"| core (fwd+bwd), B={b} H={h} T={t} | ms (median) | vs full | CPU ms (median) | vs full, CPU |\n"
          "|---|---|---|---|---|")
    for n in steps:
        ratio, cpu_ratio = (statistics.median(a / x for a, x in zip(clock["full"], clock[n])) for clock in (times, cpu))
        print(f"| {n} | {statistics.median(times[n]) * 1e3:.1f} | {ratio:.2f}x | "
              f"{statistics.median(cpu[n]) * 1e3:.1f} | {cpu_ratio:.2f}x |")


if __name__ == "__main__":
    main()
