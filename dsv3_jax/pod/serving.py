"""`plan --step decode`: the serving plan of a model with the latent KV cache. Compiles one decode step (one
new token per sequence over `context` cached positions, `infer.decode_step`) for a slice, under the rules
`generate --mesh ... --layout` traces with: bf16 weights with experts over the expert axis and every other
weight sharded over all devices (layout fsdp, the default here) or replicated (layout replicated), the bf16
cache sharded by sequence; reports its memory like the train plan, and walks up the slices of the
generation from the smallest the bytes allow to the first that fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import MeshConfig, RunConfig
from ..errors import InputError
from ..model import Transformer
from ..sharding import make_mesh, shardings_of
from .compile import compile_report, shard_bytes
from .topology import GIB, Topology, parse_topology

SERVING_OPTIONS = dict(dtype="bfloat16", param_dtype="bfloat16", moe_impl="expert_parallel")
DEFAULT_BATCH = 128
DEFAULT_CONTEXT = 32768


def serving_config(rc: RunConfig, num_devices: int, layout: str = "fsdp") -> RunConfig:
    """bf16 weights, expert parallelism over every device (the batch too), the rest in `layout` (fsdp:
    split over every device; replicated)."""
    model = dataclasses.replace(rc.model, **SERVING_OPTIONS)
    expert = math.gcd(num_devices, model.n_routed_experts)
    fsdp = layout == "fsdp"
    return dataclasses.replace(rc, model=model, mesh=MeshConfig(data=num_devices // expert, expert=expert,
                                                                tensor=1, zero3=fsdp, fsdp=fsdp))


def compile_decode_step(rc: RunConfig, devices: list, hbm_bytes: Optional[int], batch: int = DEFAULT_BATCH,
                        context: int = 32768) -> dict:
    from ..infer import decode_step, init_cache
    from ..infer.cli import _on_mesh, generation_rules
    cfg = rc.model
    mesh = make_mesh(rc.mesh, devices)
    rules = generation_rules(mesh, batch, serving_layout(rc))     # what `generate --mesh` loads and traces with
    model = Transformer(cfg)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.PRNGKey(0))
    shardings = shardings_of(boxed, mesh, rules)
    abstract = nn.unbox(boxed)
    variables = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    rows = NamedSharding(mesh, P(("data", "expert")))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype=jnp.bfloat16, mtp=False))
    cache_sh = jax.tree.map(lambda a: NamedSharding(mesh, P(None, ("data", "expert"))), cache)
    cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), cache, cache_sh)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
    positions = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows)
    split = {"params": shard_bytes(abstract["params"], shardings["params"]), "cache": shard_bytes(cache, cache_sh),
             "batch": 2 * shard_bytes(tokens, rows)}

    def step(variables, cache, tokens, positions):
        return decode_step(cfg, variables["params"], variables["router_state"], cache, tokens, positions)

    with _on_mesh(mesh, rules):
        jitted = jax.jit(step, donate_argnums=1, in_shardings=(shardings, cache_sh, rows, rows),
                         out_shardings=(None, None, cache_sh))
        report = compile_report(jitted, (variables, cache, tokens, positions), split, hbm_bytes)
    report.update(mesh=dict(mesh.shape), batch=batch, context=context,
                  tokens_per_device=batch * context // len(devices))
    return report


def serving_layout(rc: RunConfig) -> str:
    return "fsdp" if rc.mesh.zero3 and rc.mesh.fsdp else "replicated"


def total_bytes(rc: RunConfig, batch: int, context: int) -> int:
    """Serving weights plus the cache, whole (the floor any slice must hold)."""
    from ..infer import init_cache
    cfg = dataclasses.replace(rc.model, **SERVING_OPTIONS)
    shapes = jax.eval_shape(lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.PRNGKey(0))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype=jnp.bfloat16, mtp=False))
    return int(sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves((nn.unbox(shapes), cache))))


def run_decode_plan(args, base: RunConfig, topo: Topology) -> int:
    """Plan `--topology`, then walk up the slices of its generation, from the smallest whose HBM holds the
    weights and the cache, to the first that fits."""
    from .plan import format_report, plan_one, save_results, _json_summary
    base = base.override(list(args.overrides))
    batch = DEFAULT_BATCH if args.batch is None else args.batch
    context = min(DEFAULT_CONTEXT, base.model.max_position_embeddings) if args.context is None else args.context
    if batch < 1:
        raise InputError(f"--batch {batch}: serve at least one sequence")
    if not 1 <= context <= base.model.max_position_embeddings:
        raise InputError(f"--context {context}: cached positions run from 1 to the model's max_position_embeddings "
                         f"= {base.model.max_position_embeddings}")
    if batch % topo.num_devices:
        given = "--batch" if args.batch is not None else "the default --batch"
        raise InputError(f"{given} {batch} does not split over the {topo.num_devices} devices of "
                         f"{topo.accelerator_type}: give --batch a multiple of {topo.num_devices}")
    layout = getattr(args, "layout", "fsdp")
    flag = "" if layout == "fsdp" else f" --layout {layout}"
    per = topo.gen.cores_per_chip if topo.generation in ("v4", "v5p", "tpu7x") else 1
    floor = total_bytes(base, batch, context) / (topo.gen.hbm_bytes * topo.gen.devices_per_chip)
    candidates = [topo] + [parse_topology(f"{topo.generation}-{c * per}")
                           for c in (2 ** i for i in range(2, 14)) if c >= floor and c != topo.chips]
    rows, commands, smallest = [], [], None
    for t in candidates:
        if smallest is not None and t.chips >= smallest["chips"]:
            break
        if batch % t.num_devices:
            print(f"{t.accelerator_type}: batch {batch} does not split over {t.num_devices} devices; skipped")
            continue
        row = plan_one(serving_config(base, t.num_devices, layout), t, step="decode", batch=batch, context=context)
        row.update(preset=args.preset)
        print(format_report(row), flush=True)
        rows.append(row)
        commands.append(f"python -m dsv3_jax plan --preset {args.preset} --topology {t.accelerator_type} "
                        f"--step decode --batch {batch} --context {context}{flag}")
        if row["fits"] and (smallest is None or t.chips < smallest["chips"]):
            smallest = row
    if not args.no_save and rows:
        save_results(rows, commands)
    if smallest:
        print(f"smallest {topo.generation} slice that serves batch {batch} at context {context} with {layout} "
              f"weights: {smallest['topology']} ({smallest['chips']} chips), "
              f"{smallest['bytes_per_device'] / GIB:.1f} GiB per device (generate --mesh ... --layout {layout})")
    if args.json:
        print(json.dumps(dict(_json_summary(rows[0]), batch=batch, context=context,
                              cache_bytes_per_device=rows[0].get("cache_bytes"), layout=layout,
                              smallest_fitting=(smallest or {}).get("topology"),
                              smallest_fitting_chips=(smallest or {}).get("chips"))))
    return 0
