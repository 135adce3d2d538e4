"""Routed-expert throughput of each dispatch implementation as the number of experts grows at fixed expert
width and fixed active FLOPs (N tokens x K experts each), forward + backward, fp32 on CPU.

For each E in --experts and each implementation (`dense` only up to --dense-max-experts, `ragged` only up to
--ragged-max-experts: XLA:CPU expands ragged_dot densely and one E=64 step takes over a minute) one jitted
function computes y and the vjp wrt (x, w, w_gate_up, w_down) for a fixed cotangent. The reference in the same
run is a dense matmul with the same active FLOPs and no routing: [N*K, D] x [D, 2F] -> SwiGLU -> [N*K, F] x
[F, D], forward + backward. All functions are compiled and warmed up first, then timed in interleaved rounds
(each round runs every function once, with block_until_ready), and the median per function is reported: the
machine is shared, so only ratios measured in the same run mean much.
  flops_fraction = t(dense matmul) / t(impl)       (achieved FLOP/s relative to that matmul)
  time_ratio     = t(impl, E) / t(impl, E=8)
Routing: top-K of random sigmoid scores (distinct experts per token, roughly balanced loads, as a trained
router with the balancing bias gives). Blocks: the library's rule (moe_block_size 0: 128 rows, 64 when E >= 256).

Expert-parallel traffic (a subprocess with 8 host devices, mesh expert=8, n_group=8 == ep): the all_to_all
operand shapes are read from the compiled HLO of `expert_parallel` and divided by the local tokens, per
direction, for: one unit per (token, expert) pair (dedup=False), one per (token, shard) (dedup=True), and
dedup with the capacity ladder, for routing with the group limit (topk_group=4 of 8) and without it
(topk_group=8); the ladder's branch is the one the routing selects. The average number of shards a token
really needs is reported too (what ragged_all_to_all would move).

--variants times the blocked variants that were tried (see dsv3_jax/model/expert_kernels.py's docstring); the
static-scan variant only up to E=64 (about a minute per step at E=256). --ab times the kept kernel against
itself with other block schedules (the loops' block sizes), all in one interleaved group per E.

Writes experiments/results/bench_moe.{md,png,json} (bench_moe_variants.md with --variants, bench_moe_ab.md
with --ab); the last printed line is one JSON object with time_ratio_e64_vs_e8 and flops_fraction_e64 of
`blocked`.

    python experiments/bench_moe.py [--quick] [--ragged-max-experts 16] [--variants] [--ab]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if "--ep-child" in sys.argv:                                   # must precede the jax import
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import dispatch
from dsv3_jax.model import expert_kernels as kernels
from dsv3_jax.model.expert_kernels import _glu, _glu_bwd, _mm, _mm_nt, _mm_tn


def make_cfg(e, k, d, f, block=None, impl="blocked", n_group=1, topk_group=1):
    return ModelConfig(hidden_size=d, moe_intermediate_size=f, n_routed_experts=e, num_experts_per_tok=k,
                       n_group=n_group, topk_group=topk_group, moe_impl=impl,
                       moe_block_size=block or 0)


def make_inputs(n, d, f, e, k, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (n, d))
    s = jax.nn.sigmoid(jax.random.normal(ks[1], (n, e)))
    w, idx = lax.top_k(s, k)
    w = 2.5 * w / w.sum(-1, keepdims=True)
    wgu = jax.random.normal(ks[2], (e, d, 2, f)) * d ** -0.5
    wd = jax.random.normal(ks[3], (e, f, d)) * f ** -0.5
    dy = jax.random.normal(ks[4], (n, d))
    return x, idx.astype(jnp.int32), w, wgu, wd, dy


def step_fn(impl):
    """jit(x, w, wgu, wd, idx, dy) -> (y, grads): forward + backward of the routed experts."""
    def step(x, w, wgu, wd, idx, dy):
        y, vjp = jax.vjp(lambda x, w, wgu, wd: impl(x, idx, w, wgu, wd), x, w, wgu, wd)
        return y, vjp(dy)
    return jax.jit(step)


def dense_matmul_step(p, d, f):
    """The same active FLOPs as one routed step, as plain 2-D matmuls with no routing."""
    def step(xa, w1, w2, dya):
        def ffn(xa, w1, w2):
            return _mm(_glu(_mm(xa, w1), f), w2)
        y, vjp = jax.vjp(ffn, xa, w1, w2)
        return y, vjp(dya)
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    args = (jax.random.normal(ks[0], (p, d)), jax.random.normal(ks[1], (d, 2 * f)) * d ** -0.5,
            jax.random.normal(ks[2], (f, d)) * f ** -0.5, jax.random.normal(ks[3], (p, d)))
    return jax.jit(step), args


def time_interleaved(jobs: dict, rounds: int, warmup: int):
    """jobs: name -> (fn, args). Compile + warm up each, then `rounds` rounds over all. Returns the median
    wall-clock seconds and the median process CPU seconds (all threads) per job: on a shared machine the
    CPU time is the steadier of the two."""
    for name, (fn, args) in jobs.items():
        t = time.perf_counter()
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
        print(f"  compiled+warmed {name} in {time.perf_counter() - t:.1f}s", flush=True)
    wall = {name: [] for name in jobs}
    cpu = {name: [] for name in jobs}
    for r in range(rounds):
        for name, (fn, args) in jobs.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = lambda d: {name: float(np.median(v)) for name, v in d.items()}
    return med(wall), med(cpu)


# ------------------------------------------------------------------------------------------------------------
# blocked variants that were tried (the kept one is expert_kernels.blocked_local)

def _custom(fwd_loop, bwd_loop, save_h):
    """kernels._blocked_core with pluggable loops."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(block, x, w, w1, w2, order, inverse, sizes, starts):
        xs = kernels._dispatch_rows(x, order, w.shape[1], block)
        ys, _ = fwd_loop(xs, sizes, starts, w1, w2, block, False)
        return (kernels._pair_rows(ys, inverse, w, None) * w[..., None]).sum(1)

    def fwd(block, x, w, w1, w2, order, inverse, sizes, starts):
        xs = kernels._dispatch_rows(x, order, w.shape[1], block)
        ys, hs = fwd_loop(xs, sizes, starts, w1, w2, block, save_h)
        y = (kernels._pair_rows(ys, inverse, w, None) * w[..., None]).sum(1)
        return y, (xs, hs, ys, w, w1, w2, order, inverse, sizes, starts)

    def bwd(block, res, dy):
        xs, hs, ys, w, w1, w2, order, inverse, sizes, starts = res
        n, k = w.shape
        dw = (dy[:, None, :] * kernels._pair_rows(ys, inverse, w, None)).sum(-1)
        dys = kernels._dispatch_rows(dy, order, k, block) * jnp.pad(w.reshape(-1)[order], (0, block))[:, None]
        dxs, dw1, dw2 = bwd_loop(xs, hs, dys, sizes, starts, w1, w2, block)
        return dxs[inverse].reshape(n, k, -1).sum(1), dw, dw1, dw2, None, None, None, None

    core.defvjp(fwd, bwd)

    def impl(block, x, idx, w, wgu, wd):
        e, d, _, f = wgu.shape
        order, inverse, sizes = kernels.sort_by_expert(idx, e)
        starts = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
        return core(block, x, w, wgu.reshape(e, d, 2 * f), wd, order, inverse, sizes, starts)
    return impl


