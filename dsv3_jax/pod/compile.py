"""Compile the real train step (the function and shardings `train` runs) or a decode step for a set of
devices, and read what the compiler says: memory per device (arguments split into params, optimizer state and
batch; temporaries, output, aliased), FLOPs, and the bytes each collective kind moves, from the compiled HLO.

A RESOURCE_EXHAUSTED from the compiler is a result (fits false, with the figure it reported), not an error.
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp

from ..config import RunConfig
from ..model import Transformer
from ..sharding import activate_for, batch_sharding, make_mesh, validate_for_mesh
from ..train.optimizer import make_optimizer
from ..train.state import state_shardings
from ..train.step import make_train_step
from .hlo import collective_report

TOP_COLLECTIVES = 6          # the largest collective instructions the report lists (bytes x executions)


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a pytree of abstract arrays under these shardings (the largest shard)."""
    total = 0
    for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = s.shard_shape(a.shape) if hasattr(s, "shard_shape") else a.shape
        total += math.prod(shape) * jnp.dtype(a.dtype).itemsize
    return int(total)

def _oom_figures(message: str) -> dict:
    """The sizes a RESOURCE_EXHAUSTED message names (`Used 120.5G of 95.74G hbm`), in bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    m = (re.search(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", message) or
         re.search(r"required for [\w ]+\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", message))
    if not m:
        return {}
    return {"oom_used_bytes": int(float(m.group(1)) * units[m.group(2)]),
            "oom_limit_bytes": int(float(m.group(3)) * units[m.group(4)])}


def compile_report(jitted, args: tuple, split: dict, hbm_bytes: Optional[int]) -> dict:
    """Lower and compile `jitted(*args)` (abstract args); -> memory, FLOPs, collectives, timings, fits."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    print(f"lowered in {t1 - t0:.1f} s; compiling for {len(jax.tree.leaves(args)[0].sharding.device_set)} "
          f"devices...", file=sys.stderr, flush=True)
    report: dict = {"lower_s": round(t1 - t0, 2), **{f"{k}_bytes": int(v) for k, v in split.items()}}
    try:
        compiled = lowered.compile()
    except Exception as e:       # the compiler's OOM is an answer: it does not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(compile_s=round(time.perf_counter() - t1, 2), fits=False, oom=True,
                      error=_first_lines(str(e)), **_oom_figures(str(e)))
        report["bytes_per_device"] = report.get("oom_used_bytes")
        return report
    report["compile_s"] = round(time.perf_counter() - t1, 2)
    mem = compiled.memory_analysis()
    report.update(argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                  alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                  code_bytes=int(mem.generated_code_size_in_bytes),
                  host_temp_bytes=int(getattr(mem, "host_temp_size_in_bytes", 0) or 0))
    # Two totals. memory_analysis' sum adds every allocation, temporaries of every memory space included; the
    # peak is the HBM heap the buffer assignment lays out (arguments, outputs and temporaries at the offsets
    # the heap simulator gave them, fragmentation included: the `Total bytes` of XLA's memory-usage report),
    # the figure the TPU compiler checks against the HBM when it raises RESOURCE_EXHAUSTED. `fits` and
    # bytes_per_device use the peak where the backend gives it (docs/scaling.md compares the two).
    report["memory_analysis_bytes"] = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                       + report["temp_bytes"] + report["code_bytes"])
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0)
    report["peak_bytes"] = peak + report["code_bytes"] if peak else None
    report["bytes_per_device"] = report["peak_bytes"] or report["memory_analysis_bytes"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    report["flops_per_device"] = float(cost.get("flops", 0.0)) if cost else None
    (report["collective_bytes"], report["collective_loops_uncounted"],
     report["top_collectives"], report["collective_link_bytes"]) = collective_report(compiled.as_text(),
                                                                                   top=TOP_COLLECTIVES)
    report["fits"] = hbm_bytes is None or report["bytes_per_device"] <= hbm_bytes
    report["oom"] = False
    return report


def _first_lines(text: str, n: int = 3) -> str:
    return " | ".join(l.strip() for l in text.strip().splitlines()[:n])[:600]


def compile_train_step(rc: RunConfig, devices: list, hbm_bytes: Optional[int] = None) -> dict:
    """The train step exactly as `train` jits it (state shardings, batch sharding, donation), for `devices`."""
    mc, tc = rc.model, rc.train
    mesh = make_mesh(rc.mesh, devices)
    validate_for_mesh(mc, mesh, tc.global_batch_size, tc.microbatches)
    model, optimizer = Transformer(mc), make_optimizer(tc)
    abstract, shardings = state_shardings(model, rc, mesh, optimizer)
    with activate_for(mesh, rc.mesh):
        bs = batch_sharding(mesh)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        batch = jax.ShapeDtypeStruct((tc.global_batch_size, tc.seq_len + 1), jnp.int32, sharding=bs)
        split = {"params": shard_bytes(abstract.params, shardings.params),
                 "opt_state": shard_bytes(abstract.opt_state, shardings.opt_state),
                 "batch": shard_bytes(batch, bs)}
        split["other_state"] = shard_bytes(abstract, shardings) - split["params"] - split["opt_state"]
        jitted = jax.jit(make_train_step(model, rc, optimizer), donate_argnums=0,
                         in_shardings=(shardings, bs), out_shardings=(shardings, None))
        report = compile_report(jitted, (state, batch), split, hbm_bytes)
    report["mesh"] = dict(mesh.shape)
    report["tokens_per_device"] = tc.global_batch_size * tc.seq_len // len(devices)
    return report
