"""Dropless routed-expert computation behind one interface, chosen by `ModelConfig.moe_impl`.

Every implementation computes, for each token n, `sum_k w[n,k] * Expert_{idx[n,k]}(x[n])` with no token
dropped, and is checked against the same per-token reference in tests/test_moe_dispatch.py.
  dense            every expert on every token, then a weighted combine (O(E) work; the simple reference);
                   on a mesh, XLA's automatic partitioning
  blocked          the CPU kernel (expert_kernels.py); on a mesh, per shard inside shard_map, tokens
                   all-gathered over `expert` (expert_parallel.py)
  ragged           grouped GEMMs with jax.lax.ragged_dot, the GPU/TPU kernel; on a mesh, the
                   expert-parallel form with that kernel
  gathered         blocks of one expert's rows as batched matmuls with the blocks' weights gathered
                   (expert_kernels.py); on a mesh, the expert-parallel form with that kernel
  expert_parallel  the expert-parallel form (shard_map + all_to_all over `expert`, expert_parallel.py)
                   with the blocked kernel; without a mesh, the local blocked kernel
  auto (default)   resolved at trace time (resolve_impl) from the platform of the mesh's devices (the
                   default backend without a mesh) and the ambient mesh:
                     GPU/TPU: ragged (so on a mesh whose expert axis is above 1, the expert-parallel form
                              with ragged_dot, moving rows with ragged_all_to_all);
                     CPU:     expert_parallel on a mesh whose expert axis is above 1, blocked otherwise.
A handful of tokens (`gather_if_few`, the MoE layer's call: decode and speculative verify steps) take a
shortcut first. On CPU without a mesh: `gather` (the chosen experts' weights gathered per pair) for up to
GATHER_TOKENS tokens (batch-1 decode and verify steps, where a loop's fixed cost per iteration outweighs
copying a few experts' weights), else while N*K <= FEW_PAIRS_PER_EXPERT * E: `capacity_local` (expert_few.py:
C row slots per expert, matmuls batched over all E with the weights read in place) when N*K >= E (most
experts chosen) and its E*C rows are at most CAPACITY_ROWS, else `few_local` (small row blocks of the
experts chosen, not a loop over all E). An expert's pairs past C in `capacity_local` take `few_local` blocks.
Elsewhere (GPU/TPU, or a mesh with dense), `gather` while N*K <= E.
Measured: experiments/results/bench_moe_few.md, and for capacity_local experiments/results/spec_cost.md.
This docstring is the one place that rule is written down. Why blocked on CPU and ragged elsewhere:
experiments/results/bench_moe.md (ragged_dot is several times slower than the blocked loops on XLA:CPU). On
TPU ragged_dot is a native kernel; XLA:GPU expands it densely unless its cuDNN ragged-dot fusion takes it, and
the one GPU run so far (experiments/results/gpu.md) gave the train step 1.5% MFU with it: unsettled there.
A mesh is "there" when `jax.set_mesh` (or `dsv3_jax.sharding.activate`) made one ambient with more than
one device; every implementation runs on any (data, expert, tensor) mesh.
Axis letters: see layers.py (P = token-expert pairs, N*K of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..config import ModelConfig
from .expert_few import capacity_local, expert_capacity, few_local
from .expert_kernels import combine, local_experts
from .expert_parallel import EXPERT_AXIS, axis_size, current_mesh, mesh_platform, sharded_experts
from .layers import dtype_of


GATHER_TOKENS = 2             # on CPU, gather for up to this many tokens (experiments/results/bench_moe_few.md)
FEW_PAIRS_PER_EXPERT = 8      # on CPU, few_local while N*K <= this * E (same table)
CAPACITY_ROWS = 160           # on CPU, capacity_local instead while N*K >= E and E * capacity <= this


def resolve_impl(cfg: ModelConfig, mesh=None) -> str:
    """cfg.moe_impl with "auto" replaced by what it means on this mesh and platform (module docstring)."""
    if cfg.moe_impl != "auto":
        return cfg.moe_impl
    if mesh_platform(mesh) != "cpu":
        return "ragged"
    return "expert_parallel" if axis_size(mesh, EXPERT_AXIS) > 1 else "blocked"


def routed_experts(cfg: ModelConfig, x: jax.Array, idx: jax.Array, w: jax.Array, w_gate_up: jax.Array,
                   w_down: jax.Array, *, mesh=None, gather_if_few: bool = False) -> jax.Array:
    """x [N,D], idx/w [N,K], w_gate_up [E,D,2,F], w_down [E,F,D] -> [N,D] in the compute dtype.

    mesh: default the ambient one. gather_if_few: for a handful of tokens (a decode step), read only the
    chosen experts' weights (`few_local` or `gather`, module docstring) whatever the implementation."""
    mesh = mesh if mesh is not None else current_mesh()
    on_mesh = mesh is not None and mesh.size > 1
    impl = resolve_impl(cfg, mesh)
    e = w_gate_up.shape[0]
    if gather_if_few and not on_mesh and mesh_platform(mesh) == "cpu":
        if idx.shape[0] <= GATHER_TOKENS:
            return gather(cfg, x, idx, w, w_gate_up, w_down)
        if idx.size <= FEW_PAIRS_PER_EXPERT * e:
            dt = dtype_of(cfg.dtype)
            w1 = w_gate_up.reshape(e, w_gate_up.shape[1], -1).astype(dt)                # [E, D, 2F]
            w2 = w_down.astype(dt)
            if idx.size >= e and e * expert_capacity(idx.size, e) <= CAPACITY_ROWS:
                return capacity_local(x.astype(dt), idx, w, w1, w2)
            return few_local(x.astype(dt), idx, w, w1, w2)
    elif gather_if_few and idx.size <= e and (not on_mesh or impl == "dense"):
        return gather(cfg, x, idx, w, w_gate_up, w_down)
    if impl == "dense":
        return dense(cfg, x, idx, w, w_gate_up, w_down)
    kernel = impl if impl in ("ragged", "gathered") else "blocked"
    if not on_mesh:
        return local_experts(cfg, kernel, x, idx, w, w_gate_up, w_down)
    exchange = "all_gather" if impl == "blocked" else "all_to_all"
    return sharded_experts(cfg, x, idx, w, w_gate_up, w_down, mesh=mesh, kernel=kernel, exchange=exchange)


