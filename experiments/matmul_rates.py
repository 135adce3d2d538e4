"""The matrix products of the bench preset's train step, in XLA:CPU and in torch (the library behind the
torch peer of experiments/bench_train.py), on this machine: GFLOP/s per shape and the ratio XLA / torch.

Why: the train step's ratio to the torch peer moved between machines (experiments/results/train_speed.md,
session 20); this says how much of that the two libraries' matmul rates explain, shape by shape.

Each library runs in its own process (torch's OpenMP threads keep spinning after a product and slow the XLA
runs that follow them in one process), the two alternating for --rounds rounds. In a process each shape is
timed as a loop of `reps` products of distinct left operands ([reps, M, K] stacked, so nothing can be hoisted
out of the loop) into one accumulator, about --gflop GFLOP per call; after a warm-up call, the median of
--repeats calls. Reported: medians over rounds, and the median of the per-round ratios.

--cores N pins both libraries' processes to the first N cores (and torch to N threads): with --cores 1 the
table compares the libraries' single-core kernels, without either's multi-threading.

    PYTHONPATH=$PWD python experiments/matmul_rates.py [--rounds 3] [--cores 1] [--out experiments/results]
Writes NAME.{md,json} (NAME: --name, default matmul_rates).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from results_io import cpu_summary, write_results

# (what, M, K, N, layout): the bench preset (hidden 512, 8 heads, 16 experts of 256, top-4, dense MLP 1536,
# vocab 1024) on 8 x 256 = 2048 tokens; 128-row blocks as the blocked expert kernel (expert_kernels.py) runs
# them. layout "nn": a[M,K] b[K,N]; "tn": a[K,M]^T b (weight gradients); "nt": a b[N,K]^T (input gradients,
# the backward's products with the weights as stored; its gate+up row has the forward gate+up's M, K, N).
SHAPES = [
    ("reference n^3 (bench_train's baseline)", 2048, 2048, 2048, "nn"),
    ("dense MLP gate+up", 2048, 512, 3072, "nn"),
    ("dense MLP down", 2048, 1536, 512, "nn"),
    ("shared expert gate+up", 2048, 512, 512, "nn"),
    ("head", 2048, 512, 1024, "nn"),
    ("attention kv_b_proj", 2048, 64, 512, "nn"),
    ("attention o_proj", 2048, 256, 512, "nn"),
    ("routed expert block gate+up", 128, 512, 512, "nn"),
    ("routed expert block down", 128, 256, 512, "nn"),
    ("routed expert block weight gradient (x^T dy)", 512, 128, 512, "tn"),
    ("routed expert block input gradient of gate+up (dh W1^T)", 128, 512, 512, "nt"),
    ("routed expert block input gradient of down (dy W2^T)", 128, 512, 256, "nt"),
]
DIMS = {"nn": ((1,), (0,)), "tn": ((0,), (0,)), "nt": ((1,), (1,))}      # dot_general contracting dims


def time_library(lib: str, threads: int, gflop: float, repeats: int) -> dict:
    """GFLOP/s per shape in this process, for lib 'xla' or 'torch'."""
    import numpy as np
    rates = {}
    rng = np.random.default_rng(0)
    if lib == "xla":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax
        import jax.numpy as jnp
    else:
        import torch
        torch.set_num_threads(threads)
    for what, m, k, n, layout in SHAPES:
        reps = max(1, round(gflop * 1e9 / (2 * m * k * n)))
        a = rng.standard_normal((reps, k, m) if layout == "tn" else (reps, m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if layout == "nt" else (k, n), dtype=np.float32)
        if lib == "xla":
            dims = (DIMS[layout], ((), ()))

            def loop(a, b, dims=dims, reps=reps, m=m, n=n):
                body = lambda i, c: c + jax.lax.dot_general(a[i], b, dims)
                return jax.lax.fori_loop(0, reps, body, jnp.zeros((m, n), jnp.float32))
            f, args = jax.jit(loop), (jnp.asarray(a), jnp.asarray(b))
            call = lambda: f(*args).block_until_ready()
        else:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)

            def call(ta=ta, tb=tb, reps=reps, m=m, n=n, layout=layout):
                c = torch.zeros(m, n)
                rhs = tb.t() if layout == "nt" else tb
                for i in range(reps):
                    c += (ta[i].t() if layout == "tn" else ta[i]) @ rhs
                return c
        call()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        rates[what] = 2 * m * k * n * reps / statistics.median(times) / 1e9
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=7, help="timed calls per shape in a process")
    p.add_argument("--gflop", type=float, default=1.0, help="work per timed call")
    p.add_argument("--cores", type=int, default=os.cpu_count(),
                   help="pin both libraries to this many cores (torch runs as many threads)")
    p.add_argument("--out", default=None, help="write NAME.{md,json} here (e.g. experiments/results)")
    p.add_argument("--name", default="matmul_rates")
    p.add_argument("--child", choices=("xla", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.cores < os.cpu_count():                 # before jax or torch start their thread pools
            os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
        print(json.dumps(time_library(args.child, args.cores, args.gflop, args.repeats)))
        return

    def child(lib):
        cmd = [sys.executable, __file__, "--child", lib, "--cores", str(args.cores), "--gflop", str(args.gflop),
               "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    rounds = []
    for r in range(args.rounds):
        rounds.append({lib: child(lib) for lib in ("xla", "torch")})
        ratios = [rounds[-1]["xla"][w] / rounds[-1]["torch"][w] for w, *_ in SHAPES]
        print(f"round {r + 1}: xla / torch {min(ratios):.2f} .. {max(ratios):.2f}", flush=True)
    import jax
    import torch
    machine, med = cpu_summary(), statistics.median
    cores_arg = f" --cores {args.cores}" if args.cores < os.cpu_count() else ""
    lines = ["# Matrix-product rates: XLA:CPU against torch, the bench preset's shapes", "",
             f"Machine: {machine}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}; "
             f"both pinned to {args.cores} core(s), torch with as many threads; fp32. Each library in its own "
             f"process, alternating, {args.rounds} rounds; per shape a loop of products of distinct left operands "
             f"(about {args.gflop:g} GFLOP per call), median of {args.repeats} calls. Command: "
             f"`python experiments/matmul_rates.py --rounds {args.rounds}{cores_arg}`.",
             "", "| product | M x K x N | XLA GFLOP/s | torch GFLOP/s | XLA / torch |", "|---|---|---|---|---|"]
    rows = []
    for what, m, k, n, layout in SHAPES:
        xla, tor = med([r["xla"][what] for r in rounds]), med([r["torch"][what] for r in rounds])
        ratio = med([r["xla"][what] / r["torch"][what] for r in rounds])
        rows.append(dict(what=what, m=m, k=k, n=n, layout=layout, xla_gflops=xla, torch_gflops=tor,
                         xla_over_torch=ratio))
        note = {"nn": "", "tn": " (lhs^T)", "nt": " (rhs^T)"}[layout]
        lines.append(f"| {what} | {m} x {k} x {n}{note} | {xla:.0f} | {tor:.0f} | {ratio:.2f} |")
    data = dict(machine=machine, cores=os.cpu_count(), jax=jax.__version__, torch=torch.__version__,
                pinned_cores=args.cores, rounds=rounds, rows=rows)
    if args.out:
        write_results(args.out, args.name, lines, data)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
