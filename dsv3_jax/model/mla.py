"""Multi-head latent attention (arXiv 2412.19437, section 2.1.1, equations 1-11): the expanded form for
training, and, given a `LatentContext`, attention over a latent KV cache for prefill and decoding
(`cached_attention`, absorbed or expanded; dsv3_jax/infer owns the cache's storage).

Keys and values are compressed into one latent `c_KV` (kv_lora_rank wide, normed) plus ONE rope key `k_pe`
shared by all heads; per-head keys/values are expanded from the latent by `kv_b_proj`. Queries go through
their own low-rank bottleneck when `q_lora_rank` is set. Axis letters: see layers.py.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from ..config import ModelConfig
from .attention import blocked_attention
from .layers import RMSNorm, constrain, dense, dtype_of, param
from .rope import apply_rope

NEG_INF = -1e30  # finite, so fully-masked rows (padding) give a uniform softmax, not NaN


@struct.dataclass
class LatentContext:
    """What a decoding forward's MLA reads: one layer's cached latents (with a leading layer axis when passed
    to a `Stack`, which scans it with the layers) and how to attend over them.

    c_kv [B,S,C], k_pe [B,S,R]: the cache, slot == position (dsv3_jax/infer/cache.py); row b's context is its
    slots below its first new position. None: nothing cached is read (prefill).
    dtype: the cache's storage dtype. The new latents are rounded to it before the new tokens attend to them,
    exactly as later tokens will see them, so results do not depend on how tokens are grouped into steps.
    absorbed: the form of `MLA.cached_attention`.
    layer: None, or (decoding in place) a traced int32 scalar: c_kv [L,B,S,C] / k_pe [L,B,S,R] are then a
    whole stack's cache, and the MLA of layer `layer` writes its new latents into it before attending over
    that layer's slots (see `MLA.attend_in_place`).
    outputs_from: in place, new tokens before this index only write their latents (keys for the later ones):
    attention, and the block after it, run for new tokens [outputs_from:] only (the speculative draft needs
    the MTP output of its last position alone)."""
    c_kv: Optional[jax.Array]
    k_pe: Optional[jax.Array]
    dtype: Any = struct.field(pytree_node=False)
    absorbed: bool = struct.field(pytree_node=False, default=True)
    layer: Optional[jax.Array] = None
    outputs_from: int = struct.field(pytree_node=False, default=0)


# The smallest decode attention window (slots); the windows are the powers of two from it below the cache
# size, and the cache size itself. A huge value gives one window, the whole cache (the experiments' baseline).
DECODE_WINDOW_MIN = 64


def decode_windows(max_len: int) -> tuple[int, ...]:
    """The static window sizes a decode step over a cache of `max_len` slots chooses from (ascending)."""
    sizes, w = [], DECODE_WINDOW_MIN
    while w < max_len:
        sizes.append(w)
        w *= 2
    return tuple(sizes) + (max_len,)


def window_end(positions: jax.Array, max_len: int) -> jax.Array:
    """Slots a decode step's queries can see end below this (int32 scalar): the largest new position + 1 over
    the batch (a query at p sees slots <= p only), capped at the cache size."""
    return jnp.minimum(jnp.max(positions) + 1, max_len).astype(jnp.int32)


def write_in_place(c_kv, k_pe, positions, kv_mask, cache: LatentContext):
    """The new latents c_kv [B,T,C] / k_pe [B,T,R] scattered into layer `cache.layer` of the stacked cache at
    slots `positions`, keys with kv_mask False (or positions outside the cache) dropped. Returns (c_all
    [L,B,S,C], k_all [L,B,S,R], slots [B,T] (S where dropped), valid [B,T])."""
    (b, t), s = positions.shape, cache.c_kv.shape[2]
    valid = jnp.ones((b, t), bool) if kv_mask is None else kv_mask
    slots = jnp.where(valid & (positions >= 0) & (positions < s), positions, s)    # s: dropped
    rows = jnp.arange(b)[:, None]
    c_all = cache.c_kv.at[cache.layer, rows, slots].set(c_kv, mode="drop")          # [L,B,S,C]
    k_all = cache.k_pe.at[cache.layer, rows, slots].set(k_pe, mode="drop")          # [L,B,S,R]
    return c_all, k_all, slots, valid


def causal_mask(positions: jax.Array, key_valid: Optional[jax.Array]) -> jax.Array:
    """[B,T,T]: query t sees key s iff pos_t >= pos_s and key s is valid (key_valid [B,T], None: all)."""
    mask = positions[:, :, None] >= positions[:, None, :]
    return mask if key_valid is None else mask & key_valid[:, None, :]


class MLA(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        d, h = c.hidden_size, c.num_attention_heads
        lat = c.kv_lora_rank + c.qk_rope_head_dim
        if c.q_lora_rank is not None:
            # q_a_proj and kv_a_proj_with_mqa fused: one matmul on x instead of two.
            self.q_kv_a_proj = param(self, "q_kv_a_proj", (d, c.q_lora_rank + lat), ("embed", "kv_lora"), c)
            self.q_a_norm = RMSNorm(c, axis_name="q_lora")
            self.q_b_proj = param(self, "q_b_proj", (c.q_lora_rank, h, c.qk_head_dim),
                                  ("q_lora", "heads", "head_dim"), c)
        else:
            self.q_proj = param(self, "q_proj", (d, h, c.qk_head_dim), ("embed", "heads", "head_dim"), c)
            self.kv_a_proj = param(self, "kv_a_proj", (d, lat), ("embed", "kv_lora"), c)
        self.kv_a_norm = RMSNorm(c, axis_name="kv_lora")
        self.kv_b_proj = param(self, "kv_b_proj", (c.kv_lora_rank, h, c.qk_nope_head_dim + c.v_head_dim),
                               ("kv_lora", "heads", "head_dim"), c)
        self.o_proj = param(self, "o_proj", (h, c.v_head_dim, d), ("heads", "head_dim", "embed"), c)

    def project(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B,T,D] -> q_nope [B,T,H,nope], q_pe [B,T,H,R] (roped), c_kv [B,T,C] (normed), k_pe [B,T,R] (roped).

        c_kv and k_pe are exactly what the latent cache stores."""
        c = self.cfg
        dt = dtype_of(c.dtype)
        b, t, d = x.shape
        x2 = x.reshape(b * t, d).astype(dt)
        if c.q_lora_rank is not None:
            a = dense(x2, self.q_kv_a_proj.astype(dt)).reshape(b, t, -1)          # [B,T,Q+C+R]
            a = checkpoint_name(a, "mla_down_proj")
            q_c = self.q_a_norm(a[..., :c.q_lora_rank])                           # [B,T,Q]
            kv = a[..., c.q_lora_rank:]                                           # [B,T,C+R]
            w_qb = self.q_b_proj.astype(dt)                                       # [Q,H,K]
            q = dense(q_c.reshape(b * t, -1), w_qb.reshape(w_qb.shape[0], -1)).reshape(b, t, *w_qb.shape[1:])
        else:
            q = jnp.einsum("BTD,DHK->BTHK", x.astype(dt), self.q_proj.astype(dt))
            kv = checkpoint_name(dense(x2, self.kv_a_proj.astype(dt)).reshape(b, t, -1), "mla_down_proj")
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
        c_kv = self.kv_a_norm(kv[..., :c.kv_lora_rank])                          # norm on the latent only
        k_pe = kv[..., c.kv_lora_rank:]
        return q_nope, apply_rope(q_pe, cos, sin), c_kv, apply_rope(k_pe, cos, sin)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, positions: jax.Array,
                 kv_mask: Optional[jax.Array] = None, cache: Optional[LatentContext] = None):
        """Expanded form: x [B,T,D] -> [B,T,D]. Causal by position; kv_mask [B,S] marks valid keys.

        With `cache` (prefill and decoding): the new tokens x at `positions` attend to the cached context
        and, causally, to themselves (kv_mask [B,T]: which new tokens are valid keys). Returns
        (out [B,T,D], (c_kv [B,T,C], k_pe [B,T,R])): the new latents, for the caller to write.
        positions None (training, no cache): the default positions 0..T-1 of every row."""
        if cache is not None:
            return self.attend_cached(x, cos, sin, positions, kv_mask, cache)
        c = self.cfg
        dt = dtype_of(c.dtype)
        # positions None: the default 0..T-1 of every row (Transformer.trunk); without a key mask as well,
        # causality is by index and the plain core can skip the blocks above the diagonal.
        index_causal = positions is None and kv_mask is None
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        # Heads-major [B,H,T,*] operands for the two attention matmuls: with [B,T,H,*] operands XLA:CPU picks
        # a transposed layout for the probs x values product that runs several times slower.
        b, s, _ = c_kv.shape
        w_kvb = self.kv_b_proj.astype(dt)                                                  # [C,H,nope+V]
        kv = dense(c_kv.reshape(b * s, -1).astype(dt), w_kvb.reshape(w_kvb.shape[0], -1))
        kv = jnp.swapaxes(kv.reshape(b, s, *w_kvb.shape[1:]), 1, 2)                        # [B,H,S,nope+V]
        k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]   # [B,H,S,nope], [B,H,S,V]
        # One score matmul over [nope | rope] (the shared rope key broadcast to every head) instead of two
        # and an add over the [B,H,T,S] scores; the softmax scale is folded into the (smaller) queries.
        q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], -1) * c.softmax_scale   # [B,T,H,K]
        q = jnp.swapaxes(q, 1, 2)                                                        # [B,H,T,K]
        k_pe = jnp.broadcast_to(k_pe[:, None].astype(k_nope.dtype), k_nope.shape[:3] + k_pe.shape[-1:])
        k = jnp.concatenate([k_nope, k_pe], -1)                                          # [B,H,S,K]
        if c.attention_impl == "blocked":
            o = blocked_attention(q, k, v, positions, positions, kv_mask, c.attention_block, c.attention_block)
        elif index_causal:
            o = causal_attention_core(q, k, v, c.attention_causal_block)                   # [B,H,T,V]
        else:
            o = attention_core(q, k, v, causal_mask(positions, kv_mask)[:, None])          # [B,H,T,V]
        o = checkpoint_name(o, "attn_core")                      # names: model/transformer.py REMAT_POLICIES
        return checkpoint_name(self.output(jnp.swapaxes(o, 1, 2)), "attn_out")

    def attend_cached(self, x, cos, sin, positions, kv_mask, cache: LatentContext):
        """`__call__` with a cache: project, round the new latents to the cache dtype, attend over the cached
        context (slots before each row's first new position) and the new tokens in one softmax."""
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        c_kv, k_pe = c_kv.astype(cache.dtype), k_pe.astype(cache.dtype)
        if cache.layer is not None:
            return self.attend_in_place(q_nope, q_pe, c_kv, k_pe, positions, kv_mask, cache)
        blocks = [(c_kv, k_pe, causal_mask(positions, kv_mask))]
        if cache.c_kv is not None:
            (b, t), s = positions.shape, cache.c_kv.shape[1]
            before = jnp.arange(s, dtype=positions.dtype)[None, None, :] < positions[:, :1, None]
            blocks.insert(0, (cache.c_kv, cache.k_pe, jnp.broadcast_to(before, (b, t, s))))
        return self.cached_attention(q_nope, q_pe, blocks, cache.absorbed), (c_kv, k_pe)

    def attend_in_place(self, q_nope, q_pe, c_kv, k_pe, positions, kv_mask, cache: LatentContext):
        """Decoding without cache copies: scatter the new latents c_kv [B,T,C] / k_pe [B,T,R] into layer
        `cache.layer` of the stacked cache at slots `positions` (keys with kv_mask False are not written), then
        attend over that layer's slots as one block: row b's query at position p sees slot s iff s is before
        the row's first new position, or s <= p holds a new valid key. Writing before reading leaves XLA no
        old cache value to keep alive, so the update happens in the buffer itself. Returns (out [B,T,D], the
        context with the written cache and `layer + 1`); out covers new tokens [cache.outputs_from:].

        Only a window of the slots is read: every slot a query may see lies below the step's largest
        position + 1 (`window_end`), so the attention runs over the first W slots, W the smallest of the
        static sizes `decode_windows(S)` that covers that end, picked at run time with `lax.switch`. A step's
        attention then costs what the context in use costs, not what the cache's max_len costs; the outputs
        are those of the whole cache up to summation order (the slots left out are masked for every row)."""
        s = cache.c_kv.shape[2]
        c_all, k_all, slots, valid = write_in_place(c_kv, k_pe, positions, kv_mask, cache)
        q = cache.outputs_from

        def windowed(w: int):
            def attend(c_all, k_all, layer, slots, valid, positions, q_nope, q_pe):
                lat = jax.lax.dynamic_slice_in_dim(c_all, layer, 1, 0)[0, :, :w]          # [B,W,C]
                rope = jax.lax.dynamic_slice_in_dim(k_all, layer, 1, 0)[0, :, :w]         # [B,W,R]
                key = jnp.arange(w, dtype=positions.dtype)
                written = ((slots[:, :, None] == key) & valid[:, :, None]).any(1)       # [B,W]
                mask = ((key[None, None, :] < positions[:, :1, None])
                        | (written[:, None, :] & (key[None, None, :] <= positions[:, :, None])))  # [B,T,W]
                return self.cached_attention(q_nope, q_pe, [(lat, rope, mask[:, q:])], cache.absorbed)
            return attend

        sizes = decode_windows(s)
        branches = [windowed(w) for w in sizes]
        operands = (c_all, k_all, cache.layer, slots, valid, positions, q_nope[:, q:], q_pe[:, q:])
        if len(sizes) == 1:
            out = branches[0](*operands)                                                 # [B,T-q,D]
        else:
            index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), window_end(positions, s))
            out = jax.lax.switch(index, branches, *operands)                             # [B,T-q,D]
        return out, cache.replace(c_kv=c_all, k_pe=k_all, layer=cache.layer + 1)

    def cached_attention(self, q_nope: jax.Array, q_pe: jax.Array, blocks, absorbed: bool = True) -> jax.Array:
        """Attention of new queries over latent keys held in one or more blocks; returns [B,T,D] after o_proj.

        q_nope [B,T,H,nope], q_pe [B,T,H,R] (roped), as `project` returns them. blocks: a sequence of
        `(c_kv [B,S,C], k_pe [B,S,R], mask [B,T,S])`, e.g. the cached context and the new tokens themselves;
        their scores share one fp32 softmax, so no block is ever concatenated (the cache is read in place).

        absorbed=True is the decoding form (DeepSeek-V2, arXiv 2405.04434, section 2.1.2: W^UK absorbed into
        the queries, W^UV into the output): `kv_b_proj` is split into W_UK [C,H,nope] and
        W_UV [C,H,V]; `q_abs = q_nope W_UK` [B,T,H,C] meets the latent directly, `o_lat = probs . c_KV`, and
        `o = o_lat W_UV`: per-head keys/values are never materialised. absorbed=False expands every block
        with `kv_b_proj` first (the training form; the decoding baseline that re-expands the cache each step).
        """
        c = self.cfg
        dt = dtype_of(c.dtype)
        nope = c.qk_nope_head_dim
        kv_b = self.kv_b_proj.astype(dt)
        w_uk, w_uv = kv_b[..., :nope], kv_b[..., nope:]                                # [C,H,nope], [C,H,V]
        scores, values = [], []
        if absorbed:
            q_abs = jnp.einsum("BTHK,CHK->BTHC", q_nope.astype(dt), w_uk)              # [B,T,H,C]
        for c_kv, k_pe, _ in blocks:
            if absorbed:
                lat = c_kv.astype(dt)
                s = jnp.einsum("BTHC,BSC->BHTS", q_abs, lat, preferred_element_type=jnp.float32)
                values.append(lat)
            else:
                kv = jnp.einsum("BSC,CHK->BSHK", c_kv.astype(dt), kv_b)
                s = jnp.einsum("BTHK,BSHK->BHTS", q_nope.astype(dt), kv[..., :nope],
                               preferred_element_type=jnp.float32)
                values.append(kv[..., nope:])                                          # [B,S,H,V]
            s = s + jnp.einsum("BTHR,BSR->BHTS", q_pe, k_pe.astype(q_pe.dtype),
                               preferred_element_type=jnp.float32)
            scores.append(s)
        sizes = [s.shape[-1] for s in scores]
        mask = jnp.concatenate([m for _, _, m in blocks], axis=-1)[:, None]            # [B,1,T,S_all]
        probs = attention_softmax(jnp.concatenate(scores, axis=-1) * c.softmax_scale, mask).astype(dt)
        o, start = None, 0
        for size, val in zip(sizes, values):
            p = probs[..., start:start + size]
            start += size
            # Heads-major outputs (W_UV or the swap below restores [B,T,H,*]): with a [B,T,H,*] output XLA:CPU
            # runs the batched probs x latent product an order of magnitude slower (experiments/results/).
            part = (jnp.einsum("BHTS,BSC->BHTC", p, val) if absorbed                     # o_lat [B,H,T,C]
                    else jnp.einsum("BHTS,BSHV->BHTV", p, val))
            o = part if o is None else o + part
        if absorbed:
            o = jnp.einsum("BHTC,CHV->BTHV", o, w_uv)
        else:
            o = jnp.swapaxes(o, 1, 2)
        return self.output(o)

    def output(self, o: jax.Array) -> jax.Array:
        """o [B,T,H,V] -> [B,T,D] through o_proj."""
        dt = dtype_of(self.cfg.dtype)
        b, t, h, v = o.shape
        out = dense(o.reshape(b * t, h * v).astype(dt), self.o_proj.astype(dt).reshape(h * v, -1))   # [B*T, D]
        return out.reshape(b, t, -1)


