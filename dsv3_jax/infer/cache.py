"""The latent KV cache of MLA decoding (arXiv 2412.19437, section 2.1.1): per layer and token it holds ONLY
`c_KV` (after `kv_a_norm`) [kv_lora_rank] and `RoPE(k_pe)` [qk_rope_head_dim], exactly what
`MLA.project` returns, preallocated for `max_len` positions.

Layout: slot == position. Sequence b's token at position p (positions start at 0 at its first real token)
lives in slot p of row b, whatever the other rows' lengths: prompts of different lengths are right-padded,
and a decode step writes each row at its own offset. Slots at or past a row's valid length are masked in
attention, so stale entries (prompt padding, rejected speculative drafts) never need clearing; they are
overwritten by the next write to that slot.

Main layers are stacked with a leading layer axis, like the scanned params (`params['dense_layers']['layers']`,
`params['moe_layers']['layers']`): a decode step carries a stack's cache through the layer scan (or the
unrolled layers of per-layer params, `decode.decode_params`) and each layer writes its new entries into it in
place before reading its own slots (`MLA.attend_in_place`); a prefill stores the returned latents with
`LayerCache.write`. A decode step reads only a window of the slots: the first W, W the smallest of a few static
sizes (`mla.decode_windows`) covering the step's largest position + 1, so a cache preallocated far beyond the
context (a fixed `max_len`) costs memory, not attention time.
Each MTP module has its own cache (leading axis of size 1), used by self-speculative decoding.

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

C_KV_AXES = ("layers", "batch", "length", "kv_lora")
K_PE_AXES = ("layers", "batch", "length", "head_dim")


@struct.dataclass
class LayerCache:
    """A stack of layer caches: c_kv [L,B,S,C] (normed latent), k_pe [L,B,S,R] (roped shared key)."""
    c_kv: jax.Array
    k_pe: jax.Array

    @property
    def num_layers(self) -> int:
        return self.c_kv.shape[0]

    @property
    def max_len(self) -> int:
        return self.c_kv.shape[2]

    def constrain(self) -> "LayerCache":
        """Logical sharding hint (batch-sharded); a no-op outside a mesh with axis rules."""
        return LayerCache(nn.with_logical_constraint(self.c_kv, C_KV_AXES),
                          nn.with_logical_constraint(self.k_pe, K_PE_AXES))

    def write(self, c_kv: jax.Array, k_pe: jax.Array, slots: jax.Array) -> "LayerCache":
        """Write new entries c_kv [L,B,T,C], k_pe [L,B,T,R] at per-row slots [B,T] (in place under donation).

        Slots outside [0, max_len) are dropped (used for dummy entries)."""
        s = self.max_len
        slots = jnp.where((slots >= 0) & (slots < s), slots, s)        # negative would wrap: send past the end
        rows = jnp.arange(slots.shape[0])[:, None]
        return LayerCache(
            self.c_kv.at[:, rows, slots].set(c_kv.astype(self.c_kv.dtype), mode="drop"),
            self.k_pe.at[:, rows, slots].set(k_pe.astype(self.k_pe.dtype), mode="drop"),
        ).constrain()


@struct.dataclass
class KVCache:
    """Every layer's latent cache. `dense`/`moe` follow the scanned stacks (None when a stack is empty);
    `mtp[k]` is MTP module k's cache (an empty tuple when MTP caches were not requested)."""
    dense: Optional[LayerCache]
    moe: Optional[LayerCache]
    mtp: tuple = ()

    @property
    def max_len(self) -> int:
        return next(c for c in (self.dense, self.moe) + tuple(self.mtp) if c is not None).max_len

    def main_layers(self) -> list[LayerCache]:
        return [c for c in (self.dense, self.moe) if c is not None]


def _layer_cache(cfg: ModelConfig, layers: int, batch: int, max_len: int, dtype) -> LayerCache:
    return LayerCache(jnp.zeros((layers, batch, max_len, cfg.kv_lora_rank), dtype),
                      jnp.zeros((layers, batch, max_len, cfg.qk_rope_head_dim), dtype))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None, mtp: bool = True) -> KVCache:
    """Preallocate (zeros) the latent cache for `batch` rows of `max_len` positions.

    dtype: the cache's storage dtype (default `cfg.dtype`; bf16 for the V3 size accounting). mtp: also
    allocate one cache per MTP module (needed by speculative decoding only). Wrap in `jax.eval_shape` to get
    the shapes and sizes without allocating anything."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be >= 1")
    dt = jnp.dtype(dtype or cfg.dtype)
    return KVCache(
        dense=_layer_cache(cfg, cfg.num_dense_layers, batch, max_len, dt) if cfg.num_dense_layers else None,
        moe=_layer_cache(cfg, cfg.num_moe_layers, batch, max_len, dt) if cfg.num_moe_layers else None,
        mtp=tuple(_layer_cache(cfg, 1, batch, max_len, dt)
                  for _ in range(cfg.num_nextn_predict_layers if mtp else 0)),
    )


def cache_bytes(cache: KVCache, include_mtp: bool = False) -> int:
    """Bytes held by the cache arrays (works on arrays and on `jax.eval_shape` results)."""
    layers = cache.main_layers() + (list(cache.mtp) if include_mtp else [])
    return int(sum(a.size * jnp.dtype(a.dtype).itemsize for c in layers for a in (c.c_kv, c.k_pe)))


def bytes_per_token_per_layer(cache: KVCache) -> float:
    """Main-model cache bytes / (layers * batch * positions), read from the allocated arrays' shapes."""
    layers = cache.main_layers()
    n_layers = sum(c.num_layers for c in layers)
    batch, max_len = layers[0].c_kv.shape[1], layers[0].c_kv.shape[2]
    return cache_bytes(cache) / (n_layers * batch * max_len)
