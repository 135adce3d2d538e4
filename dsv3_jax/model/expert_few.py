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

`capacity_local` is the form for a few tokens that choose most of the experts (a decode step of a batch,
a speculative verify step): C row slots per expert and two matmuls batched over all E experts. Its point is
the weights: `few_local` indexes one expert's weights per block, and XLA:CPU copies that slice out of the
[E, ...] array before the matmul (a profile of the batch-8 decode step: those copies cost about 3x the
matmuls that read them); the batched matmuls read every expert's weights in place, and the empty slots'
arithmetic costs less than the copies once most experts are chosen (experiments/results/spec_cost.md).
An expert with more than C pairs on a step (trained routers do it often) keeps C of them in its slots and
sends the rest through `few_local`'s blocks (`skip`): a block or two, instead of a fallback for the whole step.
Axis letters: see layers.py (P = token-expert pairs, N*K of them; R = rows per block; C = row slots per
expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .expert_kernels import _glu, block_table, slot_rows, sort_by_expert


def rows_per_block(num_pairs: int, num_experts: int) -> int:
    """R: 4 rows, 8 once the pairs average 4 or more per expert (experiments/results/bench_moe_few.md)."""
    return 8 if num_pairs >= 4 * num_experts else 4


def _slot_gates(w: jax.Array, table: jax.Array, dtype) -> jax.Array:
    """Each slot's gate weight: w [N,K] read at the table's pair ids, 0 for an empty slot (id P)."""
    return jnp.concatenate([w.reshape(-1).astype(dtype), jnp.zeros((1,), dtype)])[table]


def few_local(x: jax.Array, idx: jax.Array, w: jax.Array, w1: jax.Array, w2: jax.Array,
              rows: int | None = None, skip: int = 0) -> jax.Array:
    """x [N,D], idx/w [N,K], w1 [E,D,2F] (gate | up), w2 [E,F,D], already cast -> [N,D]:
    `sum_k w[n,k] * Expert_{idx[n,k]}(x[n])`, one pass per block of R pairs of one expert.
    rows: R, default rows_per_block (the benchmark tries others). skip: leave out each expert's first `skip`
    pairs (`block_table`)."""
    n, k = idx.shape
    e, _, f2 = w1.shape
    f = f2 // 2
    table, expert, count = block_table(idx, e, rows or rows_per_block(idx.size, e), skip)
    xz, token = slot_rows(x, table, k)                                            # [N+1, D], [B, R]
    gate = _slot_gates(w, table, x.dtype)                                         # [B, R]

    def run(b, y):
        a1 = lax.dynamic_index_in_dim(w1, expert[b], keepdims=False)              # [D, 2F]
        a2 = lax.dynamic_index_in_dim(w2, expert[b], keepdims=False)              # [F, D]
        h = xz[token[b]] @ a1                                                     # [R, 2F]
        return y.at[token[b]].add((_glu(h, f) @ a2) * gate[b][:, None])

    y = lax.fori_loop(0, table.shape[0], lambda b, y: lax.cond(b < count, run, lambda b, y: y, b, y),
                      jnp.zeros((n + 1, w2.shape[2]), x.dtype))
    return y[:n]


def expert_capacity(num_pairs: int, num_experts: int) -> int:
    """C: row slots per expert in `capacity_local`, twice the average pairs per expert plus 2 (an expert's pairs
    past C take `few_local` blocks)."""
    return 2 * -(-num_pairs // num_experts) + 2


def capacity_slots(x: jax.Array, idx: jax.Array, w: jax.Array, w1: jax.Array, w2: jax.Array,
                   capacity: int) -> jax.Array:
    """`few_local`'s contract when no expert has more than `capacity` (C) pairs (pairs past C are dropped):
    each expert's pairs gathered into its C row slots, then two matmuls batched over the expert axis, which
    read every expert's weights in place."""
    n, k = idx.shape
    e, d, f2 = w1.shape
    p = idx.size
    order, _, sizes = sort_by_expert(idx, e)                                      # [P], [E]
    sorted_expert = idx.reshape(-1)[order]
    rank = jnp.arange(p, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_expert]
    slot = jnp.where(rank < capacity, sorted_expert * capacity + rank, e * capacity)   # [P]; E*C: dropped
    table = jnp.full((e * capacity,), p, jnp.int32).at[slot].set(order, mode="drop")    # [E*C], P: empty
    xz, token = slot_rows(x, table, k)                                            # [N+1, D], [E*C]
    gate = _slot_gates(w, table, x.dtype)                                         # [E*C]
    h = jnp.einsum("ECD,EDF->ECF", xz[token].reshape(e, capacity, d), w1)         # [E, C, 2F]
    a = _glu(h.reshape(e * capacity, f2), f2 // 2).reshape(e, capacity, f2 // 2)  # [E, C, F]
    y = jnp.einsum("ECF,EFD->ECD", a, w2).reshape(e * capacity, -1)               # [E*C, D]
    return jnp.zeros((n + 1, y.shape[1]), x.dtype).at[token].add(y * gate[:, None])[:n]


def capacity_local(x: jax.Array, idx: jax.Array, w: jax.Array, w1: jax.Array, w2: jax.Array,
                   capacity: int | None = None) -> jax.Array:
    """Same contract as `few_local`, for a few tokens that choose most of the experts: `capacity_slots` with
    C = `expert_capacity` (or `capacity`) for each expert's first C pairs, plus `few_local`'s blocks for the
    pairs past C. Trained routers send far more pairs than average to one or two experts on many steps (a
    speculative verify step of a batch: more than half of them); their overflow costs a block or two, so C
    needs no worst-case margin, and no pair is ever dropped."""
    n = idx.shape[0]
    c = min(capacity or expert_capacity(idx.size, w1.shape[0]), n)
    y = capacity_slots(x, idx, w, w1, w2, c)
    return y if c >= n else y + few_local(x, idx, w, w1, w2, skip=c)
