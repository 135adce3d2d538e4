"""HF checkpoint I/O (dsv3_jax/hf.py): exact round trips, sharding, FP8 and bf16 checkpoints, the released
and the transformers-5.x config.json, and error reporting. No torch needed except where marked."""

import json
import math
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from flax.core import meta

from dsv3_jax.config import PRESETS, ModelConfig, RopeScaling, load_hf_config
from dsv3_jax.hf import (INDEX_FILE, dequantize_fp8, hf_tensor_names, load_checkpoint, quantize_fp8,
                         read_safetensors_header, save_checkpoint, write_fp8_checkpoint)
from dsv3_jax.model import Transformer

# One dense layer, two MoE layers, MTP depth 1, fused low-rank queries, grouped routing, YaRN.
CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, first_k_dense_replace=1, n_routed_experts=8, n_shared_experts=1,
    num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, num_nextn_predict_layers=1,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16), initializer_range=0.05)

# Shapes that are not multiples of the 128 FP8 block (hidden 200, kv_lora 72, ...): edge blocks everywhere.
FP8_CFG = ModelConfig(
    vocab_size=96, hidden_size=200, intermediate_size=264, moe_intermediate_size=136, num_hidden_layers=2,
    num_attention_heads=2, first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1,
    num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=136, kv_lora_rank=72, qk_nope_head_dim=24,
    qk_rope_head_dim=16, v_head_dim=40, rope_scaling=None, max_position_embeddings=64,
    num_nextn_predict_layers=1, initializer_range=0.05)


def flat(v):
    return traverse_util.flatten_dict(meta.unbox(v))


def assert_same_tree(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].shape == fb[k].shape and fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def assert_shaped_like_init(cfg, v):
    """Same tree, shapes and dtypes as Transformer(cfg).init(...) unboxed (jax.eval_shape, no compute)."""
    want = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    want = meta.unbox(want)
    assert jax.tree.structure(want) == jax.tree.structure(v)
    for (k, a), (_, b) in zip(flat(want).items(), flat(v).items()):
        assert (a.shape, np.dtype(a.dtype)) == (b.shape, b.dtype), k
        assert isinstance(b, np.ndarray)


def header_of(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            header = read_safetensors_header(os.path.join(path, f))[0]
            out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return out


def tensors_of(path):
    """All tensors of a checkpoint dir via safetensors' numpy reader (not our reader)."""
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def rewrite(path, fn):
    """Rewrite the single-file checkpoint in `path` through fn(dict name -> numpy array) (safetensors numpy)."""
    from safetensors.numpy import save_file
    f = os.path.join(path, "model.safetensors")
    t = tensors_of(path)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory, random_variables):
    path = str(tmp_path_factory.mktemp("ckpt"))
    v = random_variables(CFG, seed=3)
    save_checkpoint(path, CFG, v)
    return path, v


# ----------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_exact_unsharded_and_sharded(saved, tmp_path):
    path, v = saved
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    cfg, v1 = load_checkpoint(path)
    assert cfg == CFG
    assert_shaped_like_init(cfg, v1)
    assert_same_tree(v, v1)

    # Sharded: several files, an index covering every tensor, same values.
    sharded = str(tmp_path / "sharded")
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(v1))
    save_checkpoint(sharded, cfg, v1, shard_size_bytes=total // 5)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) >= 4 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(sharded, INDEX_FILE)) as fh:
        index = json.load(fh)
    names = hf_tensor_names(cfg)
    assert sorted(index["weight_map"]) == sorted(names) == sorted(header_of(path))
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(s)) * 4 for _, s in header_of(sharded).values())
    cfg2, v2 = load_checkpoint(sharded)
    assert cfg2 == cfg
    assert_same_tree(v1, v2)

    # Without the index json (glob of *.safetensors), and the re-saved tensors are bit-identical.
    os.remove(os.path.join(sharded, INDEX_FILE))
    assert_same_tree(v1, load_checkpoint(sharded)[1])
    again = str(tmp_path / "again")
    save_checkpoint(again, cfg2, v2)
    t0, t1 = tensors_of(path), tensors_of(again)
    assert sorted(t0) == sorted(t1)
    for k in t0:
        assert t0[k].dtype == t1[k].dtype
        np.testing.assert_array_equal(t0[k], t1[k], err_msg=k)


