"""Train-step throughput of a preset (default: the shared benchmark config) on one device, with and without MTP.

Benchmark config (preset `bench`): hidden 512, 8 heads, 4 layers (first 1 dense), dense FFN 1536, 16 routed
experts of width 256, top-4, 1 shared, n_group 4, topk_group 2, q_lora 128, kv_lora 64, nope 32, rope 16,
v 32, vocab 1024, MTP depth 1, batch 8 x 256 tokens.

Model FLOPs per step: dsv3_jax/params.py train_flops_per_step (3 x forward; 2 x tokens x activated matmul params
plus attention at full T^2, the PaLM MFU convention, though the causal block skip computes less:
model/mla.py causal_attention_core).
The reference is an n^3 matmul in the compute dtype (`--matmul-size`, 2048) timed in the same run, before,
between and after the two configurations of each round: a configuration's share of the matmul FLOP/s is
taken against the mean of the two readings around it, and the summary gives the median of these per-round
shares. (A single reading per round moved the share of one tree between 55% and 68% from run to run on one
machine: experiments/results/train_speed.md, session 27.) With
`--peak-flops` (the device's dense peak for that dtype, e.g. 989e12 for an H200 in bf16) the summary also
gives MFU = model FLOP/s / peak. Timings: warm-up, then the median of several steps, each ended by
block_until_ready. Last printed line: one JSON object. JAX runs on the CPU unless JAX_PLATFORMS says otherwise.

    python experiments/bench_train.py [--preset bench] [--dtype float32] [--moe-impl blocked] [--steps 6]
        [--rounds 2] [--peak-flops F] [--torch-peer ../shared/peers/torch_peer.py] [--out experiments/results]
        [key=value overrides, e.g. train.global_batch_size=4]

Rounds alternate: ours with MTP on, ours with MTP off, then (with --torch-peer) the torch peer, so that all
three see the same machine state; the summary takes medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax.config import RunConfig, run_preset  # noqa: E402
from dsv3_jax.host_malloc import reuse_freed_memory  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402
from dsv3_jax.params import train_flops_per_step  # noqa: E402
from dsv3_jax.sharding import activate_for, batch_sharding, make_mesh  # noqa: E402
from dsv3_jax.train.optimizer import make_optimizer  # noqa: E402
from dsv3_jax.train.state import create_train_state, state_shardings  # noqa: E402
from dsv3_jax.train.step import make_train_step  # noqa: E402
from results_io import cpu_summary  # noqa: E402  (experiments/, beside this file)

DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}


MAXTEXT_TOKENS_PER_S = 450     # MaxText 0.2.5 on this config and machine class, best of its MoE paths (issue #4)


def model_flops_per_step(rc: RunConfig, mtp: bool) -> float:
    return train_flops_per_step(rc.model, rc.train.global_batch_size, rc.train.seq_len, mtp)


def time_fn(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops_per_s(n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), dtype)
    f = jax.jit(lambda x: x @ x)
    return 2 * n ** 3 / time_fn(lambda: f(a), reps)


def runner_mesh(rc: RunConfig) -> jax.sharding.Mesh:
    """The mesh a runner uses: rc.mesh over as few devices as its fixed axes need, so the presets (data=-1)
    get bench_train's one-device step and train_ab.py's `mesh.data=2` variants two devices (on CPU: virtual
    devices from XLA_FLAGS)."""
    size = int(np.prod([s for s in (rc.mesh.data, rc.mesh.expert, rc.mesh.tensor) if s > 0]))
    if size > len(jax.devices()):
        raise SystemExit(f"mesh {rc.mesh} needs {size} devices, this process has {len(jax.devices())} (on CPU: "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={size})")
    return make_mesh(rc.mesh, jax.devices()[:size])


def make_runner(rc: RunConfig):
    """A compiled, warmed-up train step on runner_mesh(rc); `runner(n)` -> median seconds of n steps."""
    mesh = runner_mesh(rc)
    model, opt = Transformer(rc.model), make_optimizer(rc.train)
    state = create_train_state(model, rc, mesh, opt)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, rc.model.vocab_size,
                                                          (rc.train.global_batch_size, rc.train.seq_len + 1)),
                        jnp.int32)
    shardings = {}
    if mesh.size > 1:
        _, state_sharding = state_shardings(model, rc, mesh, opt)
        batch = jax.device_put(batch, batch_sharding(mesh))
        shardings = dict(in_shardings=(state_sharding, batch_sharding(mesh)))
    scope = lambda: activate_for(mesh, rc.mesh)
    with scope():
        step = jax.jit(make_train_step(model, rc, opt), donate_argnums=0, **shardings)
    holder = [state]

    def one():
        with scope():
            holder[0], m = step(holder[0], batch)
        return m["loss"]

    time_fn(one, 1)                                                    # compile + warm-up

    def runner(n: int) -> float:
        return time_fn(one, n, warmup=1)
    runner.compiled_text = lambda: step.lower(holder[0], batch).compile().as_text()   # for profile_train.py
    runner.mesh = mesh
    return runner


def torch_peer_tokens_per_s(path: str, steps: int) -> float:
    """Run the torch peer script (transformers DeepseekV3ForCausalLM, eager, no MTP) and parse its tokens/s."""
    out = subprocess.run([sys.executable, path, str(steps)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"tokens_per_s=([0-9.]+)", out)
    if not match:
        raise RuntimeError(f"could not read tokens_per_s from {path}: {out[-500:]}")
    return float(match.group(1))


def write_results(out_dir: str, rows: list, summary: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    device = jax.devices()[0].device_kind
    where = "one device" if summary.get("devices", 1) == 1 else f"a mesh of {summary['devices']} devices"
    lines = [f"# Train-step throughput ({summary['preset']} preset, {where}: {device}, {summary['dtype']}, "
             f"moe_impl={summary['moe_impl']})", "",
             f"Machine: {os.cpu_count()} CPU cores" + (f", {summary['cpu']}" if summary.get("cpu") else "") +
             f", jax {jax.__version__} ({jax.default_backend()}). "
             f"Batch {summary['batch']} x {summary['seq_len']} tokens. Each round times our step with MTP "
             "on, then off" + (", then runs the torch peer" if summary.get("torch_tokens_per_s") else "") +
             "; medians over rounds. Model FLOPs: see experiments/bench_train.py.", "",
             "| round | MTP on tok/s | MTP off tok/s | torch (no MTP) tok/s | matmul GFLOP/s | MTP on / off, of the matmul |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        torch_col = f"{r['torch']:.0f}" if r.get("torch") else "-"
        share = f"{r['fraction']:.1%} / {r['fraction_no_mtp']:.1%}"
        lines.append(f"| {r['round']} | {r['on']:.0f} | {r['off']:.0f} | {torch_col} | {r['matmul'] / 1e9:.0f} "
                     f"| {share} |")
    if summary.get("peak_flops"):
        lines += ["", f"MFU against a peak of {summary['peak_flops'] / 1e12:.0f} TFLOP/s: MTP on "
                  f"{summary['mfu']:.1%}, MTP off {summary['mfu_no_mtp']:.1%}."]
    lines += ["", "```", json.dumps(summary, indent=1), "```"]
    with open(os.path.join(out_dir, "bench_train.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "bench_train.json"), "w") as f:      # read by readme_table.py
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = ["ours, MTP on", "ours, MTP off"] + (["torch (no MTP)"] if summary.get("torch_tokens_per_s") else [])
    vals = [summary["tokens_per_s"], summary["tokens_per_s_no_mtp"]] + (
        [summary["torch_tokens_per_s"]] if summary.get("torch_tokens_per_s") else [])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, vals, color=["C0", "C0", "C1"][:len(vals)])
    if summary["preset"] == "bench" and jax.default_backend() == "cpu":
        ax.axhline(MAXTEXT_TOKENS_PER_S, color="C3", ls="--",
                   label=f"MaxText 0.2.5 ({MAXTEXT_TOKENS_PER_S}, issue figure)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{summary['preset']} train step, {jax.devices()[0].device_kind}, {summary['dtype']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench_train.png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench", help="model and train preset (default: bench)")
    p.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16 (bf16), float16; params stay "
                                                 "in the preset's param_dtype (default: the preset's dtype)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per round and configuration")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--moe-impl", default=None, help="MoE dispatch (default: the preset's)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the device's dense peak FLOP/s in the compute dtype (H200 bf16: 989e12): adds MFU")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n^3 reference matmul")
    p.add_argument("--torch-peer", default=None, help="path of ../shared/peers/torch_peer.py: run it each round")
    p.add_argument("--out", default=None, help="write bench_train.{md,json,png} here (e.g. experiments/results)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if os.environ["JAX_PLATFORMS"] == "cpu":
        reuse_freed_memory()        # restarts once with glibc malloc settings (dsv3_jax/host_malloc.py)
    rc = run_preset(args.preset)
    if args.dtype:
        rc = rc.override([f"model.dtype={DTYPE_ALIASES.get(args.dtype, args.dtype)}"])
    if args.moe_impl:
        rc = rc.override([f"model.moe_impl={args.moe_impl}"])
    rc = rc.override(args.overrides)
    tokens = rc.train.global_batch_size * rc.train.seq_len
    no_mtp = rc.override(["model.num_nextn_predict_layers=0"])
    run_on, run_off = make_runner(rc), make_runner(no_mtp)

    f_mtp, f_no = model_flops_per_step(rc, True), model_flops_per_step(no_mtp, False)
    matmul = lambda: matmul_flops_per_s(args.matmul_size, dtype=rc.model.dtype)
    rows = []
    for r in range(args.rounds):
        # The reference matmul brackets each configuration: its rate moves by +-10% within a minute on a
        # shared 2-core machine, so one reading per round can be far from the one the step ran beside.
        mm_before = matmul()
        on = tokens / run_on(args.steps)
        mm_between = matmul()
        off = tokens / run_off(args.steps)
        mm_after = matmul()
        mm = statistics.median((mm_before, mm_between, mm_after))
        row = {"round": r + 1, "on": on, "off": off, "matmul": mm,
               "fraction": f_mtp * on / tokens / ((mm_before + mm_between) / 2),
               "fraction_no_mtp": f_no * off / tokens / ((mm_between + mm_after) / 2)}
        if args.torch_peer:
            row["torch"] = torch_peer_tokens_per_s(args.torch_peer, args.steps + 2)
        rows.append(row)
        print(f"round {r + 1}: MTP on {row['on']:.0f} tok/s, MTP off {row['off']:.0f} tok/s"
              + (f", torch {row['torch']:.0f} tok/s" if "torch" in row else "") + f", matmul {mm / 1e9:.0f} GFLOP/s",
              flush=True)
    med = lambda k: statistics.median(row[k] for row in rows)
    on, off, mm = med("on"), med("off"), med("matmul")
    fraction = {"MTP on": med("fraction"), "MTP off": med("fraction_no_mtp")}
    print(f"preset {args.preset}, moe_impl={rc.model.moe_impl}, {rc.model.dtype}, "
          f"{jax.devices()[0].device_kind}; matmul {args.matmul_size}^3: {mm / 1e9:.1f} GFLOP/s")
    print(f"{'':8} {'s/step':>8} {'tokens/s':>10} {'GFLOP/s':>9} {'of matmul':>9}")
    for name, tps, flops in (("MTP on", on, f_mtp), ("MTP off", off, f_no)):
        fps = flops * tps / tokens
        print(f"{name:8} {tokens / tps:8.3f} {tps:10.0f} {fps / 1e9:9.1f} {fraction[name]:9.1%}")
    summary = {"preset": args.preset, "dtype": rc.model.dtype, "device": jax.devices()[0].device_kind,
               "devices": run_on.mesh.size,
               "batch": rc.train.global_batch_size, "seq_len": rc.train.seq_len,
               "moe_impl": rc.model.moe_impl, "tokens_per_s": on, "tokens_per_s_no_mtp": off,
               "model_flops_per_s": f_mtp * on / tokens, "model_flops_per_s_no_mtp": f_no * off / tokens,
               "matmul_flops_per_s": mm, "matmul_size": args.matmul_size, "flops_fraction": fraction["MTP on"],
               "flops_fraction_no_mtp": fraction["MTP off"]}
    if jax.default_backend() == "cpu":
        summary["cpu"] = cpu_summary()          # the torch ratio moves with the CPU's vector extensions
    if args.preset == "bench" and jax.default_backend() == "cpu":
        summary["vs_maxtext"] = on / MAXTEXT_TOKENS_PER_S
    if args.peak_flops:
        summary.update(peak_flops=args.peak_flops, mfu=summary["model_flops_per_s"] / args.peak_flops,
                       mfu_no_mtp=summary["model_flops_per_s_no_mtp"] / args.peak_flops)
    if args.torch_peer:
        summary["torch_tokens_per_s"] = med("torch")
        summary["no_mtp_vs_torch"] = statistics.median(row["off"] / row["torch"] for row in rows)
    if args.out:
        write_results(args.out, rows, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
