"""Dropless routed-expert computation behind one interface, chosen by `ModelConfig.moe_impl`.

Every implementation computes, for each token n, `sum_k w[n,k] * Expert_{idx[n,k]}(x[n])` with no token
dropped, and is checked against the same per-token reference in tests/test_moe_dispatch.py.
  dense            every expert on every token, then a weighted combine (O(E) work; the simple reference)
  ragged           tokens sorted by expert, grouped GEMM with jax.lax.ragged_dot (the GPU/TPU path)
  blocked          the CPU path (below)
  expert_parallel  shard_map + all_to_all over the mesh's `expert` axis, `blocked` on each shard
                   (expert_parallel.py); the local `blocked` path when there is no such mesh axis
Axis letters: see layers.py (P = token-expert pairs, N*K of them).

`blocked`, the fast CPU path
----------------------------
1. Stable argsort of the P token-expert pairs by expert; per-expert row counts and starts.
2. Gather-only dispatch: `xs = x[order // K]` ([P, D] sorted by expert, plus `block` zero rows so a block
   read never runs off the end).
3. A loop over experts (`fori_loop`; the expert's weights picked once with `dynamic_index`) with inner loops
   over the dynamic number of blocks that expert needs: `count // block` full blocks of `block` rows, then
   the remainder in blocks of `block / 2` rows. Each block is two 2-D matmuls, `[rows, D] x [D, 2F]` and
   `[rows, F] x [F, D]`, on a `dynamic_slice` of `xs`, written back with `dynamic_update_slice`. Groups are
   not padded in memory: an expert's last block reads and writes rows of the next expert(s), which later
   iterations overwrite with their own values (the loop runs in expert order). Work is at most
   `P + E * (block/2 - 1)` rows; no padded copy of the tokens is built.
4. Gather-only combine: `y[n] = sum_k w[n,k] * ys[inverse[n,k]]` as K row gathers and adds (`combine`; a
   reduction over the K axis ran ~6x slower on XLA:CPU, an einsum becomes N tiny batched matmuls).
The backward is a `jax.custom_vjp` with the same loop structure. Autodiff can't reverse a while loop with a
dynamic trip count. Autodiff of a static `scan` over blocks is differentiable, but it adds a dense
[E, D, 2F] weight-gradient update at every block (measured below). Per expert, the backward accumulates
the weight gradients of its blocks in fp32 [D, 2F] + [F, D] carries and writes them into the expert's slot
once. Rows past the expert's end are masked in the incoming cotangent (tail blocks only). `h = x W_gate_up`
is saved from the forward (one [P, 2F] buffer), not recomputed. The backward is gather-only too:
`dys = dy[order // K] * w_sorted`, `dx[n] = sum_k dxs[inverse[n,k]]`, `dw[n,k] = <dy[n], ys[inverse[n,k]]>`.

Variants measured with `experiments/bench_moe.py --variants` (D=512, F=256, N=2048, K=8, fwd+bwd, fp32,
2 shared cores; process CPU ms, the dense matmul with the same active FLOPs took 548 ms in the same run;
results in experiments/results/bench_moe_variants.md):
                                                    E=8    E=64   E=256
  kept: experts x (full + half-size tail) blocks    641     812    1173
  one block size (no tail blocks)                   673     827    1221
  h recomputed in the backward                      709     861    1246
  one flat loop over all used blocks (block ->     660     888    1280
    expert by searchsorted, weight grads updated
    in place per block)
  static padded scan + cond + autodiff             1081    4032    (~1 min)
  ragged_dot (the `ragged` impl)                   ~4400   ~9000 at E=16; over a minute at E=64
The kept variant was fastest at every E, though only by 2-9% over the next one: on this machine the
remaining cost at large E is the per-expert weight traffic (at E=256 the experts hold 384 MB, read in both
passes and written back as gradients), not the loop. The block is `cfg.moe_block_size` rows (128; 64 when
E >= 256). For tiny batches (decode) it shrinks to the number of pairs, so that one token does not pay for a
128-row block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from ..config import ModelConfig
from .layers import dtype_of


def routed_experts(cfg: ModelConfig, x: jax.Array, idx: jax.Array, w: jax.Array,
                   w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """x [N,D], idx/w [N,K], w_gate_up [E,D,2,F], w_down [E,F,D] -> [N,D] in the compute dtype."""
    impl = IMPLS.get(cfg.moe_impl)
    if impl is None:
        raise NotImplementedError(f"moe_impl={cfg.moe_impl!r} has no implementation in this build")
    return impl(cfg, x, idx, w, w_gate_up, w_down)


def gather(cfg, x, idx, w, w_gate_up, w_down):
    """For a handful of tokens (N*K <= E, e.g. one decode step; MoE picks it): gather the chosen experts'
    weights per token-expert pair, so a step reads K experts per token instead of all E. Pairs are flattened
    first: one gather of [P, D, 2F] and 2-D-per-pair matmuls ran 2.5-4x faster on CPU than gathering
    [N, K, D, 2, F] and contracting with the token axis kept (tiny and small presets, 1-2 tokens)."""
    dt = dtype_of(cfg.dtype)
    e, d, _, f = w_gate_up.shape
    k = idx.shape[1]
    pairs = idx.reshape(-1)                                                       # [P]
    h = jnp.einsum("PD,PDF->PF", jnp.repeat(x.astype(dt), k, axis=0),
                   w_gate_up.reshape(e, d, 2 * f)[pairs].astype(dt))              # [P, 2F]
    y = jnp.einsum("PF,PFD->PD", nn.silu(h[:, :f]) * h[:, f:], w_down[pairs].astype(dt))
    return combine(y, jnp.arange(pairs.shape[0]), w)


def dense(cfg, x, idx, w, w_gate_up, w_down):
    dt = dtype_of(cfg.dtype)
    h = jnp.einsum("ND,EDGF->ENGF", x.astype(dt), w_gate_up.astype(dt))
    a = nn.silu(h[:, :, 0]) * h[:, :, 1]                                         # [E,N,F]
    y = jnp.einsum("ENF,EFD->END", a, w_down.astype(dt))                          # [E,N,D]
    combine = (jax.nn.one_hot(idx, w_down.shape[0], dtype=jnp.float32) * w[..., None]).sum(1)   # [N,E]
    return jnp.einsum("END,NE->ND", y, combine.astype(dt))


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
    the small K axis, which XLA:CPU fused into a library call ~6x slower than the adds (an einsum instead
    becomes N tiny batched matmuls). `valid` [N,K] zeroes pairs no local expert computed."""
    n, k = w.shape
    inverse = inverse.reshape(n, k)
    w = w.astype(y_sorted.dtype)
    if valid is not None:
        w = jnp.where(valid, w, 0)
    out = y_sorted[inverse[:, 0]] * w[:, 0, None]
    for j in range(1, k):
        out = out + y_sorted[inverse[:, j]] * w[:, j, None]
    return out


