"""Routed-expert kernels on one device's operands: `blocked` (the CPU path), `ragged` (TPU, GPU) and
`gathered` (batched matmuls over blocks of one expert's rows).

All take already-cast operands x [N,D], idx/w [N,K], w1 [E,D,2F] (gate | up), w2 [E,F,D] and return
`sum_k w[n,k] * Expert_{idx[n,k]}(x[n])` [N,D], dropless. Pair ids >= E (the sharded forms in
expert_parallel.py mark pairs of other shards that way) are skipped when `num_valid_experts` is given.
dispatch.py picks between them; expert_parallel.py runs them per shard inside shard_map.
Axis letters: see layers.py (P = token-expert pairs, N*K of them).

`blocked`
---------
1. Stable argsort of the P pairs by expert; per-expert row counts and starts.
2. Gather-only dispatch: `xs = x[order // K]` ([P, D] sorted by expert, plus `block` zero rows so a block
   read never runs off the end).
3. A loop over experts (`fori_loop`; the expert's weights picked once with `dynamic_index`) with inner loops
   over the dynamic number of blocks that expert needs: `count // block` full blocks, then the remainder in
   at most one block of each smaller rung (block / 2, block / 4, ... 8 rows; `rungs`), each two 2-D matmuls
   on a `dynamic_slice` of `xs`, written back with `dynamic_update_slice`. Groups are not padded in memory:
   an expert's last block reads and writes rows of the next expert(s), which later iterations overwrite
   (the loop runs in expert order).
4. Gather-only combine: `y[n] = sum_k w[n,k] * ys[inverse[n,k]]` as K row gathers and adds.
The backward is a `jax.custom_vjp` with the same loops (autodiff cannot reverse a dynamic trip count, and a
static scan would add a dense [E, D, 2F] weight-gradient update per block): per expert it accumulates the
weight gradients of its blocks in fp32 carries and writes them once, over blocks of BWD_CHUNK_BLOCKS * block
rows first (longer weight-gradient contractions, fewer adds), then the forward's rungs; `h = x W_gate_up` is
saved from the forward. Why this variant and not the others: measured in experiments/results/bench_moe_variants.md.

`ragged`: pairs sorted by expert, one `jax.lax.ragged_dot` grouped GEMM per projection (XLA's grouped
matmul on TPU; slow on XLA:CPU, and expanded densely by XLA:GPU unless its cuDNN ragged-dot fusion takes it).

`gathered`: no loop and no ragged_dot. Each expert's pairs are cut into blocks of `block` rows (`block_table`;
at most P / block + E blocks), and both projections run as one batched matmul over the blocks, with each
block's expert weights gathered beside its rows. The price is the gathered weights: blocks / E times the
expert weights, read and (in the backward) scatter-added. This is the form for an accelerator where
ragged_dot has no grouped kernel; experiments/results/gpu.md has why.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from ..config import ModelConfig


def sort_by_expert(idx: jax.Array, num_experts: int):
    """Stable order of the token-expert pairs by expert: (order [P], inverse [P], group_sizes [E]).

    Ids >= num_experts (the expert-parallel path marks pairs for other shards that way) sort last and are
    not counted in any group."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return order, inverse, group_sizes


