"""Helpers for the HF command-line tests: a tiny DeepSeek-V3 written by transformers' own save_pretrained
(no MTP tensors, `num_nextn_predict_layers: 1` kept in config.json, as published fine-tunes are) and a
byte-level tokenizer.json."""

import os
import subprocess
import sys

import numpy as np

from dsv3_jax.config import ModelConfig, to_hf_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Heads, experts, widths and vocab divisible by 2 for the (2, 2, 2) mesh; grouped routing; plain RoPE.
TINY = ModelConfig(
    vocab_size=264, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256, num_nextn_predict_layers=1,
    rope_scaling=None, initializer_range=0.05)


def write_transformers_checkpoint(path: str, cfg: ModelConfig = TINY, seed: int = 0) -> None:
    """A randomly initialised transformers DeepseekV3ForCausalLM (router biases ~5 with mixed signs, so
    routing depends on them) saved by its own save_pretrained, plus a tokenizer.json."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**to_hf_dict(cfg))).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, cfg.initializer_range, generator=g)
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            e = cfg.n_routed_experts
            layer.mlp.gate.e_score_correction_bias.copy_(5 * torch.tensor([1.0, -1.0] * (e // 2))
                                                         + torch.rand(e, generator=g) - 0.5)
            layer.mlp.gate.weight.normal_(0, 2 / cfg.hidden_size ** 0.5, generator=g)
    model.save_pretrained(path)
    write_byte_tokenizer(os.path.join(path, "tokenizer.json"))


def write_byte_tokenizer(path: str) -> None:
    """Byte-level BPE without merges: 256 byte tokens plus <|endoftext|> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(path)


def transformers_logits(path: str, tokens: np.ndarray) -> np.ndarray:
    import torch
    from transformers import DeepseekV3ForCausalLM
    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def cli(*args, devices: int = 8, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dsv3_jax ARGS` in a subprocess with `devices` host CPU devices."""
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
    return subprocess.run([sys.executable, "-m", "dsv3_jax", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=REPO)
