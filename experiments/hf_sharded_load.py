"""Sharded import with 2 processes x 4 host devices: bytes each process reads and its peak RSS, against one
process loading the whole checkpoint (`load_checkpoint(path)` without a mesh), and a bitwise check of every
shard against that whole load.

    PYTHONPATH=$PWD python experiments/hf_sharded_load.py [--experts 32] [--out experiments/results]

Writes a random checkpoint of a few hundred MB (fp32; most of it routed experts, as in V3) to a scratch
directory, then for each layout starts 2 processes (jax.distributed on localhost, 4 CPU devices each):
  * `expert8`: mesh data=1, expert=8, tensor=1. The process boundary cuts the expert axis: process 0 holds
    experts [0, E/2), process 1 the rest; attention, dense MLP, embedding and head are replicated, so each
    process reads those whole.
  * `zero3`:   mesh data=8, zero3. Every weight with an `embed` axis is split 8 ways over `data`, 4 shards
    per process; only norms, routers and biases are replicated.
Each process reports bytes read (the reader's own count of tensor bytes, and /proc/self/io rchar), RSS before
the load and peak RSS (ru_maxrss), and a sha256 per addressable shard; the parent compares those hashes with
the same regions of the one-process load. Results: experiments/results/hf_sharded_load.{md,json}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from results_io import write_results  # noqa: E402

WORKER_ENV = "DSV3_SHARDED_LOAD_WORKER"


def config(experts: int):
    from dsv3_jax.config import ModelConfig
    return ModelConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, first_k_dense_replace=1, n_routed_experts=experts, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, rope_scaling=None, max_position_embeddings=512,
        num_nextn_predict_layers=1)


def write_checkpoint(path: str, experts: int) -> None:
    from flax import traverse_util
    from dsv3_jax.hf import save_checkpoint
    from dsv3_jax.hf_layout import template
    cfg = config(experts)
    rng = np.random.default_rng(0)
    flat = {k: rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in template(cfg).items()}
    save_checkpoint(path, cfg, traverse_util.unflatten_dict(flat), shard_size_bytes=64 << 20)


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar")).split()[1])


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS")).split()[1]) / 1024


def worker() -> None:
    """One process of the sharded load (or, with DSV3_LAYOUT=whole, the one-process load)."""
    import jax
    layout, path = os.environ["DSV3_LAYOUT"], os.environ["DSV3_CKPT"]
    if layout != "whole":
        jax.distributed.initialize(os.environ["DSV3_COORD"], num_processes=2,
                                   process_id=int(os.environ["DSV3_PID"]))
    from flax import traverse_util
    from dsv3_jax import safetensors_io
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.hf import load_checkpoint
    from dsv3_jax.sharding import make_mesh

    read = []
    close = safetensors_io.SafetensorsFile.close

    def counting_close(self):
        read.append(self.bytes_read)
        close(self)
    safetensors_io.SafetensorsFile.close = counting_close
    mesh = None
    if layout == "expert8":
        mesh = make_mesh(MeshConfig(data=1, expert=8, tensor=1))
    elif layout == "zero3":
        mesh = make_mesh(MeshConfig(data=8, expert=1, tensor=1, zero3=True))
    rss0, rchar0, t0 = _rss_mb(), _rchar(), time.perf_counter()
    _, variables = load_checkpoint(path, mesh=mesh, zero3=layout == "zero3")
    seconds = time.perf_counter() - t0
    rchar = _rchar() - rchar0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    held = hashes = device_bytes = None
    if mesh is not None:
        held, hashes, device_bytes = 0, {}, 0
        for k, x in traverse_util.flatten_dict(variables).items():
            seen = set()
            for s in x.addressable_shards:
                device_bytes += s.data.nbytes
                region = tuple((sl.start or 0, sl.stop if sl.stop is not None else n)
                               for sl, n in zip(s.index, x.shape))
                if region in seen:
                    continue
                seen.add(region)
                a = np.asarray(s.data)
                held += a.nbytes
                hashes.setdefault("/".join(k), []).append([region, hashlib.sha256(a.tobytes()).hexdigest()])
    print("RESULT " + json.dumps({"layout": layout, "process": jax.process_index(), "bytes_read": sum(read),
                                  "rchar": rchar, "rss_before_mb": rss0, "peak_rss_mb": peak, "load_s": seconds,
                                  "held_bytes": held, "device_bytes": device_bytes,
                                  "hashes": hashes}), flush=True)
    if layout != "whole":
        jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(layout: str, path: str) -> list[dict]:
    env = dict(os.environ, **{WORKER_ENV: "1", "DSV3_LAYOUT": layout, "DSV3_CKPT": path, "JAX_PLATFORMS": "cpu"})
    n = 1 if layout == "whole" else 2
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 if n == 1 else 4}"
    env["DSV3_COORD"] = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, __file__], env=dict(env, DSV3_PID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"{layout} worker failed:\n{stderr[-3000:]}")
        out.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--scratch", default=None)
    args = ap.parse_args()
    from flax import traverse_util
    from dsv3_jax.hf import load_checkpoint
    from dsv3_jax.hf_layout import layout as name_map

    scratch = args.scratch or tempfile.mkdtemp(prefix="hf_sharded_load_")
    path = os.path.join(scratch, "ckpt")
    if not os.path.exists(os.path.join(path, "config.json")):
        write_checkpoint(path, args.experts)
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    total = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    largest = max(int(np.prod(e.hf_shape)) * 4 for e in name_map(config(args.experts)).values())

    results = {"checkpoint_bytes": total, "files": len(files), "largest_tensor_bytes": largest,
               "experts": args.experts, "runs": {}}
    for layout in ("whole", "expert8", "zero3"):
        results["runs"][layout] = run_layout(layout, path)

    # Every shard equals the same region of the one-process (unsharded) load, bitwise.
    _, whole = load_checkpoint(path)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(whole).items()}
    checked = 0
    for layout in ("expert8", "zero3"):
        for r in results["runs"][layout]:
            for name, shards in r.pop("hashes").items():
                for region, digest in shards:
                    a = np.ascontiguousarray(flat[name][tuple(slice(a, b) for a, b in region)])
                    assert hashlib.sha256(a.tobytes()).hexdigest() == digest, (layout, name, region)
                    checked += 1
    results["runs"]["whole"][0].pop("hashes")
    results["shards_checked_bitwise"] = checked

    mb = 1 / 2 ** 20
    lines = ["# Sharded import, 2 processes x 4 CPU devices (experiments/hf_sharded_load.py)", "",
             f"Checkpoint: {total * mb:.0f} MiB fp32 in {len(files)} files ({args.experts} experts per MoE layer, "
             f"largest tensor {largest * mb:.0f} MiB). Every shard of both sharded layouts equals the one-process "
             f"load bitwise ({checked} shards checked).", "",
             "| layout | process | bytes read (MiB) | share of checkpoint | rchar (MiB) | held (MiB) | on its devices (MiB) "
             "| RSS before (MiB) | peak RSS (MiB) | peak - before - on devices (MiB) | load s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layout, runs in results["runs"].items():
        for r in runs:
            held = "-" if r["held_bytes"] is None else f"{r['held_bytes'] * mb:.0f}"
            dev = r["device_bytes"] if r["device_bytes"] is not None else r["bytes_read"]
            lines.append(f"| {layout} | {r['process']} | {r['bytes_read'] * mb:.0f} | {r['bytes_read'] / total:.2f} | "
                         f"{r['rchar'] * mb:.0f} | {held} | {dev * mb:.0f} | {r['rss_before_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_mb'] - dev * mb:.0f} | "
                         f"{r['load_s']:.1f} |")
    lines += ["", "whole: one process, no mesh (numpy arrays). expert8: mesh data=1,expert=8 (the process boundary "
              "cuts the expert axis; non-expert weights replicated, read by both). zero3: mesh data=8 with zero3 "
              "(every `embed` axis split 8 ways). held: bytes of the distinct shards the process holds afterwards; "
              "on its devices: the same counting every local device's copy (a CPU device's buffers are host memory, "
              "so a leaf replicated over 4 local devices is there 4 times; for `whole`, the numpy arrays). "
              "peak - before - on devices: what the load needed beyond the arrays it returns (for `whole`, most "
              "likely the file pages safe_open maps while it reads; for the sharded loads, one region being "
              "assembled plus allocator slack). rchar 0 for `whole`: safe_open reads through mmap. The MTP copies "
              "of embed_tokens and lm_head are not read by the sharded load."]
    write_results(args.out, "hf_sharded_load", lines, results)


if __name__ == "__main__":
    if os.environ.get(WORKER_ENV):
        worker()
    else:
        main()