def test_released_names_shapes_and_mtp_copies(saved):
    path, v = saved
    h = header_of(path)
    c = CFG
    d, n = c.hidden_size, c.num_hidden_layers
    assert h["model.embed_tokens.weight"] == ("F32", (c.vocab_size, d))
    assert h["lm_head.weight"] == ("F32", (c.vocab_size, d))
    assert h["model.layers.0.mlp.gate_proj.weight"] == ("F32", (c.intermediate_size, d))
    assert h["model.layers.1.self_attn.q_a_proj.weight"] == ("F32", (c.q_lora_rank, d))
    assert h["model.layers.1.self_attn.q_b_proj.weight"] == ("F32", (c.num_attention_heads * c.qk_head_dim,
                                                                      c.q_lora_rank))
    assert h["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"] == ("F32", (c.kv_lora_rank + c.qk_rope_head_dim, d))
    assert h["model.layers.2.mlp.experts.7.down_proj.weight"] == ("F32", (d, c.moe_intermediate_size))
    assert h["model.layers.2.mlp.gate.weight"] == ("F32", (c.n_routed_experts, d))
    assert h["model.layers.2.mlp.gate.e_score_correction_bias"] == ("F32", (c.n_routed_experts,))
    for k in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        assert h[f"model.layers.{n}.{k}"] == ("F32", (d,))
    assert h[f"model.layers.{n}.eh_proj.weight"] == ("F32", (d, 2 * d))
    assert f"model.layers.{n}.mlp.experts.0.gate_proj.weight" in h
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in h)
    t = tensors_of(path)
    np.testing.assert_array_equal(t[f"model.layers.{n}.embed_tokens.weight"], t["model.embed_tokens.weight"])
    np.testing.assert_array_equal(t[f"model.layers.{n}.shared_head.head.weight"], t["lm_head.weight"])
    # Spot-check the layout conventions against the variables directly.
    p = v["params"]
    np.testing.assert_array_equal(t["lm_head.weight"], p["lm_head"].T)
    np.testing.assert_array_equal(t["model.layers.2.mlp.gate.e_score_correction_bias"],
                                  v["router_state"]["moe_layers"]["layers"]["moe"]["router_bias"][1])
    np.testing.assert_array_equal(t["model.layers.2.mlp.experts.5.up_proj.weight"],
                                  p["moe_layers"]["layers"]["moe"]["experts_gate_up"][1, 5, :, 1, :].T)
    np.testing.assert_array_equal(t["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"],
                                  p["moe_layers"]["layers"]["attn"]["q_kv_a_proj"][0, :, c.q_lora_rank:].T)
    np.testing.assert_array_equal(t["model.layers.0.self_attn.o_proj.weight"],
                                  p["dense_layers"]["layers"]["attn"]["o_proj"][0].reshape(-1, d).T)


def test_mtp_copy_mismatch_warns(saved, tmp_path):
    path = str(tmp_path / "c")
    shutil.copytree(saved[0], path)
    n = CFG.num_hidden_layers
    rewrite(path, lambda t: t.__setitem__(f"model.layers.{n}.embed_tokens.weight",
                                          t[f"model.layers.{n}.embed_tokens.weight"] + 1))
    with pytest.warns(UserWarning, match=f"model.layers.{n}.embed_tokens.weight differs"):
        _, v = load_checkpoint(path)
    assert_same_tree(saved[1], v)                           # the main embedding is what is used


def test_load_fewer_mtp_modules_by_override(saved):
    cfg, v = load_checkpoint(saved[0], num_nextn_predict_layers=0, moe_impl="ragged")
    assert cfg.num_nextn_predict_layers == 0 and cfg.moe_impl == "ragged"
    assert_shaped_like_init(cfg, v)
    assert not any(k.startswith("mtp_") for k in v["params"])


