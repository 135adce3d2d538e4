"""Meshes over (data, expert, tensor) and the ONE table mapping logical axis names to mesh axes.

Model code only names logical axes (`embed`, `heads`, `expert`...); this file decides where they live.
Expert-parallel ranks also take different data (batch -> data x expert), as in DeepSeek's training.
"""

from __future__ import annotations

from typing import Any, Optional

import contextlib

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import MeshConfig, ModelConfig
from .errors import InputError

MESH_AXES = ("data", "expert", "tensor")
FSDP_AXES = ("embed", "q_lora", "kv_lora")     # the axes FSDP shards (layers.param reads them as `*_read`)


def logical_rules(zero3: bool = False, fsdp: bool = False, staged_gather: bool = True) -> tuple:
    """Logical axis -> mesh axes. Anything not listed is replicated.

    fsdp (with zero3): a parameter's `embed` axis goes over every mesh axis its other axes leave free: (data,
    expert, tensor) for a weight with no tensor-sharded axis, (data, expert) when `heads`/`mlp`/`vocab` take
    tensor, data alone for expert weights (whose `expert` axis takes expert). Flax applies the rules in order
    and skips one whose mesh axes the leaf already uses, so the tensor rules come first and every large
    parameter and moment is split over every device. Activations never use these names (theirs is
    `act_embed`).

    staged_gather (with zero3 and fsdp): where a parameter is read (`layers.param` names its axes `*_read`)
    it is first gathered down to a `data` shard, then in full. XLA:TPU emits one gather over every device as
    an all-reduce of zero-padded shards, twice an all-gather's traffic; gathers over part of the mesh stay
    all-gathers (experiments/results/pod_memory.md, "Weight gathers in two stages")."""
    everywhere, free_of_tensor = ("data", "expert", "tensor"), ("data", "expert")
    # MLA's up-projections (q_b_proj, kv_b_proj) have no `embed` axis: their low-rank input axis takes it
    fsdp_rule = tuple((name, axes) for axes in (everywhere, free_of_tensor)
                      for name in FSDP_AXES) if zero3 and fsdp else ()
    param_rules = (*fsdp_rule, ("embed", "data" if zero3 else None), ("q_lora", None), ("kv_lora", None))
    if zero3 and fsdp and staged_gather:
        read_rules = tuple((f"{name}_read", "data") for name in FSDP_AXES)
    else:       # read as stored: the constraint is the parameter's own sharding
        read_rules = tuple((f"{name}_read", axes) for name, axes in param_rules)
    return (
        ("batch", ("data", "expert")),
        ("expert", "expert"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        *param_rules,
        ("act_embed", None),      # activations' hidden axis: never sharded (batch already uses data)
        ("length", None),
        ("layers", None),
        ("head_dim", None),
        *read_rules,
    )


def mesh_shape(mc: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [mc.data, mc.expert, mc.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise InputError(f"mesh {sizes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise InputError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise InputError(f"mesh {dict(zip(MESH_AXES, sizes))} needs a multiple of {known} devices, "
                             f"but there are {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise InputError(f"mesh {dict(zip(MESH_AXES, sizes))} has {int(np.prod(sizes))} devices, "
                         f"but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(mc: MeshConfig = MeshConfig(), devices: Optional[list] = None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = mesh_shape(mc, len(devices))
    # Auto axes: XLA propagates shardings from the logical constraints; model code names no mesh axis.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def validate_for_mesh(cfg: ModelConfig, mesh: jax.sharding.Mesh, global_batch_size: Optional[int] = None,
                      microbatches: int = 1):
    """The combinations a mesh makes impossible, each named with its fix. A microbatch with fewer rows than
    batch shards is refused too: it would run, with most devices computing copies of other devices' rows
    (a 5-layer v3-671b step on v5p-512 with 128-row microbatches all-reduced 11.6 TiB per device)."""
    ax = dict(mesh.shape)
    if cfg.num_attention_heads % ax["tensor"]:
        raise InputError(f"ModelConfig.num_attention_heads={cfg.num_attention_heads} is not divisible by the "
                         f"tensor axis ({ax['tensor']}); change mesh.tensor or the number of heads")
    if cfg.n_routed_experts % ax["expert"]:
        raise InputError(f"ModelConfig.n_routed_experts={cfg.n_routed_experts} is not divisible by the expert "
                         f"axis ({ax['expert']}); change mesh.expert or n_routed_experts")
    for name, width in (("moe_intermediate_size", cfg.moe_intermediate_size),
                        ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size)):
        if width and width % ax["tensor"]:
            raise InputError(f"ModelConfig.{name}={width} is not divisible by the tensor axis ({ax['tensor']})")
    shards = ax["data"] * ax["expert"]
    if global_batch_size is not None and global_batch_size % shards:
        raise InputError(f"train.global_batch_size={global_batch_size} is not divisible by data x expert = "
                         f"{shards}; use a multiple of {shards}")
    if global_batch_size is not None and (global_batch_size // microbatches) % shards:
        raise InputError(f"train.global_batch_size={global_batch_size} in train.microbatches={microbatches} gives "
                         f"{global_batch_size // microbatches} rows per microbatch, not divisible by data x expert = "
                         f"{shards}; use a global batch of a multiple of {shards * microbatches} or fewer "
                         f"microbatches")


def shardings_of(abstract_tree: Any, mesh, rules) -> Any:
    """NamedShardings for a pytree whose leaves carry logical names (nn.Partitioned boxes)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(("data", "expert")))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh, zero3: bool = False, fsdp: bool = False, staged_gather: bool = True):
    """Make `mesh` and the logical rules ambient, for tracing and running model code under jit."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(zero3, fsdp, staged_gather)):
        yield mesh


def activate_for(mesh, mc: MeshConfig):
    """`activate` with a run's mesh options (zero3, fsdp, staged_gather)."""
    return activate(mesh, mc.zero3, mc.fsdp, mc.staged_gather)
