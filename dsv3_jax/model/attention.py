"""Memory-efficient attention: a blocked online softmax (flash-attention style, Dao et al. 2022) with a custom
VJP, in pure JAX so it runs (and is tested against the plain form) on any backend.

The plain core (`mla.attention_core`) holds fp32 [B,H,T,S] scores and probabilities, and its backward keeps
the probabilities as a residual: at T = S = 4096 and 128 heads that is 8 GiB per sequence per layer for each
such array. Here only [B,H,bq,bk] blocks of scores exist at a time; the forward saves the output and the
per-row logsumexp [B,H,T], and the backward recomputes each block's probabilities from them.

Causality and padding come from positions (and an optional key mask), evaluated per block, so no [T,S] mask
is built. Masked entries take the same finite NEG_INF as the plain form, so a row with no valid key gets the
same uniform average as there.

Axis letters (see layers.py): B batch, H heads, T query length, S key length, K query/key head dim,
V value head dim; n / m index query / key blocks, Q / P the positions inside a query / key block.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30          # as mla.NEG_INF: finite, so fully masked rows stay finite


def _block(size: int, want: int) -> int:
    """The largest divisor of `size` that is at most `want` (whole blocks; shapes stay static)."""
    b = min(want, size)
    while size % b:
        b -= 1
    return b


def _block_mask(q_pos, k_pos, k_valid, q):
    """[B,1,Q,P] bool: causal by position, and the key is real.

    The positions pass through an optimization barrier with the block's queries `q`: the same positions
    serve every layer, so otherwise the compiler hoists the masks of all (query block, key block) pairs out
    of the layer loop and keeps them, broadcast over the heads, for the whole step (2 GiB per device for
    v3-671b at 4096 tokens, experiments/results/pod_memory.md)."""
    q_pos, _ = jax.lax.optimization_barrier((q_pos, q))
    mask = q_pos[:, None, :, None] >= k_pos[:, None, None, :]
    if k_valid is not None:
        mask = mask & k_valid[:, None, None, :]
    return mask


def _split(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Move blocks of `axis` to a new leading axis: [..., N*b, ...] -> [N, ..., b, ...]."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge(x: jax.Array, axis: int) -> jax.Array:
    """Inverse of _split."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
                      k_valid: Optional[jax.Array] = None, block_q: int = 512, block_k: int = 512) -> jax.Array:
    """softmax(q k^T, causal by position, masked) v on heads-major operands: q [B,H,T,K] (scale folded in),
    k [B,H,S,K], v [B,H,S,V], q_pos [B,T], k_pos [B,S] int, k_valid [B,S] bool or None -> [B,H,T,V] in v's
    dtype. Scores, softmax statistics and accumulators in fp32."""
    bq, bk = _block(q.shape[2], block_q), _block(k.shape[2], block_k)
    if k_valid is None:
        k_valid = jnp.ones(k_pos.shape, bool)
    return _attention(q, k, v, q_pos, k_pos, k_valid, bq, bk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _attention(q, k, v, q_pos, k_pos, k_valid, bq, bk):
    return _forward(q, k, v, q_pos, k_pos, k_valid, bq, bk)[0]


def _forward(q, k, v, q_pos, k_pos, k_valid, bq, bk):
    """-> (o [B,H,T,V], row max m [B,H,T] fp32, 1 / row sum of exp(s - m) [B,H,T] fp32).

    The backward recomputes P = exp(S - m) / l from these two rather than from one logsumexp: m + log(l)
    rounds to m when m is NEG_INF (a row without valid keys), which would lose the 1/l."""
    ks, vs = _split(k, 2, bk), _split(v, 2, bk)                       # [m,B,H,P,K], [m,B,H,P,V]
    kps, kvs = _split(k_pos, 1, bk), _split(k_valid, 1, bk)           # [m,B,P]

    def one_query_block(args):
        qb, qpb = args                                                # [B,H,Q,K], [B,Q]

        def step(carry, blk):
            m, l, acc = carry
            kb, vb, kpb, kvb = blk
            s = jnp.einsum("BHQK,BHPK->BHQP", qb, kb, preferred_element_type=jnp.float32)
            s = jnp.where(_block_mask(qpb, kpb, kvb, qb), s, NEG_INF)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("BHQP,BHPV->BHQV", p.astype(vb.dtype), vb,
                                                      preferred_element_type=jnp.float32)
            return (m_new, l * corr + p.sum(-1), acc), None

        b, h, nq = qb.shape[0], qb.shape[1], qb.shape[2]
        init = (jnp.full((b, h, nq), -jnp.inf, jnp.float32), jnp.zeros((b, h, nq), jnp.float32),
                jnp.zeros((b, h, nq, v.shape[-1]), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, (ks, vs, kps, kvs))
        return (acc / l[..., None]).astype(v.dtype), m, 1.0 / l

    o, m, inv_l = jax.lax.map(one_query_block, (_split(q, 2, bq), _split(q_pos, 1, bq)))
    return _merge(o, 2), _merge(m, 2), _merge(inv_l, 2)


def _fwd(q, k, v, q_pos, k_pos, k_valid, bq, bk):
    o, m, inv_l = _forward(q, k, v, q_pos, k_pos, k_valid, bq, bk)
    return o, (q, k, v, q_pos, k_pos, k_valid, o, m, inv_l)


def _bwd(bq, bk, res, do):
    """Per key block (outer) and query block (inner): P = exp(S - m) / l, dV += P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(dO O)), dQ += dS K, dK += dS^T Q. dK, dV of a key block accumulate in the inner loop's
    carry; dQ accumulates over key blocks in the outer carry."""
    q, k, v, q_pos, k_pos, k_valid, o, m, inv_l = res
    row = (do.astype(jnp.float32) * o.astype(jnp.float32)).sum(-1)           # [B,H,T]
    qs, dos = _split(q, 2, bq), _split(do, 2, bq)                            # [n,B,H,Q,*]
    stats = (_split(q_pos, 1, bq), _split(m, 2, bq), _split(inv_l, 2, bq), _split(row, 2, bq))

    def one_key_block(dq, blk):
        kb, vb, kpb, kvb = blk

        def step(carry, qblk):
            dk, dv = carry
            qb, dob, qpb, mb, ilb, rb = qblk
            s = jnp.einsum("BHQK,BHPK->BHQP", qb, kb, preferred_element_type=jnp.float32)
            s = jnp.where(_block_mask(qpb, kpb, kvb, qb), s, NEG_INF)
            p = jnp.exp(s - mb[..., None]) * ilb[..., None]
            dv = dv + jnp.einsum("BHQP,BHQV->BHPV", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("BHQV,BHPV->BHQP", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - rb[..., None])).astype(qb.dtype)
            dk = dk + jnp.einsum("BHQP,BHQK->BHPK", ds, qb, preferred_element_type=jnp.float32)
            return (dk, dv), jnp.einsum("BHQP,BHPK->BHQK", ds, kb, preferred_element_type=jnp.float32)

        init = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        (dk, dv), dq_parts = jax.lax.scan(step, init, (qs, dos) + stats)
        return dq + _merge(dq_parts, 2), (dk.astype(k.dtype), dv.astype(v.dtype))

    blocks = (_split(k, 2, bk), _split(v, 2, bk), _split(k_pos, 1, bk), _split(k_valid, 1, bk))
    dq, (dks, dvs) = jax.lax.scan(one_key_block, jnp.zeros(q.shape, jnp.float32), blocks)
    return dq.astype(q.dtype), _merge(dks, 2), _merge(dvs, 2), None, None, None


_attention.defvjp(_fwd, _bwd)