def test_transformers_fused_expert_names(saved, tmp_path):
    """transformers-5.x in-memory expert layout (gate_up_proj [E,2F,D], down_proj [E,D,F]) is accepted."""
    path = str(tmp_path / "fused")
    shutil.copytree(saved[0], path)

    def fuse(t):
        for layer in range(CFG.first_k_dense_replace, CFG.num_hidden_layers + CFG.num_nextn_predict_layers):
            p = f"model.layers.{layer}.mlp.experts."
            e = range(CFG.n_routed_experts)
            t[p + "gate_up_proj"] = np.stack([np.concatenate([t.pop(f"{p}{i}.gate_proj.weight"),
                                                              t.pop(f"{p}{i}.up_proj.weight")]) for i in e])
            t[p + "down_proj"] = np.stack([t.pop(f"{p}{i}.down_proj.weight") for i in e])
    rewrite(path, fuse)
    assert "model.layers.1.mlp.experts.gate_up_proj" in header_of(path)
    cfg, v = load_checkpoint(path)
    assert_same_tree(saved[1], v)


def test_v3_671b_layout_covers_every_parameter():
    """The name map for the full V3 config (shapes only): the HF tensors hold exactly our parameters
    (671.0B main + 11.6B MTP), plus the MTP copies of embedding and head (685B in the released files)."""
    from dsv3_jax import hf_layout
    cfg = PRESETS["v3-671b"]
    template = hf_layout.template(cfg)
    layout = hf_layout.layout(cfg)
    assert {e.leaf for e in layout.values()} == set(template)
    per_leaf = {}
    for e in layout.values():
        if e.dup_of is None:
            per_leaf[e.leaf] = per_leaf.get(e.leaf, 0) + int(np.prod(e.hf_shape))
    assert per_leaf == {k: int(np.prod(v.shape)) for k, v in template.items()}
    total = sum(per_leaf.values())
    assert round(total / 1e9, 1) == 682.6
    assert round(sum(int(np.prod(e.hf_shape)) for e in layout.values()) / 1e9) == 684
    assert "model.layers.61.mlp.experts.255.down_proj.weight" in layout
    assert "model.layers.2.mlp.down_proj.weight" in layout and "model.layers.3.mlp.gate.weight" in layout


# ----------------------------------------------------------------------------------------------------------
# FP8 and bf16


def test_fp8_quantise_dequantise_helpers():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (200, 72)).astype(np.float32)
    w[130:, :] *= 10                                         # blocks with different ranges
    q, s = quantize_fp8(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == w.shape and s.shape == (2, 1)
    d = dequantize_fp8(q, s)
    ref = q.astype(np.float32) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:200, :72]
    np.testing.assert_array_equal(d, ref)
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 of each value (normals), and at most
    # half the subnormal step (2^-10 * scale) near zero.
    bound = np.maximum(np.abs(w) * 2.0 ** -4, 2.0 ** -10 * np.repeat(s, 128, 0)[:200, :1])
    assert np.all(np.abs(d - w) <= bound * 1.0001)
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8(q, s[:1])


