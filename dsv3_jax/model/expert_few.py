"""Routed experts for a handful of tokens (a decode step, a speculative verify step): small row blocks of
the experts the tokens chose, not a loop over all E.

The training kernel (expert_kernels.blocked_local) loops over every expert with row blocks sized for
thousands of pairs (at least 8 rows); for a few tokens that loop is most of the cost. `few_local` instead
cuts each chosen expert's pairs into blocks of R rows (R = `rows_per_block`: 4, or 8 once there are 4+
pairs per expert on average) and runs only those blocks:
1. Stable sort of the P = N*K pairs by expert; a pair's rank within its expert gives its block and slot.
2. A block table [B, R] of pair ids (empty slots point at a zero row), each block tagged with its expert.
   B = min(P, ceil(P / R) + min(P, E)) is a static bound on the blocks there can be.
3. A loop over the blocks: R token rows gathered, the expert's two matmuls on its weights read in place,
   the rows scaled by their gate weights and added into the output rows.
The loop has a static trip count (lax.fori_loop lowers to scan, so reverse-mode autodiff works); blocks
past the number used skip their work with lax.cond. Measured against the other candidates in
experiments/results/bench_moe_few.md; dispatch.py decides when this path runs.
Axis letters: see layers.py (P = token-expert pairs, N*K of them; R = rows per block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .expert_kernels import _glu, sort_by_expert


def rows_per_block(num_pairs: int, num_experts: int) -> int:
    """R: 4 rows, 8 once the pairs average 4 or more per expert (experiments/results/bench_moe_few.md)."""
    return 8 if num_pairs >= 4 * num_experts else 4


def block_table(idx: jax.Array, num_experts: int, rows: int):
    """idx [N,K] -> (table [B,R] pair ids, P marking an empty slot; expert [B] of each block; count: blocks
    in use, the first `count` rows of the table)."""
    p = idx.size
    order, _, sizes = sort_by_expert(idx, num_experts)                            # [P] by expert, [E]
    sorted_expert = idx.reshape(-1)[order]
    rank = jnp.arange(p, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_expert]
    blocks = (sizes + rows - 1) // rows                                           # [E] blocks per expert
    block = (jnp.cumsum(blocks) - blocks)[sorted_expert] + rank // rows           # [P] each pair's block
    bound = min(p, -(-p // rows) + min(p, num_experts))
    table = jnp.full((bound, rows), p, jnp.int32).at[block, rank % rows].set(order)
    expert = jnp.zeros((bound,), jnp.int32).at[block].set(sorted_expert)
    return table, expert, blocks.sum()


def few_local(x: jax.Array, idx: jax.Array, w: jax.Array, w1: jax.Array, w2: jax.Array,
              rows: int | None = None) -> jax.Array:
    """x [N,D], idx/w [N,K], w1 [E,D,2F] (gate | up), w2 [E,F,D], already cast -> [N,D]:
    `sum_k w[n,k] * Expert_{idx[n,k]}(x[n])`, one pass per block of R pairs of one expert.
    rows: R, default rows_per_block (the benchmark tries others)."""
    n, k = idx.shape
    e, d, f2 = w1.shape
    f = f2 // 2
    table, expert, count = block_table(idx, e, rows or rows_per_block(idx.size, e))
    token = jnp.where(table < idx.size, table // k, n)                            # [B, R]; n: the zero row
    gate = jnp.concatenate([w.reshape(-1).astype(x.dtype), jnp.zeros((1,), x.dtype)])[table]       # [B, R]
    xz = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])                         # [N+1, D]

    def run(b, y):
        a1 = lax.dynamic_index_in_dim(w1, expert[b], keepdims=False)              # [D, 2F]
        a2 = lax.dynamic_index_in_dim(w2, expert[b], keepdims=False)              # [F, D]
        h = xz[token[b]] @ a1                                                     # [R, 2F]
        return y.at[token[b]].add((_glu(h, f) @ a2) * gate[b][:, None])

    y = lax.fori_loop(0, table.shape[0], lambda b, y: lax.cond(b < count, run, lambda b, y: y, b, y),
                      jnp.zeros((n + 1, w2.shape[2]), x.dtype))
    return y[:n]
