"""Numerical parity with Hugging Face transformers' DeepseekV3ForCausalLM through the checkpoint format.

Our random tiny models are written with `dsv3_jax.hf.save_checkpoint`, loaded by transformers (fp32, eval)
and by our `load_checkpoint`, and the main logits compared. The MTP module (which transformers drops on
load) is checked against an independent torch reference built from the checkpoint's layer
`num_hidden_layers` tensors around transformers' own `DeepseekV3DecoderLayer`.

Tolerance: 1e-4 max abs on logits of magnitude ~1. Both sides compute in fp32 but round differently (XLA vs
torch matmul/einsum order, rsqrt, softmax, sigmoid, YaRN frequencies computed as f/s vs 1/(s*b^x)); over 2-3
layers those rounding differences are ~1e-7..1e-6 relative. 1e-4 is far above that noise yet far below
what a layout error (a transposed/permuted weight, a wrong rope pair, a mis-masked group, a missing bias,
a wrong softmax scale) produces: such errors move the logits by 1e-2..1, as the bias/group checks show.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402  (after conftest set XLA_FLAGS / JAX_PLATFORMS)
import jax.numpy as jnp  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer  # noqa: E402

from dsv3_jax.config import PRESETS, ModelConfig, RopeScaling, to_hf_dict  # noqa: E402
from dsv3_jax.hf import load_checkpoint, save_checkpoint  # noqa: E402
from dsv3_jax.model import Transformer  # noqa: E402

transformers.logging.set_verbosity_error()   # transformers reports the MTP layer as "unexpected": it drops it
torch.set_num_threads(2)

TOL = 1e-4

CONFIGS = {
    # q_lora set, group-limited routing (4 groups, keep 2), biases ~5 with mixed signs, YaRN with
    # T=40 > original_max_position_embeddings=16, one dense layer then two MoE layers, MTP depth 1.
    "qlora_groups_yarn": (ModelConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=3, n_group=4, topk_group=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, num_nextn_predict_layers=1,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16), initializer_range=0.05),
        40),
    # Full-rank queries (q_lora_rank None), every layer MoE, 2 groups keep 1, 2 shared experts, no top-k
    # normalisation, another scaling factor, plain RoPE, MTP depth 1.
    "noqlora_allmoe": (ModelConfig(
        vocab_size=80, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=3, first_k_dense_replace=0, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
        q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_scaling=None, rope_theta=500.0, max_position_embeddings=64, num_nextn_predict_layers=1,
        initializer_range=0.05),
        24),
    # Dense only, no MTP; YaRN with mscale != mscale_all_dim (a non-trivial cos/sin factor) and T=32 > 8.
    "dense_only_yarn_mscale": (ModelConfig(
        vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
        first_k_dense_replace=2, num_nextn_predict_layers=0, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8, mscale=1.0, mscale_all_dim=0.8),
        rope_theta=20000.0, initializer_range=0.05),
        32),
}


def capture_last_block(model):
    """Forward hook on the last decoder layer: its output is h^0 (before the final norm)."""
    store = {}

    def hook(_module, _inputs, output):
        store["h0"] = (output[0] if isinstance(output, tuple) else output).detach().clone()
    return store, model.model.layers[-1].register_forward_hook(hook)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory, random_variables):
    cfg, t = CONFIGS[request.param]
    path = str(tmp_path_factory.mktemp(request.param))
    v = random_variables(cfg)
    save_checkpoint(path, cfg, v)
    cfg2, ours = load_checkpoint(path)
    assert cfg2 == cfg
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, t)).astype(np.int32)
    out = jax.jit(Transformer(cfg2).apply)(ours, jnp.asarray(tokens))

    model = DeepseekV3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert model.model.rotary_emb.rope_type == ("default" if cfg.rope_scaling is None else "yarn")
    store, handle = capture_last_block(model)
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    handle.remove()
    return dict(name=request.param, cfg=cfg, path=path, vars=ours, tokens=tokens, out=out, model=model,
                hf_logits=hf_logits, h0=store["h0"])


def test_main_logits_match_transformers(case):
    ours = np.asarray(case["out"].logits)
    diff = np.abs(ours - case["hf_logits"]).max()
    print(f"\n[{case['name']}] max |logits diff| = {diff:.3g} (|logits| max {np.abs(ours).max():.3g})")
    assert ours.shape == case["hf_logits"].shape
    assert np.abs(ours).max() > 0.1                        # a non-trivial signal
    assert diff <= TOL
    # h^0 (our `hidden`) is the last block's output before the final norm, as transformers computes it.
    assert np.abs(np.asarray(case["out"].hidden) - case["h0"].numpy()).max() <= TOL


def test_router_bias_and_groups_change_the_answer(case):
    """The agreement above is only meaningful if the biases (~5, mixed signs) and the group limit actually
    steer the routing: ablating either on the transformers side must move its logits far outside the
    tolerance (so our implementation of both is what matched)."""
    cfg = case["cfg"]
    if cfg.num_moe_layers == 0:
        pytest.skip("dense-only config has no router")
    model = case["model"]
    gates = [layer.mlp.gate for layer in model.model.layers[cfg.first_k_dense_replace:]]
    tokens = torch.from_numpy(case["tokens"].astype(np.int64))

    def hf_diff():
        with torch.no_grad():
            return np.abs(model(tokens).logits.numpy() - np.asarray(case["out"].logits)).max()

    saved = [g.e_score_correction_bias.clone() for g in gates]
    for g in gates:
        g.e_score_correction_bias.zero_()
    d_bias = hf_diff()
    for g, b in zip(gates, saved):
        g.e_score_correction_bias.copy_(b)
        g.topk_group = g.num_group                                   # no group limit
    d_group = hf_diff()
    for g in gates:
        g.topk_group = cfg.topk_group
    assert hf_diff() <= TOL                                          # restored
    print(f"\n[{case['name']}] transformers without biases: {d_bias:.3g}; without group limit: {d_group:.3g}")
    assert d_bias > 100 * TOL
    assert d_group > 100 * TOL


def _checkpoint_tensors(path: str, prefix: str) -> dict:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as st:
                out.update({k[len(prefix):]: st.get_tensor(k) for k in st.keys() if k.startswith(prefix)})
    return out


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_matches_independent_reference(case):
    """MTP depth 1 at position i: h' = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h^0_i)]), a full MoE block at the
    original positions (causal), shared_head.norm, then the (shared) head predicts t_{i+2}."""
    cfg = case["cfg"]
    if cfg.num_nextn_predict_layers == 0:
        pytest.skip("no MTP module")
    n = cfg.num_hidden_layers
    w = _checkpoint_tensors(case["path"], f"model.layers.{n}.")
    model = case["model"]
    hcfg = model.config
    block = DeepseekV3DecoderLayer(hcfg, layer_idx=n).eval()         # layer_idx >= first_k_dense: MoE
    sd = {k: v for k, v in w.items()
          if not k.startswith(("enorm", "hnorm", "eh_proj", "shared_head", "embed_tokens", "mlp.experts."))}
    e = cfg.n_routed_experts
    sd["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([w[f"mlp.experts.{i}.gate_proj.weight"], w[f"mlp.experts.{i}.up_proj.weight"]]) for i in range(e)])
    sd["mlp.experts.down_proj"] = torch.stack([w[f"mlp.experts.{i}.down_proj.weight"] for i in range(e)])
    block.load_state_dict(sd, strict=True)
    # The checkpoint's copies of the embedding and head are the main ones.
    assert torch.equal(w["embed_tokens.weight"], model.model.embed_tokens.weight)
    assert torch.equal(w["shared_head.head.weight"], model.lm_head.weight)

    eps = cfg.rms_norm_eps
    tokens = torch.from_numpy(case["tokens"].astype(np.int64))
    b, t = tokens.shape
    with torch.no_grad():
        emb = model.model.embed_tokens(tokens[:, 1:])                 # Emb(t_{i+1}), i = 0..T-2
        h0 = case["h0"][:, :-1]
        x = torch.cat([_rms(emb, w["enorm.weight"], eps), _rms(h0, w["hnorm.weight"], eps)], -1)
        x = x @ w["eh_proj.weight"].T
        pos = torch.arange(t - 1)[None].expand(b, -1)                 # original positions, no shift
        cos_sin = model.model.rotary_emb(x, pos)
        mask = torch.full((t - 1, t - 1), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, -1, -1)
        hk = block(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        ref = (_rms(hk, w["shared_head.norm.weight"], eps) @ w["shared_head.head.weight"].T).numpy()

    ours = np.asarray(case["out"].mtp_logits[0])[:, :t - 1]
    diff = np.abs(ours - ref).max()
    print(f"\n[{case['name']}] MTP max |logits diff| = {diff:.3g} (|logits| max {np.abs(ref).max():.3g})")
    assert np.abs(ref).max() > 0.1
    assert diff <= TOL


@pytest.mark.parametrize("name", ["v3-671b", "tiny"])
def test_to_hf_dict_loads_in_transformers(name, tmp_path):
    cfg = PRESETS[name]
    hc = DeepseekV3Config(**to_hf_dict(cfg))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "n_routed_experts", "n_group",
                "topk_group", "num_experts_per_tok", "q_lora_rank", "kv_lora_rank", "first_k_dense_replace",
                "routed_scaling_factor", "moe_intermediate_size", "intermediate_size", "vocab_size"):
        assert getattr(hc, key) == getattr(cfg, key), key
    assert hc.num_key_value_heads == cfg.num_attention_heads
    assert hc.num_nextn_predict_layers == cfg.num_nextn_predict_layers
    assert hc.rope_interleave is True
    rp = hc.rope_parameters
    assert rp["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling is None:
        assert rp["rope_type"] == "default"
    else:
        assert rp["rope_type"] == "yarn" and rp["factor"] == cfg.rope_scaling.factor
        assert rp["original_max_position_embeddings"] == cfg.rope_scaling.original_max_position_embeddings
        assert rp["mscale_all_dim"] == cfg.rope_scaling.mscale_all_dim
    # And through a directory, the way from_pretrained reads it.
    from dsv3_jax.config import save_hf_config
    save_hf_config(str(tmp_path), cfg)
    assert DeepseekV3Config.from_pretrained(str(tmp_path)).hidden_size == cfg.hidden_size


def test_load_transformers_save_pretrained(tmp_path):
    """The other direction: a transformers-built (randomly initialised) model, written by its own
    save_pretrained (per-expert names, rope_parameters, no MTP tensors but num_nextn_predict_layers: 1 in
    config.json), loads with our loader without an override: the same config less the MTP module (with a
    warning saying so), and the same logits."""
    cfg = CONFIGS["qlora_groups_yarn"][0]
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**to_hf_dict(cfg))).eval()
    g = torch.Generator().manual_seed(0)
    e, per = cfg.n_routed_experts, cfg.n_routed_experts // cfg.n_group
    with torch.no_grad():
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            signs = torch.cat([torch.tensor([1.0, -1.0] * (per // 2))[torch.randperm(per, generator=g)]
                               for _ in range(cfg.n_group)])
            layer.mlp.gate.e_score_correction_bias.copy_(5 * signs + torch.rand(e, generator=g) - 0.5)
            layer.mlp.gate.weight.normal_(0, 2 / cfg.hidden_size ** 0.5, generator=g)
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json") as fh:
        assert json.load(fh)["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match="no MTP module"):
        cfg2, v = load_checkpoint(str(tmp_path))
    assert cfg2 == cfg.replace(num_nextn_predict_layers=0)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 40)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(jax.jit(Transformer(cfg2).apply)(v, jnp.asarray(tokens, jnp.int32)).logits)
    diff = np.abs(ours - ref).max()
    print(f"\n[transformers save_pretrained -> ours] max |logits diff| = {diff:.3g} "
          f"(|logits| max {np.abs(ref).max():.3g})")
    assert np.abs(ref).max() > 0.1
    assert diff <= TOL
