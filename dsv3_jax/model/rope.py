"""Rotary position embedding with YaRN (arXiv 2309.00071; used for V3's context extension, arXiv 2412.19437,
section 4.3).

Layout: INTERLEAVED pairs `(x[2j], x[2j+1])` rotated by frequency j, exactly as the released checkpoint and
DeepSeek's own code expect, so HF weights load with no permutation. (transformers rotates the same pairs and
emits them de-interleaved; `q . k` is identical, so logits match.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig, yarn_mscale


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """`f'_j` for j in [0, rope_dim/2): plain RoPE, or YaRN's blend of interpolated and original."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # fp32 like the reference, so that angles at long positions round the same way.
    freqs = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    # ramp 0 keeps the original frequency (fast dims), ramp 1 interpolates by `factor` (slow dims).
    return (freqs / rs.factor * ramp + freqs * (1 - ramp)).astype(np.float32)


def cos_sin_scale(cfg: ModelConfig) -> float:
    """Factor on cos/sin (HF's `attention_factor`): 1.0 for V3, where mscale == mscale_all_dim."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of `pos * f'_j` in fp32: positions [B, T] -> two [B, T, R/2]."""
    inv = jnp.asarray(inverse_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv
    s = cos_sin_scale(cfg)
    return jnp.cos(angles) * s, jnp.sin(angles) * s


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs. x: [B, T, ..., R]; cos/sin: [B, T, R/2] (broadcast over middle axes)."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    pairs = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