def test_fp8_checkpoint_loads_dequantised(tmp_path, random_variables):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    path = str(tmp_path / "fp8")
    v = random_variables(FP8_CFG, seed=5)
    write_fp8_checkpoint(path, FP8_CFG, v, shard_size_bytes=200_000)
    with open(os.path.join(path, "config.json")) as fh:
        assert json.load(fh)["quantization_config"]["weight_block_size"] == [128, 128]
    h = header_of(path)
    n = FP8_CFG.num_hidden_layers
    assert h["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == ("F8_E4M3", (72 + 16, 200))
    assert h["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ("F32", (1, 2))
    assert h["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"] == ("F32", (2, 2))
    assert h["model.layers.0.mlp.gate_proj.weight_scale_inv"] == ("F32", (3, 2))
    assert h["model.embed_tokens.weight"][0] == "BF16" and h["model.norm.weight"][0] == "BF16"
    assert h["model.layers.1.mlp.gate.weight"][0] == "F32"
    assert h["model.layers.1.mlp.gate.e_score_correction_bias"][0] == "F32"
    assert h[f"model.layers.{n}.eh_proj.weight"][0] == "BF16"                   # as released
    assert h[f"model.layers.{n}.self_attn.o_proj.weight"][0] == "F8_E4M3"

    cfg, loaded = load_checkpoint(path)
    assert cfg == FP8_CFG
    assert_shaped_like_init(cfg, loaded)
    # Independent reference: read the stored e4m3 values and scales with torch, dequantise in numpy.
    # Our loaded values, written back as fp32, must equal it within fp32 rounding of the product.
    back = str(tmp_path / "back")
    save_checkpoint(back, cfg, loaded)
    ours = tensors_of(back)
    seen_fp8 = 0
    for f in sorted(os.listdir(path)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, f), framework="pt") as st:
            for name in st.keys():
                if name.endswith("_scale_inv"):
                    continue
                x = st.get_tensor(name)
                if x.dtype == torch.float8_e4m3fn:
                    seen_fp8 += 1
                    w8 = x.float().numpy()
                    sname = name + "_scale_inv"
                    sf = [g for g in os.listdir(path) if g.endswith(".safetensors")
                          and sname in read_safetensors_header(os.path.join(path, g))[0]][0]
                    with safe_open(os.path.join(path, sf), framework="pt") as st2:
                        s = st2.get_tensor(sname).numpy()
                    o, i = w8.shape
                    assert s.shape == (math.ceil(o / 128), math.ceil(i / 128))
                    ref = w8 * np.kron(s, np.ones((128, 128), np.float32))[:o, :i]
                    np.testing.assert_allclose(ours[name], ref, rtol=2.0 ** -23, atol=0, err_msg=name)
                else:
                    ref = x.float().numpy()
                    np.testing.assert_array_equal(ours[name], ref, err_msg=name)
    assert seen_fp8 > 20
    # And the dequantised model is close to the original (e4m3 precision), non-FP8 tensors bf16-exact.
    po, pl = v["params"], loaded["params"]
    w, d = po["moe_layers"]["layers"]["moe"]["experts_gate_up"], pl["moe_layers"]["layers"]["moe"]["experts_gate_up"]
    assert np.abs(d - w).max() <= np.abs(w).max() * 2.0 ** -4
    np.testing.assert_array_equal(pl["embedding"], po["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(pl["moe_layers"]["layers"]["moe"]["router"],
                                  po["moe_layers"]["layers"]["moe"]["router"])
    np.testing.assert_array_equal(loaded["router_state"]["moe_layers"]["layers"]["moe"]["router_bias"],
                                  v["router_state"]["moe_layers"]["layers"]["moe"]["router_bias"])


def test_bf16_checkpoint(saved, tmp_path):
    _, v = saved
    path = str(tmp_path / "bf16")
    save_checkpoint(path, CFG, v, dtype="bfloat16")
    h = header_of(path)
    fp32 = ("mlp.gate.weight", "e_score_correction_bias")
    assert {dt for k, (dt, _) in h.items() if not k.endswith(fp32)} == {"BF16"}
    assert {dt for k, (dt, _) in h.items() if k.endswith(fp32)} == {"F32"}
    bf = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16)  # noqa: E731
    fv = flat(v)
    _, v32 = load_checkpoint(path)
    for k, x in flat(v32).items():
        keep = k[-1] in ("router", "router_bias")
        want = np.asarray(fv[k]) if keep else bf(fv[k]).astype(np.float32)
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, want, err_msg="/".join(k))
    _, v16 = load_checkpoint(path, dtype=jnp.bfloat16)
    for k, x in flat(v16).items():
        assert x.dtype == (np.float32 if k[-1] in ("router", "router_bias") else ml_dtypes.bfloat16), k
        np.testing.assert_array_equal(x.astype(np.float32), flat(v32)[k], err_msg="/".join(k))