def combine(y_sorted: jax.Array, inverse: jax.Array, w: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Un-sort pair outputs [P,D] and take the weighted sum over each token's K: `sum_k w[n,k] *
    y_sorted[inverse[n,k]]`, written as K row gathers and adds. Gather, no scatter; and no reduction over
    the small K axis, which XLA:CPU fused into a much slower library call (an einsum instead becomes N
    tiny batched matmuls). `valid` [N,K] zeroes pairs no local expert computed."""
    n, k = w.shape
    inverse = inverse.reshape(n, k)
    w = w.astype(y_sorted.dtype)
    if valid is not None:
        w = jnp.where(valid, w, 0)
    out = y_sorted[inverse[:, 0]] * w[:, 0, None]
    for j in range(1, k):
        out = out + y_sorted[inverse[:, j]] * w[:, j, None]
    return out


# ------------------------------------------------------------------------------------------------------
# blocked


def _mm(a, b):                      # a @ b
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())))


def _mm_tn(a, b):                   # a^T @ b, accumulated in fp32 (weight gradients)
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mm_nt(a, b):                   # a @ b^T
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _glu(h, f):
    return nn.silu(h[..., :f]) * h[..., f:]


def _glu_bwd(h, da, f):
    """d(silu(g) * u) / d[g, u] times da, from the saved pre-activation h = [g, u]."""
    g, u = h[:, :f], h[:, f:]
    sg = jax.nn.sigmoid(g)
    return jnp.concatenate([da * u * (sg * (1 + g * (1 - sg))), da * g * sg], axis=1)


def _varying(a) -> set:
    """Mesh axes `a` varies over inside shard_map (empty outside)."""
    t = jax.typeof(a)
    m = getattr(t, "manual_axis_type", None)              # jax 0.10; older releases call it `vma`
    return set(m.varying) if m is not None else set(getattr(t, "vma", ()) or ())


def _like_primal(ct, primal):
    """A cotangent varying over axes its primal does not (weights replicated over `data` inside
    shard_map) is summed over them, as autodiff's transpose of the implicit broadcast would."""
    extra = _varying(ct) - _varying(primal)
    return lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _zeros(shape, dtype, *like):
    """Zeros typed as varying over every mesh axis any of `like` varies over: loop carries inside
    shard_map must keep one type (a no-op outside shard_map)."""
    axes = set()
    for a in like:
        axes |= _varying(a)
    z = jnp.zeros(shape, dtype)
    return lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def block_size(cfg: ModelConfig) -> int:
    """cfg.moe_block_size, or for 0 (auto) 64 rows when n_routed_experts >= 256, else 128: with many
    experts each holds fewer rows and a smaller block wastes less on tails (the sizes
    experiments/bench_moe.py runs with; results in experiments/results/bench_moe.md)."""
    if cfg.moe_block_size:
        return cfg.moe_block_size
    return 64 if cfg.n_routed_experts >= 256 else 128


def block_rows(cfg: ModelConfig, num_pairs: int) -> int:
    """Rows per block: block_size(cfg), but no more than the pairs there are (rounded up to 8), so one
    decode token does not pay for a 128-row block."""
    return max(1, min(block_size(cfg), -(-num_pairs // 8) * 8))


def tail_rows(block: int) -> int:
    """Rows of the first tail block: an expert's last `count % block` rows start with at most one block of
    this size (half a block), then the smaller rungs (`rungs`)."""
    return min(block, max(8, block // 2))


def rungs(block: int) -> tuple:
    """Block sizes an expert's rows run in: `count // block` blocks of `block` rows, then at most one block
    of each smaller rung (tail_rows of the rung above, down to 8 rows), the last rung rounded up: an expert
    wastes fewer than 8 rows on its tail instead of up to block / 2."""
    sizes = [block]
    while tail_rows(sizes[-1]) < sizes[-1]:
        sizes.append(tail_rows(sizes[-1]))
    return tuple(sizes)


# The backward's first rung, in blocks: its weight-gradient products `a^T b` contract over this many rows
# at once, with fewer fp32 accumulations (experiments/results/train_speed.md, "Routed experts (session 7)").
BWD_CHUNK_BLOCKS = 4


def _over_rows(start, count, sizes, rows_at, carry):
    """Run `rows_at(r, size, last, carry)` over the rows [start, start + count) in blocks of `sizes`:
    as many as fit of each size in turn, the last size rounded up (`last` True: its rows past `count`
    belong to later experts, or to the zero padding after the final one)."""
    r, left = start, count
    for n, size in enumerate(sizes):
        last = n == len(sizes) - 1
        trips = (left + size - 1) // size if last else left // size
        carry = lax.fori_loop(0, trips, lambda j, c, r=r, size=size, last=last:
                              rows_at(r + j * size, size, last, c), carry)
        r, left = r + trips * size, left - trips * size
    return carry


def _ffn_blocks_fwd(xs, sizes, starts, w1, w2, block, save_h, blocks=None):
    """xs [P+block, D] sorted by expert -> ys [P+block, D] (and h [P+block, 2F] when save_h). `blocks`:
    the block sizes (default rungs(block))."""
    blocks = blocks or rungs(block)
    num_experts, _, f2 = w1.shape
    f = f2 // 2
    rows = xs.shape[0]
    ys = _zeros((rows, w2.shape[2]), xs.dtype, xs, w1, w2)
    hs = _zeros((rows, f2), xs.dtype, xs, w1) if save_h else None

    def expert(i, carry):
        a1 = lax.dynamic_index_in_dim(w1, i, keepdims=False)                    # [D, 2F]
        a2 = lax.dynamic_index_in_dim(w2, i, keepdims=False)                    # [F, D]

        def rows_at(r, size, last, carry):      # rows past the count: overwritten by later experts
            ys, hs = carry
            h = _mm(lax.dynamic_slice_in_dim(xs, r, size), a1)                  # [size, 2F]
            ys = lax.dynamic_update_slice_in_dim(ys, _mm(_glu(h, f), a2), r, 0)
            if save_h:
                hs = lax.dynamic_update_slice_in_dim(hs, h, r, 0)
            return ys, hs
        return _over_rows(starts[i], sizes[i], blocks, rows_at, carry)
    return lax.fori_loop(0, num_experts, expert, (ys, hs))


def _ffn_blocks_bwd(xs, hs, dys, sizes, starts, w1, w2, block, blocks=None):
    """Cotangents of _ffn_blocks_fwd: (dxs [P+block, D], dw1 [E,D,2F], dw2 [E,F,D]). `blocks`: the block
    sizes (default BWD_CHUNK_BLOCKS * block where there are that many rows, then rungs(block))."""
    chunk = BWD_CHUNK_BLOCKS * block
    blocks = blocks or ((chunk,) if chunk <= xs.shape[0] else ()) + rungs(block)
    num_experts, _, f2 = w1.shape
    f = f2 // 2
    like = (xs, dys, w1, w2) + ((hs,) if hs is not None else ())

    def expert(i, carry):
        dxs, dw1, dw2 = carry
        a1 = lax.dynamic_index_in_dim(w1, i, keepdims=False)
        a2 = lax.dynamic_index_in_dim(w2, i, keepdims=False)
        start, count = starts[i], sizes[i]

        def rows_at(r, size, last, carry):
            dxs, g1, g2 = carry
            xb = lax.dynamic_slice_in_dim(xs, r, size)
            dyb = lax.dynamic_slice_in_dim(dys, r, size)
            if last:                                                            # rows of later experts
                dyb = jnp.where((r - start + jnp.arange(size) < count)[:, None], dyb, 0)
            h = lax.dynamic_slice_in_dim(hs, r, size) if hs is not None else _mm(xb, a1)
            g2 = g2 + _mm_tn(_glu(h, f), dyb)                                   # [F, D]
            dh = _glu_bwd(h, _mm_nt(dyb, a2), f)                                # [size, 2F]
            g1 = g1 + _mm_tn(xb, dh)                                            # [D, 2F]
            dxs = lax.dynamic_update_slice_in_dim(dxs, _mm_nt(dh, a1), r, 0)
            return dxs, g1, g2
        carry = (dxs, _zeros(a1.shape, jnp.float32, *like), _zeros(a2.shape, jnp.float32, *like))
        dxs, g1, g2 = _over_rows(start, count, blocks, rows_at, carry)
        return (dxs, lax.dynamic_update_index_in_dim(dw1, g1.astype(dw1.dtype), i, 0),
                lax.dynamic_update_index_in_dim(dw2, g2.astype(dw2.dtype), i, 0))
    return lax.fori_loop(0, num_experts, expert, (_zeros(xs.shape, xs.dtype, *like),
                                                  _zeros(w1.shape, w1.dtype, *like),
                                                  _zeros(w2.shape, w2.dtype, *like)))


def _dispatch_rows(x, order, k, block):
    xs = x[order // k]                                                          # gather [P, D]
    return jnp.concatenate([xs, jnp.zeros((block, xs.shape[1]), xs.dtype)])


def _pair_rows(ys, inverse, w, valid):
    n, k = w.shape
    yp = ys[inverse].reshape(n, k, -1)                                          # gather [N, K, D]
    if valid is not None:                   # pairs no local expert computed: their rows hold leftovers
        yp = jnp.where(valid[..., None], yp, 0)
    return yp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_core(block, x, w, w1, w2, order, inverse, sizes, starts, valid):
    n, k = w.shape
    ys, _ = _ffn_blocks_fwd(_dispatch_rows(x, order, k, block), sizes, starts, w1, w2, block, False)
    return combine(ys, inverse, w, valid)


def _blocked_core_fwd(block, x, w, w1, w2, order, inverse, sizes, starts, valid):
    n, k = w.shape
    xs = _dispatch_rows(x, order, k, block)
    ys, hs = _ffn_blocks_fwd(xs, sizes, starts, w1, w2, block, True)
    return combine(ys, inverse, w, valid), (xs, hs, ys, w, w1, w2, order, inverse, sizes, starts, valid)


def _blocked_core_bwd(block, res, dy):
    xs, hs, ys, w, w1, w2, order, inverse, sizes, starts, valid = res
    n, k = w.shape
    dw = jnp.einsum("ND,NKD->NK", dy, _pair_rows(ys, inverse, w, valid)).astype(w.dtype)   # [N, K]
    w_sorted = w.reshape(-1)[order].astype(dy.dtype)
    dys = _dispatch_rows(dy, order, k, block) * jnp.pad(w_sorted, (0, block))[:, None]
    dxs, dw1, dw2 = _ffn_blocks_bwd(xs, hs, dys, sizes, starts, w1, w2, block)
    dx = combine(dxs, inverse, jnp.ones_like(w, dxs.dtype))                     # gather, no scatter-add
    return (_like_primal(dx, xs), _like_primal(dw, w), _like_primal(dw1, w1), _like_primal(dw2, w2),
            None, None, None, None, None)


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def blocked_local(x, idx, w, w1, w2, block: int, num_valid_experts: int | None = None):
    """The blocked computation on already-cast operands: x [N,D], idx/w [N,K], w1 [E,D,2F], w2 [E,F,D].

    Pair ids >= E (used by the expert-parallel path for pairs owned by another shard) are skipped and
    contribute zero; pass `num_valid_experts=E` to turn that masking on."""
    e = w1.shape[0]
    order, inverse, sizes = sort_by_expert(idx, e)
    starts = (jnp.cumsum(sizes) - sizes).astype(jnp.int32)
    valid = None if num_valid_experts is None else idx < e
    return _blocked_core(block, x, w, w1, w2, order, inverse, sizes, starts, valid)


def ragged_local(x, idx, w, w1, w2, block: int = 0, num_valid_experts: int | None = None):
    """The ragged computation, same contract as blocked_local (`block` is unused: ragged_dot sizes its own
    tiles). Pairs with ids >= E sort last, fall in no group, and ragged_dot leaves their rows 0."""
    e, _, f2 = w1.shape
    k = idx.shape[1]
    order, inverse, sizes = sort_by_expert(idx, e)
    xs = x[order // k]                                                          # [P, D]
    h = lax.ragged_dot(xs, w1, sizes)                                           # [P, 2F]
    y = lax.ragged_dot(_glu(h, f2 // 2), w2, sizes)                             # [P, D]
    return combine(y, inverse, w, None if num_valid_experts is None else idx < e)


# ------------------------------------------------------------------------------------------------------
# gathered


def block_table(idx: jax.Array, num_experts: int, rows: int, skip: int = 0):
    """idx [N,K] -> (table [B,R] pair ids, P marking an empty slot; expert [B] of each block; count: blocks
    in use, the first `count` rows of the table): each expert's pairs cut into blocks of R = `rows`, in
    expert order. B = min(P, ceil(P / R) + min(P, E)) bounds the blocks there can be. Ids >= E get no slot.
    skip: each expert's first `skip` pairs (in token order) are left out, the ones
    `expert_few.capacity_slots` with C = skip already holds."""
    n = idx.shape[0]
    p = idx.size
    order, _, sizes = sort_by_expert(idx, num_experts)                            # [P] by expert, [E]
    sorted_expert = idx.reshape(-1)[order]
    rank = jnp.arange(p, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_expert] - skip
    rank = jnp.where(sorted_expert < num_experts, rank, -1)       # ids >= E (other shards' pairs): no block
    blocks = (jnp.maximum(sizes - skip, 0) + rows - 1) // rows                    # [E] blocks per expert
    block = (jnp.cumsum(blocks) - blocks)[sorted_expert] + rank // rows           # [P] each pair's block
    if skip:   # experts past `skip` pairs: at most P // (skip + 1), each with at most N - skip more pairs
        bound = max(1, min(num_experts, p // (skip + 1)) * -(-(n - skip) // rows))
    else:
        bound = min(p, -(-p // rows) + min(p, num_experts))
    block = jnp.where(rank >= 0, block, bound)                                    # bound: dropped
    table = jnp.full((bound, rows), p, jnp.int32).at[block, rank % rows].set(order, mode="drop")
    expert = jnp.zeros((bound,), jnp.int32).at[block].set(sorted_expert, mode="drop")
    return table, expert, blocks.sum()


def slot_rows(x: jax.Array, table: jax.Array, k: int):
    """x [N,D] with a zero row appended [N+1,D], and the row each slot of a pair table reads in it: pair id
    // K, or N (the zero row) for an empty slot (an id >= P = N*K)."""
    n = x.shape[0]
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)]), jnp.where(table < n * k, table // k, n)


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.dots_saveable)
def _block_ffn(xz, token, expert, w1, w2):
    """Both projections of every block: xz [N+1,D] (a zero row last), token [B,R], expert [B] -> [B,R,D].
    Rematerialised except for the matmul outputs: the backward gathers the blocks' rows and weights again
    instead of keeping [B,D,2F] + [B,F,D] of gathered weights per layer."""
    h = jnp.einsum("BRD,BDF->BRF", xz[token], w1[expert])                         # [B,R,2F]
    return jnp.einsum("BRF,BFD->BRD", _glu(h, w2.shape[1]), w2[expert])           # [B,R,D]


