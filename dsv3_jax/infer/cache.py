"""The latent KV cache of MLA decoding (SPEC sections 1-2): per layer and token it holds ONLY
`c_KV` (after `kv_a_norm`) [kv_lora_rank] and `RoPE(k_pe)` [qk_rope_head_dim], exactly what
`MLA.project` returns, preallocated for `max_len` positions.

Layout: slot == position. Sequence b's token at position p (positions start at 0 at its first real token)
lives in slot p of row b, whatever the other rows' lengths: prompts of different lengths are right-padded,
and a decode step writes each row at its own offset. Slots at or past a row's valid length are masked in
attention, so stale entries (prompt padding, rejected speculative drafts) never need clearing; they are
overwritten by the next write to that slot.

Every layer has its own buffers (a tuple, not one stacked array): a decode step reads each layer's cache in
place and updates it in place. With one [L,B,S,C] array the per-layer reads became copies of the layer's
whole cache at every step (XLA:CPU), an O(B*S) cost per layer and token. Each MTP module has its own cache,
used by self-speculative decoding.

Logical axis names (for `dsv3_jax.sharding.logical_rules`, which maps 'batch' -> ('data', 'expert') and
replicates the rest): `C_KV_AXES` for `c_kv`, `K_PE_AXES` for `k_pe`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from ..config import ModelConfig

C_KV_AXES = ("batch", "length", "kv_lora")
K_PE_AXES = ("batch", "length", "head_dim")


@struct.dataclass
class LayerCache:
    """One layer's cache: c_kv [B,S,C] (normed latent), k_pe [B,S,R] (roped shared key)."""
    c_kv: jax.Array
    k_pe: jax.Array

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[1]

    def constrain(self) -> "LayerCache":
        """Logical sharding hint (batch-sharded); a no-op outside a mesh with axis rules."""
        return LayerCache(nn.with_logical_constraint(self.c_kv, C_KV_AXES),
                          nn.with_logical_constraint(self.k_pe, K_PE_AXES))

    def write(self, c_kv: jax.Array, k_pe: jax.Array, positions: jax.Array,
              valid: Optional[jax.Array] = None) -> "LayerCache":
        """Write new entries c_kv [B,T,C], k_pe [B,T,R] of the contiguous positions [B,T] (row b: positions[b, 0]
        + 0..T-1) at slot == position; entries with valid False, or outside [0, max_len), leave the slot as it
        was. One dynamic_update_slice per row, which XLA does in place (a scatter made it copy the buffer)."""
        return LayerCache(_write_rows(self.c_kv, c_kv, positions[:, 0], valid),
                          _write_rows(self.k_pe, k_pe, positions[:, 0], valid)).constrain()


def _write_rows(buf: jax.Array, new: jax.Array, start: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
    """buf [B,S,X] with new [B,T,X] written at slots start[b] + 0..T-1 per row (see `LayerCache.write`).

    dynamic_update_slice clamps its start into [0, S-T]; entry j of the clamped window is new entry
    j + (clamped - start), kept when that index exists and is valid, else the window keeps buf's value."""
    b, t = new.shape[:2]
    s = buf.shape[1]
    new = new.astype(buf.dtype)
    for row in range(b):
        at = jnp.clip(start[row], 0, s - t)
        idx = jnp.arange(t) + at - start[row]                                     # new entry per window slot
        take = (idx >= 0) & (idx < t)
        src = jnp.clip(idx, 0, t - 1)
        if valid is not None:
            take = take & valid[row][src]
        old = jax.lax.dynamic_slice(buf, (row, at, 0), (1, t, buf.shape[2]))[0]
        window = jnp.where(take[:, None], new[row][src], old)
        buf = jax.lax.dynamic_update_slice(buf, window[None], (row, at, 0))
    return buf


@struct.dataclass
class KVCache:
    """Every layer's latent cache: `layers[i]` for main layer i (dense layers first, as in the model), and
    `mtp[k]` for MTP module k (an empty tuple when MTP caches were not requested)."""
    layers: tuple
    mtp: tuple = ()

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def main_layers(self) -> list[LayerCache]:
        return list(self.layers)


def _layer_cache(cfg: ModelConfig, batch: int, max_len: int, dtype) -> LayerCache:
    return LayerCache(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
                      jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, mtp: bool = True) -> KVCache:
    """Preallocate (zeros) the latent cache for `batch` rows of `max_len` positions.

    dtype: the cache's storage dtype (default `cfg.dtype`; bf16 for the V3 size accounting). mtp: also
    allocate one cache per MTP module (needed by speculative decoding only). Wrap in `jax.eval_shape` to get
    the shapes and sizes without allocating anything."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be >= 1")
    dt = jnp.dtype(dtype or cfg.dtype)
    return KVCache(
        layers=tuple(_layer_cache(cfg, batch, max_len, dt) for _ in range(cfg.num_hidden_layers)),
        mtp=tuple(_layer_cache(cfg, batch, max_len, dt) for _ in range(cfg.num_nextn_predict_layers if mtp else 0)),
    )


def cache_bytes(cache: KVCache, include_mtp: bool = False) -> int:
    """Bytes held by the cache arrays (works on arrays and on `jax.eval_shape` results)."""
    layers = cache.main_layers() + (list(cache.mtp) if include_mtp else [])
    return int(sum(a.size * jnp.dtype(a.dtype).itemsize for c in layers for a in (c.c_kv, c.k_pe)))


def bytes_per_token_per_layer(cache: KVCache) -> float:
    """Main-model cache bytes / (layers * batch * positions), read from the allocated arrays' shapes."""
    layers = cache.main_layers()
    batch, max_len = layers[0].c_kv.shape[:2]
    return cache_bytes(cache) / (len(layers) * batch * max_len)
