"""Train-step throughput on the shared benchmark config, one CPU device, with and without MTP.

Benchmark config (preset `bench`): hidden 512, 8 heads, 4 layers (first 1 dense), dense FFN 1536, 16 routed
experts of width 256, top-4, 1 shared, n_group 4, topk_group 2, q_lora 128, kv_lora 64, nope 32, rope 16,
v 32, vocab 1024, MTP depth 1, batch 8 x 256 tokens.

Model FLOPs per step = 3 x forward (backward = 2 x forward), forward = 2 x tokens x active matmul params
(routed experts scaled by K/E; the embedding lookup is no matmul; the head counted once per use) plus
attention 2 x B x T^2 x H x (qk_head_dim + v_head_dim) per layer (full T^2, as in the PaLM MFU convention).
The reference is a 2048^3 fp32 matmul timed in the same run. Timings: warm-up, then the median of several
steps, each ended by block_until_ready. Last printed line: one JSON object.

    python experiments/bench_train.py [--steps 8] [--moe-impl blocked] [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.config import MeshConfig, RunConfig, get_preset, TRAIN_PRESETS  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402
from dsv3_jax.params import count_params  # noqa: E402
from dsv3_jax.sharding import activate, make_mesh  # noqa: E402
from dsv3_jax.train.optimizer import make_optimizer  # noqa: E402
from dsv3_jax.train.state import create_train_state  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402


def model_flops_per_step(rc: RunConfig, mtp: bool) -> float:
    mc, tc = rc.model, rc.train
    counts = count_params(mc)
    tokens = tc.global_batch_size * tc.seq_len
    head = mc.hidden_size * mc.vocab_size
    active = counts["activated_without_embedding"]
    attn_layers = mc.num_hidden_layers
    if mtp and mc.num_nextn_predict_layers:
        e_scale = mc.num_experts_per_tok / mc.n_routed_experts
        per_expert_set = 3 * mc.hidden_size * mc.moe_intermediate_size * mc.n_routed_experts
        active += (counts["mtp"] - per_expert_set * (1 - e_scale) * mc.num_nextn_predict_layers
                   + head * mc.num_nextn_predict_layers)
        attn_layers += mc.num_nextn_predict_layers
    attn = 2 * tc.global_batch_size * tc.seq_len ** 2 * mc.num_attention_heads * (mc.qk_head_dim + mc.v_head_dim)
    return 3 * (2 * tokens * active + attn * attn_layers)


def time_fn(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops_per_s(n: int = 2048, reps: int = 5) -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / time_fn(lambda: f(a), reps)


def step_time(rc: RunConfig, steps: int) -> float:
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    model, opt = Transformer(rc.model), make_optimizer(rc.train)
    state = create_train_state(model, rc, mesh, opt)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, rc.model.vocab_size,
                                                          (rc.train.global_batch_size, rc.train.seq_len + 1)),
                        jnp.int32)
    with activate(mesh):
        step = jax.jit(make_train_step(model, rc, opt), donate_argnums=0)
        holder = [state]

        def run():
            holder[0], m = step(holder[0], batch)
            return m["loss"]
        return time_fn(run, steps)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--moe-impl", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    rc = RunConfig(get_preset("bench"), TRAIN_PRESETS["bench"]).override(args.overrides)
    if args.moe_impl:
        rc = rc.override([f"model.moe_impl={args.moe_impl}"])
    tokens = rc.train.global_batch_size * rc.train.seq_len
    no_mtp = rc.override(["model.num_nextn_predict_layers=0"])

    mm = matmul_flops_per_s()
    t_mtp = step_time(rc, args.steps)
    t_no = step_time(no_mtp, args.steps)
    mm = (mm + matmul_flops_per_s()) / 2          # before and after: the machine is noisy
    f_mtp, f_no = model_flops_per_step(rc, True), model_flops_per_step(no_mtp, False)
    rows = [("MTP on", t_mtp, tokens / t_mtp, f_mtp / t_mtp), ("MTP off", t_no, tokens / t_no, f_no / t_no)]
    print(f"moe_impl={rc.model.moe_impl}  matmul 2048^3 fp32: {mm / 1e9:.1f} GFLOP/s")
    print(f"{'':8} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of matmul':>9}")
    for name, t, tps, fps in rows:
        print(f"{name:8} {t:8.3f} {tps:10.0f} {fps / 1e9:9.1f} {fps / mm:9.1%}")
    print(json.dumps({"moe_impl": rc.model.moe_impl, "tokens_per_s": tokens / t_mtp,
                      "tokens_per_s_no_mtp": tokens / t_no, "model_flops_per_s": f_mtp / t_mtp,
                      "model_flops_per_s_no_mtp": f_no / t_no, "matmul_flops_per_s": mm,
                      "flops_fraction": f_mtp / t_mtp / mm, "flops_fraction_no_mtp": f_no / t_no / mm}))


if __name__ == "__main__":
    main()