# ----------------------------------------------------------------------------------------------------------
# Errors: everything wrong is reported at once.


def test_all_problems_in_one_error(saved, tmp_path):
    path = str(tmp_path / "bad")
    shutil.copytree(saved[0], path)
    missing = "model.layers.0.self_attn.kv_b_proj.weight"
    unexpected = "model.layers.0.self_attn.rotary_emb.inv_freq"
    bad_shape = "model.layers.1.mlp.experts.2.up_proj.weight"
    bad_dtype = "model.layers.1.post_attention_layernorm.weight"
    bad_bias = "model.layers.2.mlp.gate.e_score_correction_bias"

    def damage(t):
        del t[missing]
        t[unexpected] = np.zeros(2, np.float32)
        t[bad_shape] = t[bad_shape][:-1]
        t[bad_dtype] = t[bad_dtype].astype(np.int32)
        t[bad_bias] = t[bad_bias].astype(ml_dtypes.bfloat16)
    rewrite(path, damage)
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    hf["intermediate_size"] = 40                             # config mismatch (dense layer tensors are 48)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    print(msg)
    assert f"missing tensor: {missing}" in msg
    assert f"unexpected tensor: {unexpected}" in msg
    assert f"wrong shape: {bad_shape} is [15, 32], expected [16, 32]" in msg
    assert f"wrong dtype: {bad_dtype} is I32" in msg
    assert f"wrong dtype: {bad_bias} is BF16" in msg
    assert "config mismatch: intermediate_size=40" in msg and "imply 48" in msg
    assert "wrong shape: model.layers.0.mlp.gate_proj.weight is [48, 32], expected [40, 32]" in msg
    assert msg.count("\n  - ") == 9                          # the 9 problems, one line each


def test_fp8_scale_problems(tmp_path, random_variables):
    path = str(tmp_path / "fp8")
    v = random_variables(FP8_CFG, seed=1)
    write_fp8_checkpoint(path, FP8_CFG, v)
    w = "model.layers.0.self_attn.o_proj.weight"
    q = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"
    norm = "model.norm.weight"
    raw = _raw_tensors(path)
    del raw[w + "_scale_inv"]
    raw[q] = (raw[q][0], [1, 1], raw[q][2][:4])               # wrong number of blocks
    raw["model.norm.weight_scale_inv"] = ("F32", [1, 1], b"\0" * 4)   # a scale for a non-FP8 tensor
    raw[norm] = ("F8_E4M3", raw[norm][1], raw[norm][2][:FP8_CFG.hidden_size])   # FP8 where not allowed
    _write_raw(os.path.join(path, "model.safetensors"), raw)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f"missing tensor: {w}_scale_inv" in msg
    assert f"wrong shape: {q} is [1, 1], expected [1, 2]" in msg
    assert "unexpected tensor: model.norm.weight_scale_inv" in msg
    assert f"wrong dtype: {norm} is F8_E4M3" in msg


def _raw_tensors(path):
    f = os.path.join(path, "model.safetensors")
    header, start = read_safetensors_header(f)
    data = open(f, "rb").read()[start:]
    return {k: (h["dtype"], h["shape"], data[h["data_offsets"][0]:h["data_offsets"][1]]) for k, h in header.items()}


def _write_raw(f, tensors):
    header, off, blobs = {}, 0, []
    for k, (dt, shape, blob) in tensors.items():
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(blob)]}
        off += len(blob)
        blobs.append(blob)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))


