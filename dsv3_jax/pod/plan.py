"""`python -m dsv3_jax plan`: will this run fit that TPU slice? Compiles the real step ahead of time for the
topology's compile-only devices (libtpu, on any machine) and prints per-device memory, FLOPs and collective
bytes; `--search` tries meshes, remat policies, microbatches and optimizer dtypes; without `--mesh` it uses
the recommended setup of RECOMMENDED (documented in docs/scaling.md). Results go to
experiments/results/plan.md and plan.json (one row per topology and setup, newest kept).
"""

from __future__ import annotations

import itertools
import json
import os

from ..config import RunConfig, run_preset
from ..errors import InputError
from .topology import GIB, LibtpuMissing, Topology, libtpu_available, parse_topology

RESULTS = os.path.join("experiments", "results")

# The setups docs/scaling.md explains, per TPU generation, for the V3 model at seq 4096: expert parallelism
# 8-wide, the rest data parallel with every parameter sharded over every axis (FSDP), bf16 compute and Adam
# moments, blocked attention, whole-layer remat, one expert-parallel capacity with one kernel pass per slot
# (experiments/results/pod_memory.md), one sequence per device per microbatch (the working set is one
# microbatch's, so more microbatches add tokens, not memory). `tokens` is per device per step.
RECOMMENDED = {
    "v5p": dict(expert=8, tensor=1, tokens=49152, microbatches=12, remat="full", moments="bfloat16"),
    "tpu7x": dict(expert=8, tensor=1, tokens=32768, microbatches=8, remat="full", moments="bfloat16"),
    "v4": dict(expert=8, tensor=1, tokens=4096, microbatches=1, remat="full", moments="bfloat16"),
    "v5e": dict(expert=8, tensor=1, tokens=4096, microbatches=1, remat="full", moments="bfloat16"),
    "v6e": dict(expert=8, tensor=1, tokens=4096, microbatches=1, remat="full", moments="bfloat16"),
}
BIG_MODEL_OPTIONS = ["model.moe_impl=expert_parallel", "model.dtype=bfloat16", "model.attention_impl=blocked",
                     "model.moe_capacity_fractions=[1.0]", "model.moe_slot_passes=true",
                     "mesh.zero3=true", "mesh.fsdp=true"]