def gather(cfg, x, idx, w, w_gate_up, w_down):
    """For a handful of tokens (N*K <= E, e.g. one decode step; see routed_experts): gather the chosen experts'
    weights per token-expert pair, so a step reads K experts per token instead of all E. Pairs are flattened
    first: one gather of [P, D, 2F] and 2-D-per-pair matmuls, which ran faster on CPU than gathering
    [N, K, D, 2, F] and contracting with the token axis kept (experiments/bench_decode.py)."""
    dt = dtype_of(cfg.dtype)
    e, d, _, f = w_gate_up.shape
    k = idx.shape[1]
    pairs = idx.reshape(-1)                                                       # [P]
    h = jnp.einsum("PD,PDF->PF", jnp.repeat(x.astype(dt), k, axis=0),
                   w_gate_up.reshape(e, d, 2 * f)[pairs].astype(dt))              # [P, 2F]
    y = jnp.einsum("PF,PFD->PD", nn.silu(h[:, :f]) * h[:, f:], w_down[pairs].astype(dt))
    return combine(y, jnp.arange(pairs.shape[0]), w)


def dense(cfg, x, idx, w, w_gate_up, w_down):
    """Every expert on every token, then the weighted combine."""
    dt = dtype_of(cfg.dtype)
    h = jnp.einsum("ND,EDGF->ENGF", x.astype(dt), w_gate_up.astype(dt))
    a = nn.silu(h[:, :, 0]) * h[:, :, 1]                                         # [E,N,F]
    y = jnp.einsum("ENF,EFD->END", a, w_down.astype(dt))                          # [E,N,D]
    gate = (jax.nn.one_hot(idx, w_down.shape[0], dtype=jnp.float32) * w[..., None]).sum(1)      # [N,E]
    return jnp.einsum("END,NE->ND", y, gate.astype(dt))
