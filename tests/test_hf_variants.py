"""Every DeepseekV3 config.json in the wild loads, with logits equal to transformers' on tiny random
checkpoints of the same shape family: Moonlight (q_lora_rank null, n_group 1, no num_nextn_predict_layers),
Kimi-K2 (model_type kimi_k2, many experts in one group, MTP 0, released YaRN, FP8 with quantization_config),
V3 with the released fields (topk_method, scoring_func, YaRN in `rope_scaling`) and with transformers-5's
`rope_parameters`. A key we do not model warns naming it; a value we cannot honour is an InputError naming it.

Tolerance 1e-4 on logits of magnitude ~1, for the reasons given in test_hf_parity.py (fp32 on both sides;
rounding-order differences are ~1e-6; a layout or routing error moves logits by 1e-2..1).
"""

import json
import math
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from dsv3_jax.config import from_hf_dict  # noqa: E402
from dsv3_jax.errors import InputError  # noqa: E402
from dsv3_jax.hf import load_checkpoint, save_checkpoint, write_fp8_checkpoint  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(2)
TOL = 1e-4

# Tiny sizes shared by every variant; each variant then sets what its family sets.
BASE = dict(vocab_size=80, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, first_k_dense_replace=1, n_shared_experts=1,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
            rms_norm_eps=1e-6, initializer_range=0.05, architectures=["DeepseekV3ForCausalLM"],
            hidden_act="silu", attention_bias=False, attention_dropout=0.0, bos_token_id=0, eos_token_id=1,
            tie_word_embeddings=False, torch_dtype="bfloat16", transformers_version="4.48.3", use_cache=True,
            aux_loss_alpha=0.001, seq_aux=True, pretraining_tp=1, ep_size=1, moe_layer_freq=1,
            scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

VARIANTS = {
    # Moonlight-16B-A3B: full-rank queries, one group, no num_nextn_predict_layers key, plain RoPE.
    "moonlight": dict(model_type="deepseek_v3", q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=3,
                      n_group=1, topk_group=1, rope_scaling=None, rope_theta=50000.0),
    # Kimi-K2: 384 experts in one group (scaled down to 48), MTP 0, released YaRN with beta_fast 1, FP8.
    "kimi_k2_fp8": dict(model_type="kimi_k2", q_lora_rank=24, n_routed_experts=48, num_experts_per_tok=4,
                        n_group=1, topk_group=1, num_nextn_predict_layers=0, routed_scaling_factor=2.827,
                        rope_theta=50000.0, rope_scaling=dict(YARN, beta_fast=1.0, factor=8.0),
                        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}),
    # DeepSeek-V3/R1: grouped routing, MTP 1, YaRN in the released `rope_scaling`.
    "v3_rope_scaling": dict(model_type="deepseek_v3", q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3,
                            n_group=4, topk_group=2, num_nextn_predict_layers=1, rope_scaling=YARN,
                            rope_theta=10000),
    # The same family as transformers 5 writes it: `rope_parameters` (theta inside), num_mtp_layers-free.
    "v3_rope_parameters": dict(model_type="deepseek_v3", q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=2, topk_group=1, num_nextn_predict_layers=1, rope_interleave=True,
                               rope_parameters={"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.8}),
}


def _dequantised_copy(src: str, dst: str, raw: dict) -> None:
    """An independent torch dequantisation of an FP8 checkpoint (W = float(W8) * kron(S, 1_128)), saved as
    fp32 with the quantization_config removed: what transformers loads on the CPU."""
    os.makedirs(dst)
    out = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(src, f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    for k in [k for k in out if k.endswith("_scale_inv")]:
        s, w = out.pop(k), out[k[:-len("_scale_inv")]]
        o, i = w.shape
        out[k[:-len("_scale_inv")]] = w.float() * torch.kron(s.float(), torch.ones(128, 128))[:o, :i]
    save_file({k: v.float().contiguous() for k, v in out.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump({k: v for k, v in raw.items() if k != "quantization_config"}, fh)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_logits_match_transformers(name, tmp_path, random_variables):
    raw = dict(BASE, **VARIANTS[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # every released key is known: no warning
        cfg = from_hf_dict(raw)
    path = str(tmp_path / "ckpt")
    v = random_variables(cfg, seed=7)
    (write_fp8_checkpoint if "quantization_config" in raw else save_checkpoint)(path, cfg, v)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(raw, fh)                                # the variant's own config.json, verbatim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg2, ours = load_checkpoint(path)
    assert cfg2 == cfg
    hf_dir = path
    if "quantization_config" in raw:
        hf_dir = str(tmp_path / "dequantised")
        _dequantised_copy(path, hf_dir, raw)
    hc = DeepseekV3Config(**{k: v for k, v in raw.items() if k not in ("model_type", "quantization_config")})
    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, config=hc, torch_dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    t = 24                                   # > original_max_position_embeddings=16: YaRN matters
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, t)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    got = np.asarray(jax.jit(Transformer(cfg2).apply)(ours, jnp.asarray(tokens)).logits)
    diff = np.abs(got - ref).max()
    print(f"\n[{name}] max |logits diff| = {diff:.3g} (|logits| max {np.abs(ref).max():.3g})")
    assert np.abs(ref).max() > 0.1
    assert diff <= TOL


def test_variant_fields_map_as_released():
    m = from_hf_dict(dict(BASE, **VARIANTS["moonlight"]))
    assert m.q_lora_rank is None and (m.n_group, m.topk_group) == (1, 1) and m.num_nextn_predict_layers == 0
    assert m.rope_scaling is None and m.rope_theta == 50000.0
    k = from_hf_dict(dict(BASE, **VARIANTS["kimi_k2_fp8"]))
    assert k.n_routed_experts == 48 and k.rope_scaling.beta_fast == 1.0 and k.rope_scaling.factor == 8.0
    p = from_hf_dict(dict(BASE, **VARIANTS["v3_rope_parameters"]))
    assert p.rope_theta == 20000.0 and p.rope_scaling.mscale_all_dim == 0.8 and p.num_nextn_predict_layers == 1


@pytest.mark.parametrize("key,value", [("scoring_func", "softmax"), ("topk_method", "greedy"),
                                       ("hidden_act", "gelu"), ("moe_layer_freq", 2), ("attention_bias", True),
                                       ("rope_interleave", False), ("num_key_value_heads", 1),
                                       ("model_type", "deepseek_v2")])
def test_value_we_cannot_honour_is_an_input_error(key, value):
    raw = dict(BASE, **VARIANTS["v3_rope_scaling"])
    raw[key] = value
    with pytest.raises(InputError, match=f"{key}={value!r}|{key}={value}"):
        from_hf_dict(raw)


def test_unknown_field_warns_naming_it():
    raw = dict(BASE, **VARIANTS["v3_rope_scaling"], sliding_window=4096, use_flash_mla=True)
    with pytest.warns(UserWarning, match="sliding_window, use_flash_mla are not modelled"):
        from_hf_dict(raw)
    bad = {**BASE, **VARIANTS["v3_rope_scaling"], "n_group": 3}     # 8 experts in 3 groups
    with pytest.raises(InputError, match="n_group"):
        from_hf_dict(bad)
