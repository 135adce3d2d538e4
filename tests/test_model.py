"""Model-level properties: config validation, causality, output structure, parameter counts, YaRN numbers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax import Transformer, get_preset
from dsv3_jax.model.rope import inverse_frequencies
from train_utils import TEST_MODEL


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(num_experts_per_tok=5, topk_group=2), "num_experts_per_tok"),   # 2 groups of 2 cannot give 5
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(moe_impl="magic"), "moe_impl"),
    (dict(dtype="float8"), "dtype"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(n_routed_experts=0), "n_routed_experts"),
    (dict(n_routed_experts=8, n_group=8), "n_group"),                   # groups of one expert
])
def test_impossible_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        dataclasses.replace(TEST_MODEL, **changes)


def test_mesh_mismatch_names_both_numbers():
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.sharding import mesh_shape
    with pytest.raises(ValueError, match="12 devices.*8 devices"):
        mesh_shape(MeshConfig(data=3, expert=2, tensor=2), 8)
    with pytest.raises(ValueError, match="multiple of 3"):
        mesh_shape(MeshConfig(data=-1, expert=3), 8)


@pytest.fixture(scope="module")
def tiny_model():
    model = Transformer(TEST_MODEL)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), tokens)
    return model, variables, tokens


def test_output_structure(tiny_model):
    model, variables, tokens = tiny_model
    out = model.apply(variables, tokens)
    c = TEST_MODEL
    assert out.logits.shape == (2, 24, c.vocab_size) and out.logits.dtype == jnp.float32
    assert len(out.mtp_logits) == c.num_nextn_predict_layers
    assert out.moe_stats["moe_layers"]["expert_counts"].shape == (c.num_moe_layers, c.n_routed_experts)
    assert out.moe_stats["mtp_0"]["seq_counts"].shape == (2, c.n_routed_experts)
    # counts sum to tokens x K in every MoE layer
    np.testing.assert_array_equal(out.moe_stats["moe_layers"]["expert_counts"].sum(-1),
                                  [2 * 24 * c.num_experts_per_tok] * c.num_moe_layers)


def test_causality(tiny_model):
    """Logits (and MTP logits) at position t do not change when tokens after t change."""
    model, variables, tokens = tiny_model
    t = 10
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 256)
    a, b = model.apply(variables, tokens), model.apply(variables, changed)
    np.testing.assert_allclose(a.logits[:, :t + 1], b.logits[:, :t + 1], atol=1e-6)
    assert not np.allclose(a.logits[:, t + 1:], b.logits[:, t + 1:])
    # MTP depth 1 at position i reads token i+1: positions up to t-1 are unaffected
    np.testing.assert_allclose(a.mtp_logits[0][:, :t], b.mtp_logits[0][:, :t], atol=1e-6)


def test_yarn_frequencies_match_spec():
    """docs/architecture.md §3 (arXiv 2412.19437 §4.3): low = 10, high = 23 for V3; dims below low keep f_j, above high get f_j / 40."""
    cfg = get_preset("v3-671b")
    f = inverse_frequencies(cfg)
    base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(f[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-6)
    assert np.all(f[11:23] < base[11:23]) and np.all(f[11:23] > base[11:23] / 40)
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-6


def test_params_cli_v3():
    """`params --preset v3-671b --json`: 671.0B +-0.3%, activated 37.5B +-1%, MTP 11.6B, from eval_shape."""
    out = subprocess.run([sys.executable, "-m", "dsv3_jax", "params", "--preset", "v3-671b", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    counts = json.loads(out.stdout)
    assert abs(counts["total"] / 671.0e9 - 1) < 0.003
    assert abs(counts["activated"] / 37.5e9 - 1) < 0.01
    assert abs(counts["mtp"] / 11.6e9 - 1) < 0.01


def test_params_cli_counts_a_run_an_hf_config_and_overrides(tmp_path, capsys):
    """`params` counts the model of --preset, --run-dir or --hf-dir (their config.json only), after
    model.FIELD=VALUE overrides: the counts equal count_params of the config they describe, exactly (integer
    counts from shapes). Anything but one source, or a non-model override, is refused with exit 2."""
    from dsv3_jax.__main__ import main
    from dsv3_jax.config import run_preset, save_hf_config
    from dsv3_jax.params import count_params
    from dsv3_jax.train.checkpoint import save_run_config
    rc = run_preset("small")
    run_dir, hf_dir = tmp_path / "run", tmp_path / "hf"
    run_dir.mkdir(), hf_dir.mkdir()
    save_run_config(str(run_dir), rc)
    save_hf_config(str(hf_dir), rc.model.replace(num_hidden_layers=3))

    def counts(*argv):
        assert main(["params", "--json", *argv]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert counts("--run-dir", str(run_dir))["total"] == count_params(rc.model)["total"]
    hf = counts("--hf-dir", str(hf_dir))
    assert hf["hf_dir"] == str(hf_dir) and hf["total"] == count_params(rc.model.replace(num_hidden_layers=3))["total"]
    changed = counts("--preset", "small", "model.num_hidden_layers=2", "model.n_routed_experts=32")
    expected = count_params(rc.model.replace(num_hidden_layers=2, n_routed_experts=32))
    assert {k: changed[k] for k in expected} == expected != count_params(rc.model)
    for argv, message in ((["--preset", "small", "train.steps=3"], "only model.FIELD=VALUE overrides"),
                          ([], "give exactly one of --preset, --run-dir or --hf-dir"),
                          (["--preset", "small", "--hf-dir", str(hf_dir)], "give exactly one of"),
                          (["--hf-dir", str(run_dir)], "not a Hugging Face checkpoint")):
        assert main(["params", *argv]) == 2
        assert message in capsys.readouterr().err, argv


def test_hf_config_names():
    """Fields carry the HF config.json names, and a released-style dict maps onto the preset."""
    from dsv3_jax.config import from_hf_dict, to_hf_dict
    cfg = get_preset("v3-671b")
    back = from_hf_dict(to_hf_dict(cfg))
    assert back == cfg


@pytest.mark.parametrize("padded", [False, True])
def test_attention_core_gradients_match_autodiff(padded):
    """The hand-written backward of `attention_core` against autodiff of the plain formula, fp32, with a
    causal mask and (padded) a row of keys masked for one sequence. 1e-5 relative: both are fp32 sums of
    at most 16 terms of O(1) values; a wrong term (e.g. a missing softmax-backward row sum) is O(1)."""
    from dsv3_jax.model.mla import attention_core, attention_softmax
    r = np.random.default_rng(0)
    b, h, t, k, v = 2, 3, 16, 12, 8
    q, kk, vv = (jnp.asarray(r.normal(size=s), jnp.float32) for s in ((b, h, t, k), (b, h, t, k), (b, h, t, v)))
    pos = jnp.arange(t)
    mask = jnp.broadcast_to(pos[:, None] >= pos[None, :], (b, 1, t, t))
    if padded:
        mask = mask & (pos < t - 3)[None, None, None, :].at[0].set(True)
    ct = jnp.asarray(r.normal(size=(b, h, t, v)), jnp.float32)

    def plain(q, kk, vv):
        p = attention_softmax(jnp.einsum("BHTK,BHSK->BHTS", q, kk), mask)
        return jnp.einsum("BHTS,BHSV->BHTV", p, vv)

    ours = jax.grad(lambda *a: (attention_core(*a, mask) * ct).sum(), (0, 1, 2))(q, kk, vv)
    ref = jax.grad(lambda *a: (plain(*a) * ct).sum(), (0, 1, 2))(q, kk, vv)
    np.testing.assert_allclose(attention_core(q, kk, vv, mask), plain(q, kk, vv), rtol=1e-5, atol=1e-6)
    for a, e in zip(ours, ref):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def remat_case():
    cfg = get_preset("tiny").replace(scan_unroll=1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    return cfg, tokens, jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)


def _remat_loss(case, policy):
    cfg, tokens, variables = case
    model = Transformer(cfg.replace(remat_policy=policy))
    return lambda p: model.apply({**variables, "params": p}, tokens, mtp=False).logits.std()


def test_named_remat_policies_save_what_they_name(capsys, remat_case):
    """`paper` stacks the tagged activations per layer (the MLA down-projection output [L,B,T,Q+C+R] among
    them; RMSNorm outputs and up-projections are recomputed, arXiv 2412.19437 section 3.2.3),
    `offload_inputs` keeps the layer inputs in host memory, `paper_offload` both in host memory, `full`
    neither (read from jax's list of saved residuals; tracing only)."""
    cfg, _, variables = remat_case
    saved = {}
    for policy in ("full", "offload_inputs", "paper", "paper_offload"):
        jax.ad_checkpoint.print_saved_residuals(_remat_loss(remat_case, policy), variables["params"])
        saved[policy] = capsys.readouterr().out
    layers, width = cfg.num_moe_layers, cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim
    down, inputs = f"[{layers},2,16,{width}]", f"[{layers},2,16,{cfg.hidden_size}]"
    assert f"f32{down}" in saved["paper"] and down not in saved["full"] + saved["offload_inputs"]
    assert f"f32<host>{inputs}" in saved["offload_inputs"] and "<host>" not in saved["full"] + saved["paper"]
    assert f"f32<host>{inputs}" in saved["paper_offload"] and f"f32<host>{down}" in saved["paper_offload"]


@pytest.mark.slow
def test_named_remat_policies_keep_gradients(remat_case):
    """`paper_offload` (named saves and host offload together) gives the gradients of no remat: the backward
    recomputes the same ops (fp32; tolerance 1e-6 of the largest gradient)."""
    params = remat_case[2]["params"]
    want = jax.jit(jax.grad(_remat_loss(remat_case, "none")))(params)
    got = jax.jit(jax.grad(_remat_loss(remat_case, "paper_offload")))(params)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    assert err <= 1e-6 * scale, err