def test_checkpoint_without_mtp_loads_with_a_warning(saved, tmp_path):
    """What transformers' save_pretrained writes: no layer num_hidden_layers, but config.json still says
    num_nextn_predict_layers: 1. It loads without an override (main model exact, MTP absent, a warning);
    an MTP layer that is only partly there is still an error."""
    path = str(tmp_path / "nomtp")
    shutil.copytree(saved[0], path)
    n = CFG.num_hidden_layers
    rewrite(path, lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{n}.")])
    with pytest.warns(UserWarning, match=f"no MTP module \\(no model.layers.{n}"):
        cfg, v = load_checkpoint(path)
    assert cfg == CFG.replace(num_nextn_predict_layers=0)
    want = flat(saved[1])
    for k, x in flat(v).items():
        np.testing.assert_array_equal(x, want[k], err_msg="/".join(k))
    partial = str(tmp_path / "partial")
    shutil.copytree(saved[0], partial)
    rewrite(partial, lambda t: t.pop(f"model.layers.{n}.eh_proj.weight"))
    with pytest.raises(ValueError, match=f"missing tensor: model.layers.{n}.eh_proj.weight"):
        load_checkpoint(partial)


def test_missing_shard_and_bad_variables(saved, tmp_path):
    path = str(tmp_path / "sh")
    _, v = load_checkpoint(saved[0])
    save_checkpoint(path, CFG, v, shard_size_bytes=20_000)
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    os.remove(os.path.join(path, files[1]))
    with pytest.raises(ValueError, match=f"missing file: {files[1]}"):
        load_checkpoint(path)
    bad = jax.tree.map(lambda x: x, v)
    bad["params"]["lm_head"] = bad["params"]["lm_head"][:, :-1]
    del bad["params"]["final_norm"]
    with pytest.raises(ValueError) as info:
        save_checkpoint(str(tmp_path / "x"), CFG, bad)
    assert "wrong shape: params/lm_head" in str(info.value)
    assert "missing variable: params/final_norm/scale" in str(info.value)


# ----------------------------------------------------------------------------------------------------------
# config.json


RELEASED_CONFIG = {   # DeepSeek-V3's published config.json (deepseek-ai/DeepSeek-V3), field for field
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

# Fields that are not in HF's config, plus initializer_range: the released file carries the HF default
# 0.02 while the preset follows the paper's 0.006 (it never affects a loaded model).
NOT_COMPARED = {"dtype", "param_dtype", "moe_impl", "moe_block_size", "remat_policy", "scan_unroll",
                "initializer_range"}


def test_released_config_json_gives_the_v3_preset(tmp_path):
    with open(tmp_path / "config.json", "w") as fh:
        json.dump(RELEASED_CONFIG, fh, indent=2)
    got, want = load_hf_config(str(tmp_path)), PRESETS["v3-671b"]
    for f in ModelConfig.__dataclass_fields__:
        if f not in NOT_COMPARED:
            assert getattr(got, f) == getattr(want, f), f
    assert got.softmax_scale == pytest.approx(0.1352338, rel=1e-6)


def test_transformers_5_config_with_rope_parameters(tmp_path):
    transformers = pytest.importorskip("transformers")
    yarn = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.9, "mscale_all_dim": 0.8}
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=2, n_group=4, topk_group=2, q_lora_rank=None, kv_lora_rank=8,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, first_k_dense_replace=1,
              max_position_embeddings=64, num_mtp_layers=0, routed_scaling_factor=1.5)
    transformers.DeepseekV3Config(rope_parameters=yarn, **kw).save_pretrained(str(tmp_path / "a"))
    with open(tmp_path / "a" / "config.json") as fh:
        assert "rope_parameters" in json.load(fh)
    got = load_hf_config(str(tmp_path / "a"))
    want = ModelConfig(**{k: v for k, v in kw.items() if k not in ("num_key_value_heads", "num_mtp_layers")},
                       num_nextn_predict_layers=0, rope_theta=50000.0, initializer_range=got.initializer_range,
                       rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                                beta_slow=1.0, mscale=0.9, mscale_all_dim=0.8))
    assert got == want
    # Plain RoPE: rope_parameters {"rope_type": "default", "rope_theta": ...}.
    transformers.DeepseekV3Config(rope_parameters={"rope_type": "default", "rope_theta": 1234.0},
                                  **kw).save_pretrained(str(tmp_path / "b"))
    got = load_hf_config(str(tmp_path / "b"))
    assert got.rope_scaling is None and got.rope_theta == 1234.0 and got.q_lora_rank is None
