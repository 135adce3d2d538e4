"""KV-cache bytes per token per layer: MLA's latent cache vs standard MHA vs an expanded MLA cache.

Every number is read from cache arrays as this project allocates them (`dsv3_jax.infer.init_cache`): real
arrays for the small presets, `jax.eval_shape` for v3-671b (nothing is allocated). The baselines are built
the same way, as arrays of the shapes they would have:
  MLA latent   c_KV [kv_lora_rank] + RoPE(k_pe) [qk_rope_head_dim] per token and layer (what we cache)
  MHA          standard multi-head attention with the same number of heads and head size d_h =
               qk_nope_head_dim: K and V of d_h each per head, H * (d_h + d_h) values (DeepSeek-V2, arXiv 2405.04434,
               Table 1: 65,536 B for 128 heads of 128 in bf16)
  MLA expanded the per-head keys and values MLA expands to, if those were cached instead of the latent:
               K of qk_head_dim (nope + rope) and V of v_head_dim per head, H * (qk_head_dim + v_head_dim)
All in bf16 (2 bytes), the V3 accounting. Writes experiments/results/kv_cache.md; the last printed line is JSON.

    python experiments/kv_cache.py
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from dsv3_jax.config import PRESETS, ModelConfig
from dsv3_jax.infer import bytes_per_token_per_layer, init_cache

DTYPE = jnp.bfloat16
BATCH, LENGTH = 2, 256          # the arrays' batch and positions (the per-token figure does not depend on them)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def per_token_per_layer(arrays, layers: int) -> float:
    """Bytes of [L, B, S, ...] arrays / (L * B * S)."""
    total = sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)
    return total / (layers * BATCH * LENGTH)


def mha_cache(cfg: ModelConfig):
    h, d = cfg.num_attention_heads, cfg.qk_nope_head_dim
    shape = (cfg.num_hidden_layers, BATCH, LENGTH, h, d)
    return jnp.zeros(shape, DTYPE), jnp.zeros(shape, DTYPE)


def expanded_cache(cfg: ModelConfig):
    l, h = cfg.num_hidden_layers, cfg.num_attention_heads
    return (jnp.zeros((l, BATCH, LENGTH, h, cfg.qk_head_dim), DTYPE),
            jnp.zeros((l, BATCH, LENGTH, h, cfg.v_head_dim), DTYPE))


def human(nbytes: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= size:
            return f"{nbytes / size:,.1f} {unit}"
    return f"{nbytes:.0f} B"


def measure(name: str, cfg: ModelConfig) -> dict:
    big = name == "v3-671b"
    make = (lambda f: jax.eval_shape(f)) if big else (lambda f: f())          # v3: shapes only
    latent = make(lambda: init_cache(cfg, BATCH, LENGTH, DTYPE, mtp=False))
    mla = bytes_per_token_per_layer(latent)
    mha = per_token_per_layer(make(lambda: mha_cache(cfg)), cfg.num_hidden_layers)
    exp = per_token_per_layer(make(lambda: expanded_cache(cfg)), cfg.num_hidden_layers)
    layers = cfg.num_hidden_layers
    return {
        "preset": name, "allocated": not big, "layers": layers, "heads": cfg.num_attention_heads,
        "kv_lora_rank": cfg.kv_lora_rank, "rope_dim": cfg.qk_rope_head_dim,
        "mla_bytes": mla, "mha_bytes": mha, "expanded_bytes": exp,
        "mha_ratio": mha / mla, "expanded_ratio": exp / mla,
        "context": cfg.max_position_embeddings,
        "mla_bytes_at_context": mla * layers * cfg.max_position_embeddings,
        "mha_bytes_at_context": mha * layers * cfg.max_position_embeddings,
    }


def main() -> dict:
    rows = [measure(n, PRESETS[n]) for n in ("tiny", "small", "v3-671b")]
    lines = [
        "# KV cache per token per layer (bf16)",
        "",
        "Read from the arrays `dsv3_jax.infer.init_cache` allocates (v3-671b: `jax.eval_shape`, nothing "
        "allocated); baselines built as arrays of their shapes. MHA: same heads, K and V of d_h = "
        "qk_nope_head_dim each per head. MLA expanded: K of qk_head_dim and V of v_head_dim per head. "
        "Last two columns: one sequence at the preset's full context (max_position_embeddings), all main layers.",
        "",
        "| preset | layers | heads | latent (C + R) | MLA latent B | MHA B | MHA / MLA | MLA expanded B | "
        "expanded / MLA | context | MLA, one sequence | MHA, one sequence |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['layers']} | {r['heads']} | {r['kv_lora_rank']} + {r['rope_dim']} | "
            f"{r['mla_bytes']:,.0f} | {r['mha_bytes']:,.0f} | {r['mha_ratio']:.1f}x | {r['expanded_bytes']:,.0f} | "
            f"{r['expanded_ratio']:.1f}x | {r['context']:,} | {human(r['mla_bytes_at_context'])} | "
            f"{human(r['mha_bytes_at_context'])} |")
    lines += ["", "The MTP module, when used as a speculative draft, adds one more layer's latent cache."]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "kv_cache.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    v3 = rows[-1]
    summary = {
        "v3_671b_bytes_per_token_layer": int(v3["mla_bytes"]),
        "v3_671b_mha_bytes_per_token_layer": int(v3["mha_bytes"]),
        "v3_671b_expanded_bytes_per_token_layer": int(v3["expanded_bytes"]),
        "v3_671b_mha_ratio": round(v3["mha_ratio"], 1),
        "v3_671b_expanded_ratio": round(v3["expanded_ratio"], 1),
        "small_bytes_per_token_layer": int(rows[1]["mla_bytes"]),
        "tiny_bytes_per_token_layer": int(rows[0]["mla_bytes"]),
    }
    assert summary["v3_671b_bytes_per_token_layer"] == 1152 and summary["v3_671b_mha_ratio"] == 56.9
    with open(os.path.join(RESULTS, "kv_cache.json"), "w") as f:         # read by readme_table.py
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