def _flat_fwd(xs, sizes, starts, w1, w2, block, save_h):
    """One loop over all used blocks; block -> expert by searchsorted; weights sliced per block."""
    f = w1.shape[2] // 2
    nbe = (sizes + block - 1) // block
    cum = jnp.cumsum(nbe)
    ys = jnp.zeros((xs.shape[0], w2.shape[2]), xs.dtype)
    hs = jnp.zeros((xs.shape[0], 2 * f), xs.dtype) if save_h else None

    def blk(b, carry):
        ys, hs = carry
        i = jnp.searchsorted(cum, b, side="right").astype(jnp.int32)
        r = starts[i] + (b - (cum[i] - nbe[i])) * block
        h = _mm(lax.dynamic_slice_in_dim(xs, r, block), w1[i])
        ys = lax.dynamic_update_slice_in_dim(ys, _mm(_glu(h, f), w2[i]), r, 0)
        if save_h:
            hs = lax.dynamic_update_slice_in_dim(hs, h, r, 0)
        return ys, hs
    return lax.fori_loop(0, cum[-1], blk, (ys, hs))


def _flat_bwd(xs, hs, dys, sizes, starts, w1, w2, block):
    f = w1.shape[2] // 2
    nbe = (sizes + block - 1) // block
    cum = jnp.cumsum(nbe)
    lane = jnp.arange(block)

    def blk(b, carry):
        dxs, dw1, dw2 = carry
        i = jnp.searchsorted(cum, b, side="right").astype(jnp.int32)
        j = b - (cum[i] - nbe[i])
        r = starts[i] + j * block
        a1, a2 = w1[i], w2[i]
        xb = lax.dynamic_slice_in_dim(xs, r, block)
        dyb = jnp.where((j * block + lane < sizes[i])[:, None], lax.dynamic_slice_in_dim(dys, r, block), 0)
        h = lax.dynamic_slice_in_dim(hs, r, block)
        dh = _glu_bwd(h, _mm_nt(dyb, a2), f)
        dw1 = lax.dynamic_update_index_in_dim(dw1, dw1[i] + _mm_tn(xb, dh), i, 0)
        dw2 = lax.dynamic_update_index_in_dim(dw2, dw2[i] + _mm_tn(_glu(h, f), dyb), i, 0)
        return lax.dynamic_update_slice_in_dim(dxs, _mm_nt(dh, a1), r, 0), dw1, dw2
    return lax.fori_loop(0, cum[-1], blk, (jnp.zeros_like(xs), jnp.zeros_like(w1), jnp.zeros_like(w2)))