def ragged(cfg, x, idx, w, w_gate_up, w_down):
    dt = dtype_of(cfg.dtype)
    e, d, _, f = w_gate_up.shape
    k = idx.shape[1]
    order, inverse, sizes = sort_by_expert(idx, e)
    xs = x.astype(dt)[order // k]                                                 # [P,D]
    h = jax.lax.ragged_dot(xs, w_gate_up.reshape(e, d, 2 * f).astype(dt), sizes)  # [P,2F]
    a = nn.silu(h[:, :f]) * h[:, f:]
    y = jax.lax.ragged_dot(a, w_down.astype(dt), sizes)                           # [P,D]
    return combine(y, inverse, w)


# ------------------------------------------------------------------------------------------------------
# blocked: the CPU path


def _mm(a, b):                      # a @ b
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())))


def _mm_tn(a, b):                   # a^T @ b, accumulated in fp32 (weight gradients)
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _mm_nt(a, b):                   # a @ b^T
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _glu(h, f):
    return nn.silu(h[:, :f]) * h[:, f:]


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


def block_rows(cfg: ModelConfig, num_pairs: int) -> int:
    """Rows per block: cfg.moe_block_size, but no more than the pairs there are (rounded up to 8)."""
    return max(1, min(cfg.moe_block_size, -(-num_pairs // 8) * 8))


def tail_rows(block: int) -> int:
    """Rows per tail block: an expert's last `count % block` rows run in blocks of this size (half a
    block: a quarter measured the same at E=64 and slightly slower at E=256)."""
    return min(block, max(8, block // 2))


def _spans(count, block, tail):
    """(full blocks, tail blocks) for an expert with `count` rows."""
    full = count // block
    return full, (count - full * block + tail - 1) // tail


def _ffn_blocks_fwd(xs, sizes, starts, w1, w2, block, save_h, tail=None):
    """xs [P+block, D] sorted by expert -> ys [P+block, D] (and h [P+block, 2F] when save_h)."""
    tail = tail_rows(block) if tail is None else tail
    num_experts, _, f2 = w1.shape
    f = f2 // 2
    rows = xs.shape[0]
    ys = _zeros((rows, w2.shape[2]), xs.dtype, xs, w1, w2)
    hs = _zeros((rows, f2), xs.dtype, xs, w1) if save_h else None

    def expert(i, carry):
        a1 = lax.dynamic_index_in_dim(w1, i, keepdims=False)                    # [D, 2F]
        a2 = lax.dynamic_index_in_dim(w2, i, keepdims=False)                    # [F, D]
        start = starts[i]
        full, tails = _spans(sizes[i], block, tail)

        def rows_at(r, size, carry):
            ys, hs = carry
            h = _mm(lax.dynamic_slice_in_dim(xs, r, size), a1)                  # [size, 2F]
            ys = lax.dynamic_update_slice_in_dim(ys, _mm(_glu(h, f), a2), r, 0)
            if save_h:
                hs = lax.dynamic_update_slice_in_dim(hs, h, r, 0)
            return ys, hs
        carry = lax.fori_loop(0, full, lambda j, c: rows_at(start + j * block, block, c), carry)
        return lax.fori_loop(0, tails, lambda j, c: rows_at(start + full * block + j * tail, tail, c), carry)
    return lax.fori_loop(0, num_experts, expert, (ys, hs))


def _ffn_blocks_bwd(xs, hs, dys, sizes, starts, w1, w2, block, tail=None):
    """Cotangents of _ffn_blocks_fwd: (dxs [P+block, D], dw1 [E,D,2F], dw2 [E,F,D])."""
    tail = tail_rows(block) if tail is None else tail
    num_experts, _, f2 = w1.shape
    f = f2 // 2
    like = (xs, dys, w1, w2) + ((hs,) if hs is not None else ())

    def expert(i, carry):
        dxs, dw1, dw2 = carry
        a1 = lax.dynamic_index_in_dim(w1, i, keepdims=False)
        a2 = lax.dynamic_index_in_dim(w2, i, keepdims=False)
        start, count = starts[i], sizes[i]
        full, tails = _spans(count, block, tail)

        def rows_at(r, size, masked, carry):
            dxs, g1, g2 = carry
            xb = lax.dynamic_slice_in_dim(xs, r, size)
            dyb = lax.dynamic_slice_in_dim(dys, r, size)
            if masked:                                                          # rows of later experts
                dyb = jnp.where((r - start + jnp.arange(size) < count)[:, None], dyb, 0)
            h = lax.dynamic_slice_in_dim(hs, r, size) if hs is not None else _mm(xb, a1)
            g2 = g2 + _mm_tn(_glu(h, f), dyb)                                   # [F, D]
            dh = _glu_bwd(h, _mm_nt(dyb, a2), f)                                # [size, 2F]
            g1 = g1 + _mm_tn(xb, dh)                                            # [D, 2F]
            dxs = lax.dynamic_update_slice_in_dim(dxs, _mm_nt(dh, a1), r, 0)
            return dxs, g1, g2
        carry = (dxs, _zeros(a1.shape, jnp.float32, *like), _zeros(a2.shape, jnp.float32, *like))
        carry = lax.fori_loop(0, full, lambda j, c: rows_at(start + j * block, block, False, c), carry)
        dxs, g1, g2 = lax.fori_loop(
            0, tails, lambda j, c: rows_at(start + full * block + j * tail, tail, True, c), carry)
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


def blocked(cfg, x, idx, w, w_gate_up, w_down):
    dt = dtype_of(cfg.dtype)
    e, d, _, f = w_gate_up.shape
    block = block_rows(cfg, idx.size)
    return blocked_local(x.astype(dt), idx.astype(jnp.int32), w.astype(jnp.float32),
                         w_gate_up.reshape(e, d, 2 * f).astype(dt), w_down.astype(dt), block)


def _expert_parallel(cfg, x, idx, w, w_gate_up, w_down):
    from .expert_parallel import expert_parallel          # imports this module: resolve at call time
    return expert_parallel(cfg, x, idx, w, w_gate_up, w_down)


IMPLS = {"dense": dense, "ragged": ragged, "blocked": blocked, "expert_parallel": _expert_parallel}