@jax.custom_vjp
def attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T, masked) v on heads-major operands: q [B,H,T,K] (scale folded in), k [B,H,S,K],
    v [B,H,S,V], mask [B,1,T,S] -> [B,H,T,V]. Scores and softmax in fp32.

    The backward is written out (dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ = dS K,
    dK = dS^T Q) so that every product keeps the heads-major layout, which XLA:CPU's autodiff version of the
    same math does not (slower; experiments/results/bench_train.md)."""
    return _attention_core_fwd(q, k, v, mask)[0]


def _attention_core_fwd(q, k, v, mask):
    scores = jnp.einsum("BHTK,BHSK->BHTS", q, k, preferred_element_type=jnp.float32)
    probs = attention_softmax(scores, mask)                                       # fp32 [B,H,T,S]
    o = jnp.einsum("BHTS,BHSV->BHTV", probs.astype(v.dtype), v)
    return o, (q, k, v, mask, probs, o)


def _attention_core_bwd(res, do):
    q, k, v, mask, probs, o = res
    # dV = P^T dO and dK = dS^T Q contract over T, the rows of P and dS: as such, XLA:CPU runs them outside its
    # fast matmul library. Transposing the narrow operands instead (dO^T [V,T], Q^T [K,T], a fraction of the
    # [T,S] size) makes them the plain products dV^T = dO^T P and dK^T = Q^T dS; the barriers keep XLA from
    # folding the transposes back into the products.
    q_t, do_t = jax.lax.optimization_barrier((jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)))
    dv_t = jnp.einsum("BHVT,BHTS->BHVS", do_t, probs.astype(do.dtype))
    dp = jnp.einsum("BHTV,BHSV->BHTS", do, v, preferred_element_type=jnp.float32)
    # Softmax backward; rowsum(P * dP) = rowsum(dO * O), a reduction over V instead of over S.
    row = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1, keepdims=True)
    ds = (probs * (dp - row)).astype(q.dtype)
    dq = jnp.einsum("BHTS,BHSK->BHTK", ds, k)
    dk_t = jnp.einsum("BHKT,BHTS->BHKS", q_t, ds)
    dk_t, dv_t = jax.lax.optimization_barrier((dk_t, dv_t))
    return dq, jnp.swapaxes(dk_t, 2, 3), jnp.swapaxes(dv_t, 2, 3), None


attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def causal_attention_core(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """`attention_core` for attention causal by index (query t sees keys 0..t: default positions, no key
    mask), one block of `block` query rows at a time against only the keys up to the block's end: the
    blocks above the diagonal, all masked, are never computed nor kept for the backward. q [B,H,T,K],
    k [B,H,T,K], v [B,H,T,V] -> [B,H,T,V]. block 0 (or >= T): one block, i.e. `attention_core` itself.
    Every row's softmax runs over exactly the keys the full form leaves unmasked; only the summation
    order of the skipped zeros differs (why block 128: experiments/results/train_speed.md)."""
    t = q.shape[2]
    block = t if block <= 0 else min(block, t)
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask = np.tril(np.ones((end - start, end), bool), start)[None, None]     # [1,1,rows,end]: s <= t
        outs.append(attention_core(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)


def attention_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax in fp32 (attention is kept in high precision: arXiv 2412.19437, section 3.3.1)."""
    return jax.nn.softmax(jnp.where(mask, scores.astype(jnp.float32), NEG_INF), axis=-1)