def setup_overrides(rc: RunConfig, topo: Topology, expert: int, tensor: int, tokens: int, microbatches: int,
                    remat: str, moments: str) -> list[str]:
    """Overrides for one setup: the mesh (data takes the rest), the global batch for `tokens` per device."""
    n = topo.num_devices
    expert = min(expert, rc.model.n_routed_experts, n)
    seqs = max(1, tokens * n // rc.train.seq_len)
    shards = n // (expert * tensor)
    seqs = -(-seqs // (shards * expert * microbatches)) * shards * expert * microbatches
    return [f"mesh.data={shards}", f"mesh.expert={expert}", f"mesh.tensor={tensor}",
            f"train.global_batch_size={seqs}", f"train.microbatches={microbatches}",
            f"model.remat_policy={remat}", f"train.moment_dtype={moments}"]


def recommended(rc: RunConfig, topo: Topology) -> list[str]:
    r = RECOMMENDED[topo.generation]
    return BIG_MODEL_OPTIONS + setup_overrides(rc, topo, r["expert"], r["tensor"], r["tokens"], r["microbatches"],
                                               r["remat"], r["moments"])


def search_space(rc: RunConfig, topo: Topology) -> list[list[str]]:
    """Meshes x remat policies x microbatches x optimizer dtypes x tokens per device, most tokens first."""
    experts = [e for e in (8, 16, 32) if e <= min(rc.model.n_routed_experts, topo.num_devices)] or [1]
    tensors = [t for t in (1, 2) if rc.model.num_attention_heads % t == 0]
    seq = rc.train.seq_len
    tokens = sorted({seq * 12, seq * 8, seq * 4, seq * 2, seq}, reverse=True)
    out = []
    for tok, e, t, remat, mb, mom in itertools.product(tokens, experts, tensors, ("full", "dots_no_batch"),
                                                       (1, 2, 4), ("bfloat16", "float32")):
        if topo.num_devices % (e * t) or (tok // seq) % mb:     # whole sequences per device per microbatch
            continue
        out.append(BIG_MODEL_OPTIONS + setup_overrides(rc, topo, e, t, tok, mb, remat, mom))
    return out


def plan_one(rc: RunConfig, topo: Topology, step: str = "train", devices=None, **decode) -> dict:
    """Compile one setup; -> the report row (JSON-able)."""
    from .compile import compile_train_step
    from ..params import decode_flops_per_step, train_flops_per_step
    devices = devices if devices is not None else topo.devices()
    hbm = topo.gen.hbm_bytes
    if step == "train":
        report = compile_train_step(rc, devices, hbm)
    else:
        from .serving import compile_decode_step
        report = compile_decode_step(rc, devices, hbm, **decode)
    tokens = report.get("tokens_per_device", 0)
    # The model's FLOPs per device (params.py): XLA's cost analysis counts each loop body once (the layer
    # scan, the microbatch scan), so its figure (kept as xla_flops_per_device) is not the step's.
    # a decode row's batch and length are the served batch and its context, not the train config's
    if step == "train":
        batch, seq_len = rc.train.global_batch_size, rc.train.seq_len
        model_flops = train_flops_per_step(rc.model, batch, seq_len)
    else:
        batch, seq_len = report["batch"], report["context"]
        model_flops = decode_flops_per_step(rc.model, batch, seq_len)
    flops = model_flops / len(devices)
    xla_flops = report.pop("flops_per_device", None)
    return {"topology": topo.accelerator_type, "libtpu_topology": topo.libtpu_name, "chips": topo.chips,
            "devices": topo.num_devices, "step": step, "hbm_bytes_per_device": hbm,
            "options": {"moment_dtype": rc.train.moment_dtype, "remat_policy": rc.model.remat_policy,
                        "microbatches": rc.train.microbatches, "attention_impl": rc.model.attention_impl,
                        "dtype": rc.model.dtype, "zero3": rc.mesh.zero3, "fsdp": rc.mesh.fsdp,
                        "moe_impl": rc.model.moe_impl},
            "global_batch": batch, "seq_len": seq_len,
            "peak_tflops_per_chip": topo.gen.peak_bf16_flops / 1e12,
            **report, "tokens_per_device": tokens, "flops_per_device": flops, "xla_flops_per_device": xla_flops,
            "seconds_at_peak": flops / (topo.gen.peak_bf16_flops / topo.gen.devices_per_chip)}


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def _short_op_name(name: str) -> str:
    """The model-code part of an HLO op_name: the module path after the last transform wrapper."""
    parts = [p for p in name.split("/") if p not in ("while", "body", "closed_call", "checkpoint",
                                                     "rematted_computation", "shard_map")]
    return "/".join(parts[-4:])


def format_report(r: dict) -> str:
    c = r.get("collective_bytes") or {}
    lines = [f"topology {r['topology']} ({r['libtpu_topology']}): {r['chips']} chips, {r['devices']} devices, "
             f"HBM {_gib(r['hbm_bytes_per_device'])} GiB per device",
             f"mesh {r['mesh']}  global batch {r['global_batch']} x {r['seq_len']}  "
             f"tokens per device {r['tokens_per_device']}  options {r['options']}",
             "per device (GiB):",
             f"  arguments {_gib(r.get('argument_bytes'))} = params {_gib(r.get('params_bytes'))} + optimizer state "
             f"{_gib(r.get('opt_state_bytes'))} + batch {_gib(r.get('batch_bytes'))} + other state "
             f"{_gib(r.get('other_state_bytes'))}",
             f"  temporaries {_gib(r.get('temp_bytes'))}  output {_gib(r.get('output_bytes'))}  "
             f"alias {_gib(r.get('alias_bytes'))}  sum of allocations {_gib(r.get('memory_analysis_bytes'))}",
             f"  peak {_gib(r.get('bytes_per_device'))} of {_gib(r['hbm_bytes_per_device'])} HBM "
             f"(the HBM heap the compiler lays out and checks)"
             + (f"; host (pinned) temporaries {_gib(r['host_temp_bytes'])}, outside the HBM"
                if r.get("host_temp_bytes") else ""),
             f"fits: {'yes' if r['fits'] else 'no'}" + ("  (compiler: RESOURCE_EXHAUSTED: " + r.get('error', '')[:300]
                                                         + ")" if r.get("oom") else ""),
             f"compile {r.get('compile_s')} s (lower {r.get('lower_s')} s)",
             f"model FLOPs per device per step: {r['flops_per_device']:.3e} ({r['seconds_at_peak']:.3f} s at the "
             f"bf16 peak; XLA's cost analysis, loop bodies once: {r.get('xla_flops_per_device') or 0:.3e})"
             if r.get("flops_per_device") else "FLOPs: -"]
    if c:
        uncounted = r.get("collective_loops_uncounted")
        lines.append("collective bytes per device per step (GiB): " +
                     ", ".join(f"{k} {_gib(v)}" + (" (receive buffers: at most)" if k == "ragged-all-to-all" else "")
                               for k, v in c.items()) +
                     (f" ({uncounted} loops of data-dependent length counted once)" if uncounted else ""))
        link = r.get("collective_link_bytes") or {}
        if link:
            lines.append("bytes a device sends, ring model (GiB): " + ", ".join(
                f"{k} {_gib(v)}" for k, v in link.items() if v) + f"; total {_gib(sum(link.values()))}")
        for t in r.get("top_collectives") or []:
            group = f" over {t['group']}" if t.get("group") else ""
            lines.append(f"  {_gib(t['bytes'])} GiB: {t['kind']}{group} {t['shape'][:60]} x {t['executions']}  "
                         f"{_short_op_name(t['op_name'])}")
    return "\n".join(lines)


def table_row(r: dict, command: str) -> str:
    m, o = r["mesh"], r["options"]
    setup = (f"{'fsdp' if o.get('fsdp') else 'replicated'} weights" if r["step"] == "decode" else
             f"{o['remat_policy']}, mb {o['microbatches']}, moments {o['moment_dtype']}")
    return (f"| {r['topology']} | {r['chips']} | {r['devices']} | {m.get('data')},{m.get('expert')},{m.get('tensor')} "
            f"| {r['tokens_per_device']} | {setup} | {_gib(r.get('params_bytes'))} | {_gib(r.get('opt_state_bytes'))} "
            f"| {_gib(r.get('temp_bytes'))} | {_gib(r.get('memory_analysis_bytes'))} "
            f"| {_gib(r.get('peak_bytes') or (r.get('bytes_per_device') if r.get('oom') else None))} / "
            f"{_gib(r['hbm_bytes_per_device'])} "
            f"| {'yes' if r['fits'] else 'no'} | {r.get('compile_s')} | `{command}` |")


TABLE_HEAD = ("| topology | chips | devices | mesh d,e,t | tokens/device "
              "| remat, microbatches, moments (decode: weights) | params GiB | optimizer GiB | temporaries GiB "
              "| sum of allocations GiB | peak / HBM GiB | fits | compile s | command |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def save_results(rows: list[dict], commands: list[str], out_dir: str = RESULTS) -> None:
    """Merge rows into plan.json (keyed by topology, step, mesh, batch, options) and rewrite plan.md."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "plan.json")
    old = []
    if os.path.exists(path):
        with open(path) as fh:
            old = json.load(fh)

    def key(r):
        return json.dumps([r["topology"], r["step"], r["mesh"], r["global_batch"], r["seq_len"], r["options"],
                           r.get("preset")], sort_keys=True)

    merged = {key(r): r for r in old}
    for r, cmd in zip(rows, commands):
        merged[key(r)] = dict(r, command=cmd)
    rows = sorted(merged.values(), key=lambda r: (r.get("preset", ""), r["step"], r["topology"],
                                                  -r["tokens_per_device"]))
    with open(path, "w") as fh:
        json.dump(rows, fh, indent=1)
    with open(os.path.join(out_dir, "plan.md"), "w") as fh:
        fh.write("# Ahead-of-time plans (written by `python -m dsv3_jax plan`)\n\n"
                 "Per-device memory from XLA's TPU compiler on compile-only devices (libtpu); see docs/scaling.md.\n\n")
        for step in ("train", "decode"):
            part = [r for r in rows if r["step"] == step]
            if part:
                fh.write(f"## {step}\n\n| preset |" + TABLE_HEAD[1:].replace("\n|", "\n|---|", 1) + "\n")
                fh.writelines(f"| {r.get('preset', '')} " + table_row(r, r.get("command", "")) + "\n" for r in part)
                fh.write("\n")


def run_plan(args) -> int:
    """The CLI body (see __main__.py for the flags)."""
    topo = parse_topology(args.topology)
    if not libtpu_available():
        raise LibtpuMissing()
    base = run_preset(args.preset)
    if args.step == "decode":
        from .serving import run_decode_plan
        return run_decode_plan(args, base, topo)
    user = list(args.overrides)
    if args.mesh:
        user += args.mesh
    devices = topo.devices()
    print(f"topology {topo.describe()}", flush=True)
    setups = ([o for o in search_space(base, topo)] if args.search else
              [[] if args.mesh else recommended(base, topo)])
    rows, commands = [], []
    best = None
    for i, extra in enumerate(setups):
        rc = base.override(extra + user)
        if args.search and best is not None and _tokens(rc, topo) < best["tokens_per_device"]:
            break                                      # ordered by tokens: nothing later can beat it
        try:
            row = plan_one(rc, topo, devices=devices)
        except InputError as e:
            if not args.search:                        # the one setup asked for: its problem is the answer
                raise
            print(f"skip {extra}: {e}", flush=True)
            continue
        row["preset"] = args.preset
        cmd = _command(args, extra + user)
        rows.append(row)
        commands.append(cmd)
        if not args.json or args.search:
            print(format_report(row), flush=True)
        if row["fits"] and (best is None or row["tokens_per_device"] > best["tokens_per_device"]):
            best = row
    if not args.no_save and rows:
        save_results(rows, commands)
    if args.search:
        print(TABLE_HEAD)
        for r, c in zip(rows, commands):
            print(table_row(r, c))
    if not rows:
        raise InputError(f"none of the {len(setups)} setups searched is valid on {args.topology} (each skip above "
                         "says why)")
    final = best if args.search and best is not None else rows[-1]
    if args.json:
        print(json.dumps(_json_summary(final)))
    return 0


def _tokens(rc: RunConfig, topo: Topology) -> int:
    return rc.train.global_batch_size * rc.train.seq_len // topo.num_devices


def _json_summary(r: dict) -> dict:
    keys = ("preset", "step", "topology", "libtpu_topology", "chips", "devices", "mesh", "tokens_per_device", "global_batch",
            "seq_len", "options", "bytes_per_device", "hbm_bytes_per_device", "fits", "flops_per_device",
            "xla_flops_per_device", "seconds_at_peak", "compile_s", "lower_s", "params_bytes", "opt_state_bytes",
            "batch_bytes", "other_state_bytes",
            "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "peak_bytes", "memory_analysis_bytes",
            "host_temp_bytes", "collective_bytes", "collective_link_bytes", "collective_loops_uncounted",
            "top_collectives", "oom", "error")
    return {k: r.get(k) for k in keys if k in r}


def _command(args, overrides: list[str]) -> str:
    """The command that plans the row again. The overrides apply in order, so each key is written once with
    the value that applied, where it first appeared: rerunning a row's command adds the recommended setup
    in front of the same options, which would otherwise be written twice."""
    applied: dict[str, str] = {}
    for o in overrides:
        applied[o.partition("=")[0]] = o
    parts = ["python -m dsv3_jax plan", f"--preset {args.preset}", f"--topology {args.topology}"]
    return " ".join(parts + list(applied.values()))