def gathered_local(x, idx, w, w1, w2, block: int, num_valid_experts: int | None = None):
    """The gathered computation, same contract as blocked_local: `block_table`'s blocks of R = `block` pairs
    of one expert as two batched matmuls, each block's token rows [B,R,D] and its expert's weights
    [B,D,2F], [B,F,D] gathered, then the gather-only combine. Empty slots compute on a zero row and no pair
    reads them; ids >= E fall in no block and read the zero row past the slots."""
    table, expert, _ = block_table(idx, w1.shape[0], block)                       # [B,R], [B]
    y = _block_ffn(*slot_rows(x, table, idx.shape[1]), expert, w1, w2)           # [B,R,D]
    slots = table.size
    slot = jnp.full((idx.size,), slots, jnp.int32).at[table.reshape(-1)].set(
        jnp.arange(slots, dtype=jnp.int32), mode="drop")                          # [P]: each pair's slot
    ys = jnp.concatenate([y.reshape(slots, -1), jnp.zeros((1, y.shape[-1]), y.dtype)])
    return combine(ys, slot, w, None if num_valid_experts is None else idx < w1.shape[0])


KERNELS = {"blocked": blocked_local, "ragged": ragged_local, "gathered": gathered_local}


def local_experts(cfg: ModelConfig, kernel: str, x, idx, w, w_gate_up, w_down):
    """One device, every expert: x [N,D], idx/w [N,K], w_gate_up [E,D,2,F], w_down [E,F,D] cast to the
    compute dtype, then KERNELS[kernel]."""
    dt = jnp.dtype(cfg.dtype)
    e, d, _, f = w_gate_up.shape
    return KERNELS[kernel](x.astype(dt), idx.astype(jnp.int32), w.astype(jnp.float32),
                           w_gate_up.reshape(e, d, 2 * f).astype(dt), w_down.astype(dt),
                           block_rows(cfg, idx.size))
