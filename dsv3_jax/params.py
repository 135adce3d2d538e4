"""Parameter counts from the model's own abstract init (jax.eval_shape: shapes only, no memory)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from .config import ModelConfig
from .model import Transformer


def abstract_params(cfg: ModelConfig) -> dict:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.PRNGKey(0), t), tokens)
    return nn.unbox(variables["params"])


def count_params(cfg: ModelConfig) -> dict:
    """total (main model), activated per token (routed experts scaled by K/E; embedding and head included),
    and the MTP modules' own parameters (the shared embedding and head not counted again)."""
    flat = traverse_util.flatten_dict(abstract_params(cfg))
    total = mtp = activated = routed = embedding = 0
    for path, leaf in flat.items():
        n = math.prod(leaf.shape)
        if path[0].startswith("mtp_"):
            mtp += n
            continue
        total += n
        if path[-1].startswith("experts_"):
            routed += n
            n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
        if path[-1] == "embedding":
            embedding += n
        activated += n
    return {"total": total, "activated": int(round(activated)), "activated_without_embedding":
            int(round(activated - embedding)), "mtp": mtp, "routed_experts": routed, "embedding": embedding}


def train_flops_per_step(cfg: ModelConfig, batch: int, seq_len: int, mtp: bool = True) -> float:
    """Model FLOPs of one train step on `batch` sequences of `seq_len` tokens: 3 x forward (backward = 2 x
    forward), forward = 2 x tokens x activated matmul params (routed experts scaled by K/E; the embedding
    lookup is no matmul; the head counted once per use) plus attention 2 x B x T^2 x H x (qk_head_dim +
    v_head_dim) per layer (full T^2, the PaLM MFU convention). With `mtp`, each MTP module adds its own
    parameters (its experts scaled alike), one more head and one more attention."""
    counts = count_params(cfg)
    tokens = batch * seq_len
    head = cfg.hidden_size * cfg.vocab_size
    active = counts["activated_without_embedding"]
    attn_layers = cfg.num_hidden_layers
    if mtp and cfg.num_nextn_predict_layers:
        e_scale = cfg.num_experts_per_tok / cfg.n_routed_experts
        per_expert_set = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.n_routed_experts
        active += (counts["mtp"] - per_expert_set * (1 - e_scale) * cfg.num_nextn_predict_layers
                   + head * cfg.num_nextn_predict_layers)
        attn_layers += cfg.num_nextn_predict_layers
    attn = 2 * batch * seq_len ** 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 3 * (2 * tokens * active + attn * attn_layers)


def decode_flops_per_step(cfg: ModelConfig, batch: int, context: int) -> float:
    """Model FLOPs of one greedy decode step (one new token per row over `context` cached tokens, the
    absorbed form): 2 x batch x activated matmul params, plus per layer and row the scores over the latent
    and rope keys, 2 x H x context x (kv_lora_rank + qk_rope_head_dim), and the latent values,
    2 x H x context x kv_lora_rank."""
    counts = count_params(cfg)
    per_layer = 2 * cfg.num_attention_heads * context * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return 2 * batch * counts["activated_without_embedding"] + batch * cfg.num_hidden_layers * per_layer