def _scan_autodiff(block, x, idx, w, wgu, wd):
    """Padded static blocks, lax.scan with a cond to skip unused blocks, plain autodiff (no custom_vjp)."""
    e, d, _, f = wgu.shape
    n, k = idx.shape
    p = n * k
    w1 = wgu.reshape(e, d, 2 * f)
    order, inverse, sizes = kernels.sort_by_expert(idx, e)
    starts = jnp.cumsum(sizes) - sizes
    nbe = (sizes + block - 1) // block
    cum = jnp.cumsum(nbe)
    nblk = (p + min(e, p) * (block - 1)) // block
    es = idx.reshape(-1)[order]
    ppos = (cum - nbe)[es] * block + jnp.arange(p) - starts[es]           # padded slot of sorted pair
    src = jnp.full((nblk * block,), p, jnp.int32).at[ppos].set(jnp.arange(p, dtype=jnp.int32))
    tok = jnp.concatenate([order // k, jnp.zeros((1,), jnp.int32)])
    xp = jnp.where((src < p)[:, None], x[tok[src]], 0).reshape(nblk, block, d)
    blk_e = jnp.minimum(jnp.searchsorted(cum, jnp.arange(nblk), side="right"), e - 1)

    def body(_, inp):
        xb, i, used = inp
        yb = lax.cond(used, lambda xb: _mm(_glu(_mm(xb, w1[i]), f), wd[i]), jnp.zeros_like, xb)
        return None, yb
    _, yp = lax.scan(body, None, (xp, blk_e, jnp.arange(nblk) < cum[-1]))
    y = yp.reshape(-1, d)[ppos[inverse]].reshape(n, k, d)
    return (y * w[..., None]).sum(1)


def variant_impls(e, k, d, f):
    cfg = make_cfg(e, k, d, f)
    block = kernels.block_size(cfg)
    out = {
        "kept: experts x (full + tail) blocks, h saved": functools.partial(dispatch.routed_experts, cfg),
        "one block size (no tail blocks)": functools.partial(_custom(
            functools.partial(kernels._ffn_blocks_fwd, blocks=(block,)),
            functools.partial(kernels._ffn_blocks_bwd, blocks=(block,)), True), block),
        "h recomputed in backward": functools.partial(
            _custom(kernels._ffn_blocks_fwd, kernels._ffn_blocks_bwd, False), block),
        "flat loop over used blocks": functools.partial(_custom(_flat_fwd, _flat_bwd, True), block),
    }
    if e <= 64:                              # about a minute per step at E=256
        out["static scan + autodiff"] = functools.partial(_scan_autodiff, block)
    return out


# ------------------------------------------------------------------------------------------------------------
# block schedules of the kept kernel, timed against each other in one interleaved group (--ab)

def schedule_variants(e, k, d, f) -> dict:
    """name -> (forward block sizes, backward block sizes) for the kept path's loops (None: its defaults)."""
    block = kernels.block_size(make_cfg(e, k, d, f))
    tail, rungs = kernels.tail_rows(block), kernels.rungs(block)
    chunk = kernels.BWD_CHUNK_BLOCKS * block
    return {"kept: rungs, backward in chunks first": None,
            "before session 7: full blocks, then blocks of block/2": ((block, tail), (block, tail)),
            "rungs, no backward chunks": (rungs, rungs),
            "full blocks, then block/2; backward chunks": ((block, tail), (chunk, block, tail))}


def compiled_with_schedule(cfg, schedule, data):
    """step_fn of dispatch.routed_experts, compiled with the loops' block sizes replaced (the kernel looks
    its loop functions up when it is traced)."""
    fwd, bwd = kernels._ffn_blocks_fwd, kernels._ffn_blocks_bwd
    if schedule:
        kernels._ffn_blocks_fwd = functools.partial(fwd, blocks=schedule[0])
        kernels._ffn_blocks_bwd = functools.partial(bwd, blocks=schedule[1])
    try:
        return step_fn(functools.partial(dispatch.routed_experts, cfg)).lower(*data).compile()
    finally:
        kernels._ffn_blocks_fwd, kernels._ffn_blocks_bwd = fwd, bwd


def schedules_ab(args, experts):
    """Every schedule and the matmul reference interleaved in one group per E; ratios to the kept one."""
    n, d, f, k = args.tokens, args.hidden, args.width, args.topk
    lines = [f"# Block schedules of the blocked kernel, forward + backward (N={n}, K={k}, D={d}, F={f}, fp32; "
             f"{os.cpu_count()} cores, jax {jax.__version__})", "",
             f"`python experiments/bench_moe.py --ab --tokens {n} --experts {args.experts} --topk {k}`: per E, every "
             f"schedule and the dense matmul of the same FLOPs in one group, {args.rounds} interleaved rounds, "
             "medians; ratios of process CPU time (steadier than wall clock when other jobs share the cores).",
             "", "| E | schedule | wall ms | cpu ms | cpu / kept | wall / kept | cpu / matmul |",
             "|---|---|---|---|---|---|---|"]
    for e in experts:
        x, idx, w, wgu, wd, dy = make_inputs(n, d, f, e, k)
        data = (x, w, wgu, wd, idx, dy)
        cfg = make_cfg(e, k, d, f)
        group = {"matmul": dense_matmul_step(n * k, d, f)}
        for name, schedule in schedule_variants(e, k, d, f).items():
            group[name] = (compiled_with_schedule(cfg, schedule, data), data)
        wall, cpu = time_interleaved(group, args.rounds, args.warmup)
        kept = next(iter(schedule_variants(e, k, d, f)))
        for name in list(group)[1:]:
            lines.append(f"| {e} | {name} | {1e3 * wall[name]:.0f} | {1e3 * cpu[name]:.0f} | "
                         f"{cpu[name] / cpu[kept]:.3f} | {wall[name] / wall[kept]:.3f} | "
                         f"{cpu[name] / cpu['matmul']:.2f} |")
    open(os.path.join(args.out, "bench_moe_ab.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------------------
# expert-parallel traffic (child process with 8 devices)

def a2a_bytes_from_hlo(hlo: str) -> list:
    """Operand bytes of every all-to-all in an HLO module (per device; XLA:CPU splits each into a tuple
    of one [1, C, ...] chunk per peer, summed here)."""
    sizes = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "pred": 1}
    out = []
    for line in hlo.splitlines():
        if " all-to-all(" not in line or "=" not in line:
            continue
        result = line.split("=", 1)[1].split(" all-to-all(")[0]
        out.append(sum(sizes[t] * int(np.prod([int(v) for v in dims.split(",") if v] or [1]))
                       for t, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", result)))
    return out


def ep_child(args):
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dsv3_jax.model import expert_parallel as epm
    from dsv3_jax.model.moe import route
    n, d, f, k, e, ep = args.tokens, args.hidden, args.width, args.topk, args.ep_experts, 8
    mesh = jax.make_mesh((1, ep), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rows = []
    for limit in (True, False):
        cfg = make_cfg(e, k, d, f, impl="expert_parallel", n_group=ep, topk_group=4 if limit else ep)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
        r = route(cfg, x, jnp.asarray(rng.normal(size=(d, e)).astype(np.float32)) * d ** -0.5,
                  jnp.zeros((e,), jnp.float32))
        idx = np.asarray(r.expert_index)
        groups = (idx // (e // ep))
        shards_per_token = float(np.mean([len(set(g)) for g in groups]))
        _, _, _, wgu, wd, _ = make_inputs(8, d, f, e, k)
        for name, dedup, fr in (("per pair", False, (1.0,)), ("per shard", True, (1.0,)),
                                ("per shard + capacity ladder (default)", True, None)):
            fn = jax.jit(lambda x, i, w, a, b: epm.expert_parallel(cfg, x, i, w, a, b, dedup=dedup,
                                                                   capacity_fractions=fr))
            with jax.set_mesh(mesh):
                tok = NamedSharding(mesh, P(("data", "expert")))
                hlo = fn.lower(jax.device_put(x, tok), jax.device_put(idx, tok),
                               jax.device_put(r.gate_weight, tok), wgu, wd).compile().as_text()
            per_op = a2a_bytes_from_hlo(hlo)
            shape = epm.exchange_shape(cfg, n // ep, ep, dedup, fr)
            need = int(epm.destination_counts(cfg, idx, ep, ep, dedup).max())
            cap = min(c for c in shape.capacities if c >= need)
            b = epm.exchange_bytes_per_token(cfg, shape, cap)
            worst = epm.exchange_bytes_per_token(cfg, shape, shape.capacities[-1])
            # HLO check: every branch's 4 all-to-alls (x, ids, weights; results) are in the module.
            expect = {ep * c * (d * 4) for c in shape.capacities}
            assert expect <= set(per_op), (sorted(set(per_op)), expect)
            rows.append({"group_limit": limit, "scheme": name, "capacity": cap,
                         "worst_capacity": shape.capacities[-1],
                         "rows_per_token": b["rows_per_token"],
                         "bytes_per_token": b["dispatch_bytes_per_token"] + b["combine_bytes_per_token"],
                         "worst_bytes_per_token": worst["dispatch_bytes_per_token"] + worst["combine_bytes_per_token"],
                         "needed_shards_per_token": shards_per_token,
                         "hlo_all_to_all_ops": len(per_op)})
    print(json.dumps(rows))


def run_ep_child(args) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "--ep-child", "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--width", str(args.width), "--topk", str(args.topk),
           "--ep-experts", str(args.ep_experts)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        print(out.stderr[-3000:])
        raise SystemExit("expert-parallel child failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", default="8,16,64,256")
    ap.add_argument("--impls", default="blocked,dense,ragged")
    ap.add_argument("--dense-max-experts", type=int, default=64)
    ap.add_argument("--ragged-max-experts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ep-experts", type=int, default=64)
    ap.add_argument("--no-ep", action="store_true", help="skip the expert-parallel traffic part")
    ap.add_argument("--variants", action="store_true", help="time the blocked variants instead")
    ap.add_argument("--ab", action="store_true",
                    help="time the kept kernel's block schedules against each other (bench_moe_ab.md)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up, no ragged beyond E=8")
    ap.add_argument("--out", default=RESULTS, help="folder of the written tables (default experiments/results)")
    ap.add_argument("--ep-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ep_child:
        return ep_child(args)
    if args.quick:
        args.rounds, args.warmup, args.ragged_max_experts = 3, 1, 8
    os.makedirs(args.out, exist_ok=True)
    n, d, f, k = args.tokens, args.hidden, args.width, args.topk
    p = n * k
    experts = [int(v) for v in args.experts.split(",")]
    if args.ab:
        return schedules_ab(args, experts)
    flops = 3 * 2 * p * (d * 2 * f + f * d)              # forward + backward (2x) of both matmuls
    print(f"N={n} D={d} F={f} K={k} P={p}; {flops / 1e9:.1f} GFLOP per step; devices {jax.devices()}",
          flush=True)

    jobs = {"matmul": dense_matmul_step(p, d, f)}
    for e in experts:
        x, idx, w, wgu, wd, dy = make_inputs(n, d, f, e, k)
        data = (x, w, wgu, wd, idx, dy)
        if args.variants:
            for name, impl in variant_impls(e, k, d, f).items():
                jobs[(e, name)] = (step_fn(impl), data)
            continue
        for impl in args.impls.split(","):
            if (impl == "dense" and e > args.dense_max_experts) or (impl == "ragged" and e > args.ragged_max_experts):
                continue
            cfg = make_cfg(e, k, d, f, impl=impl)
            jobs[(e, impl)] = (step_fn(functools.partial(dispatch.routed_experts, cfg)), data)
    # Each implementation is timed in its own interleaved group, with its own run of the matmul reference:
    # interleaved with the dense and ragged steps (GBs of intermediates at E=64), the blocked E=64 step
    # measured 1.3x slower than alone.
    reference = jobs.pop("matmul")
    names = list(dict.fromkeys(name for (_, name) in jobs))
    times, cpu, ref_t, ref_c = {}, {}, {}, {}
    for name in names:
        group = {"matmul": reference, **{key: job for key, job in jobs.items() if key[1] == name}}
        t, c = time_interleaved(group, args.rounds, args.warmup)
        ref_t[name], ref_c[name] = t.pop("matmul"), c.pop("matmul")
        times.update(t)
        cpu.update(c)
    t_mm, c_mm = ref_t[names[0]], ref_c[names[0]]
    rows = []
    for (e, name), t in times.items():
        base = times.get((experts[0], name))
        cbase = cpu.get((experts[0], name))
        rows.append({"experts": e, "impl": name, "ms": 1e3 * t, "tokens_per_s": n / t,
                     "gflops": flops / t / 1e9, "flops_fraction": ref_t[name] / t,
                     "time_ratio_vs_first": t / base if base else None,
                     "cpu_ms": 1e3 * cpu[(e, name)], "cpu_flops_fraction": ref_c[name] / cpu[(e, name)],
                     "cpu_time_ratio_vs_first": cpu[(e, name)] / cbase if cbase else None})

    lines = [f"# MoE routed experts, forward + backward ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, jax {jax.__version__}, {jax.devices()[0].device_kind})", "",
             f"N={n} tokens, K={k}, D={d}, F={f}, fp32; {flops / 1e9:.1f} GFLOP per step. Dense matmul with the "
             f"same active FLOPs: {1e3 * t_mm:.0f} ms = {flops / t_mm / 1e9:.0f} GFLOP/s (same run; "
             f"{1e3 * c_mm:.0f} ms of process CPU time). Median of {args.rounds} interleaved rounds, each "
             "implementation in its own group with its own run of that matmul (its fractions use it). Wall clock "
             f"first; the 'cpu' columns use process CPU time (steadier when other jobs share the cores).", "",
             f"| E | impl | ms | tokens/s | GFLOP/s | fraction of matmul | time / time(E={experts[0]}) "
             f"| cpu ms | cpu fraction | cpu time / E={experts[0]} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (names.index(r["impl"]), r["experts"])):
        ratio = f"{r['time_ratio_vs_first']:.2f}" if r["time_ratio_vs_first"] else ""
        cratio = f"{r['cpu_time_ratio_vs_first']:.2f}" if r["cpu_time_ratio_vs_first"] else ""
        lines.append(f"| {r['experts']} | {r['impl']} | {r['ms']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['gflops']:.1f} | {r['flops_fraction']:.2f} | {ratio} | {r['cpu_ms']:.0f} | "
                     f"{r['cpu_flops_fraction']:.2f} | {cratio} |")

    summary = {}
    if args.variants:
        path = os.path.join(args.out, "bench_moe_variants.md")
        open(path, "w").write("\n".join(lines) + "\n")
        print("\n".join(lines))
        summary = {"variants": {nm: {e: [round(times[(e, nm)] * 1e3), round(cpu[(e, nm)] * 1e3)]
                                     for e in experts if (e, nm) in times} for nm in names},
                   "matmul_ms": [round(t_mm * 1e3), round(c_mm * 1e3)], "units": "[wall ms, cpu ms]"}
        print(json.dumps(summary))
        return

    ep_rows = [] if args.no_ep else run_ep_child(args)
    if ep_rows:
        lines += ["", f"## Expert-parallel all_to_all traffic (E={args.ep_experts}, expert axis 8, n_group 8, "
                  f"{n // 8} tokens per device, D={d} fp32)", "",
                  "Per token and per step, both directions (tokens out + results back), from the all_to_all "
                  "shapes in the compiled HLO; 'needed' is the average number of distinct shards a token's "
                  "experts live on (what a ragged all_to_all would move).", "",
                  "| group limit | scheme | rows per token | KiB per token | worst-case KiB | needed shards |",
                  "|---|---|---|---|---|---|"]
        for r in ep_rows:
            lines.append(f"| {'topk_group=4' if r['group_limit'] else 'none'} | {r['scheme']} | "
                         f"{r['rows_per_token']:.2f} | {r['bytes_per_token'] / 1024:.1f} | "
                         f"{r['worst_bytes_per_token'] / 1024:.1f} | {r['needed_shards_per_token']:.2f} |")
    md = os.path.join(args.out, "bench_moe.md")
    open(md, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, names, experts, os.path.join(args.out, "bench_moe.png"), n, d, f, k)

    def pick(impl, e, key):
        return next((r[key] for r in rows if r["impl"] == impl and r["experts"] == e), None)
    summary = {
        "time_ratio_e64_vs_e8": pick("blocked", 64, "time_ratio_vs_first") if experts[0] == 8 else None,
        "flops_fraction_e64": pick("blocked", 64, "flops_fraction"),
        "flops_fraction_e8": pick("blocked", 8, "flops_fraction"),
        "cpu_time_ratio_e64_vs_e8": pick("blocked", 64, "cpu_time_ratio_vs_first"),
        "cpu_flops_fraction_e64": pick("blocked", 64, "cpu_flops_fraction"),
        "flops_fraction_e256": pick("blocked", 256, "flops_fraction"),
        "time_ratio_e256_vs_e8": pick("blocked", 256, "time_ratio_vs_first") if experts[0] == 8 else None,
        "matmul_gflops": flops / t_mm / 1e9,
        "rows": rows, "ep_traffic": ep_rows,
    }
    json.dump(summary, open(os.path.join(args.out, "bench_moe.json"), "w"), indent=1)
    short = {k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in summary.items()
             if k_ not in ("rows", "ep_traffic")}
    if ep_rows:
        short["ep_kib_per_token"] = {f"{'limit' if r['group_limit'] else 'nolimit'}/{r['scheme']}":
                                     round(r["bytes_per_token"] / 1024, 1) for r in ep_rows}
    print(json.dumps(short))


def plot(rows, names, experts, path, n, d, f, k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        rs = sorted((r for r in rows if r["impl"] == name), key=lambda r: r["experts"])
        a1.plot([r["experts"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=name)
        a2.plot([r["experts"] for r in rs], [r["flops_fraction"] for r in rs], "o-", label=name)
    for a in (a1, a2):
        a.set_xscale("log", base=2)
        a.set_xticks(experts, [str(e) for e in experts])
        a.set_xlabel("routed experts E (K fixed)")
        a.grid(alpha=0.3)
    a1.set_yscale("log")
    a1.set_ylabel("tokens/s (fwd+bwd)")
    a2.set_ylabel("achieved / dense-matmul FLOP/s")
    a2.axhline(1.0, color="gray", lw=0.8)
    a1.legend()
    fig.suptitle(f"MoE routed experts, N={n} K={k} D={d} F={f}, fp32 CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
