"""Hugging Face DeepSeek-V3 checkpoints (SPEC section 8) <-> our variables.

`load_checkpoint(dir)` reads `config.json` and one or many `*.safetensors` shards (with or without
`model.safetensors.index.json`), one tensor at a time, into preallocated numpy arrays shaped exactly like
`Transformer(cfg).init(...)` (unboxed), so a checkpoint is never held twice. It accepts:
  * the released layout: per-expert `mlp.experts.E.{gate,up,down}_proj.weight`, layer `num_hidden_layers+k`
    holding MTP module k (with copies of `embed_tokens` and `shared_head.head`, checked and dropped);
  * transformers-5.x fused expert tensors `mlp.experts.gate_up_proj [E, 2F, D]` / `mlp.experts.down_proj
    [E, D, F]` if a file has them (transformers 5.24's `save_pretrained` itself writes per-expert names);
  * FP8 e4m3 projection weights with `<name>_scale_inv` fp32 blocks `[ceil(out/B), ceil(in/B)]` (B = 128,
    or `quantization_config.weight_block_size`), dequantised as `W[i,j] = float(W8[i,j]) * S[i//B, j//B]`;
  * bf16 / fp16 / fp32 tensors.
Every problem (missing, unexpected, wrong shape, wrong dtype, config mismatch) is collected first and raised
as ONE ValueError listing them all, before any tensor data is read.

`save_checkpoint` writes `config.json` plus safetensors shards with the released per-expert names (and an
index json when sharded). `write_fp8_checkpoint` writes the same with projection weights quantised to e4m3
in 128x128 blocks (for tests; DeepSeek's own FP8 layout).

Layout conventions (ours vs HF): kernels are [in, out] (HF Linear weights [out, in]); RoPE is interleaved on
both sides, so no permutation; `q_a_proj` and `kv_a_proj_with_mqa` are fused into `attn/q_kv_a_proj`;
`q_b_proj` [q_lora, H, nope+rope], `kv_b_proj` [kv_lora, H, nope+v], `o_proj` [H, v, D]; MLPs `gate_up`
[D, 2, F] (0 = gate, 1 = up) and `down` [F, D]; experts `[E, D, 2, F]` / `[E, F, D]`; router `[D, E]` fp32;
the routing bias `e_score_correction_bias` goes to `router_state/.../moe/router_bias` (always fp32).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import warnings
from typing import Any, Optional

import ml_dtypes
import numpy as np

from .config import ModelConfig, load_hf_config, save_hf_config
from .safetensors_io import (FP8_BLOCK, _BIAS_DTYPES, _FLOAT_DTYPES, _Shard, _np_dtype, _write_safetensors, dequantize_fp8, quantize_fp8,
                             read_safetensors_header)

__all__ = ["load_checkpoint", "save_checkpoint", "write_fp8_checkpoint", "dequantize_fp8", "quantize_fp8",
           "hf_tensor_names", "read_safetensors_header"]

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
# ----------------------------------------------------------------------------------------------------------
# The name map: one entry per HF tensor, saying where in which leaf it lives and how it is laid out.

@dataclasses.dataclass(frozen=True)
class _Entry:
    leaf: tuple            # path into the variables, e.g. ('params', 'moe_layers', 'layers', 'attn', 'o_proj')
    index: tuple           # numpy index into that leaf selecting this tensor's block
    hf_shape: tuple        # shape stored in the checkpoint
    kind: str              # 'copy' | 'linear' (HF [out,in] -> ours W.T reshaped) | 'fused_gate_up' | 'fused_down'
    fp8_ok: bool = False   # a projection weight: may be stored as FP8 e4m3 with a _scale_inv
    bias: bool = False     # the routing bias: fp32 only
    dup_of: Optional[str] = None  # MTP copies of embed_tokens / lm_head: checked against this main tensor


_ALL = slice(None)


def _block_entries(cfg: ModelConfig, hf: str, params: tuple, state: tuple, lead: tuple, moe: bool,
                   out: dict) -> None:
    """Entries of one decoder block: `hf` is 'model.layers.N.', `params`/`state` the leaf prefixes of the
    block in params / router_state, `lead` the leading index (the layer slot of a scanned stack, or ())."""
    c = cfg
    d, h = c.hidden_size, c.num_attention_heads
    lat = c.kv_lora_rank + c.qk_rope_head_dim

    def add(name, leaf, index, shape, kind="copy", **kw):
        out[hf + name] = _Entry(leaf, lead + tuple(index), tuple(shape), kind, **kw)

    a = params + ("attn",)
    add("input_layernorm.weight", params + ("attn_norm", "scale"), (), (d,))
    add("post_attention_layernorm.weight", params + ("mlp_norm", "scale"), (), (d,))
    if c.q_lora_rank is not None:
        q = c.q_lora_rank
        add("self_attn.q_a_proj.weight", a + ("q_kv_a_proj",), (_ALL, slice(0, q)), (q, d), "linear", fp8_ok=True)
        add("self_attn.kv_a_proj_with_mqa.weight", a + ("q_kv_a_proj",), (_ALL, slice(q, q + lat)), (lat, d),
            "linear", fp8_ok=True)
        add("self_attn.q_a_layernorm.weight", a + ("q_a_norm", "scale"), (), (q,))
        add("self_attn.q_b_proj.weight", a + ("q_b_proj",), (), (h * c.qk_head_dim, q), "linear", fp8_ok=True)
    else:
        add("self_attn.q_proj.weight", a + ("q_proj",), (), (h * c.qk_head_dim, d), "linear", fp8_ok=True)
        add("self_attn.kv_a_proj_with_mqa.weight", a + ("kv_a_proj",), (), (lat, d), "linear", fp8_ok=True)
    add("self_attn.kv_a_layernorm.weight", a + ("kv_a_norm", "scale"), (), (c.kv_lora_rank,))
    add("self_attn.kv_b_proj.weight", a + ("kv_b_proj",), (),
        (h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), "linear", fp8_ok=True)
    add("self_attn.o_proj.weight", a + ("o_proj",), (), (d, h * c.v_head_dim), "linear", fp8_ok=True)
    if moe:
        m = params + ("moe",)
        e, f = c.n_routed_experts, c.moe_intermediate_size
        add("mlp.gate.weight", m + ("router",), (), (e, d), "linear")
        add("mlp.gate.e_score_correction_bias", state + ("moe", "router_bias"), (), (e,), bias=True)
        for i in range(e):
            add(f"mlp.experts.{i}.gate_proj.weight", m + ("experts_gate_up",), (i, _ALL, 0, _ALL), (f, d),
                "linear", fp8_ok=True)
            add(f"mlp.experts.{i}.up_proj.weight", m + ("experts_gate_up",), (i, _ALL, 1, _ALL), (f, d),
                "linear", fp8_ok=True)
            add(f"mlp.experts.{i}.down_proj.weight", m + ("experts_down",), (i,), (d, f), "linear", fp8_ok=True)
        if c.n_shared_experts:
            fs = c.n_shared_experts * f
            s = m + ("shared",)
            add("mlp.shared_experts.gate_proj.weight", s + ("gate_up",), (_ALL, 0, _ALL), (fs, d), "linear",
                fp8_ok=True)
            add("mlp.shared_experts.up_proj.weight", s + ("gate_up",), (_ALL, 1, _ALL), (fs, d), "linear",
                fp8_ok=True)
            add("mlp.shared_experts.down_proj.weight", s + ("down",), (), (d, fs), "linear", fp8_ok=True)
    else:
        fd = c.intermediate_size
        m = params + ("mlp",)
        add("mlp.gate_proj.weight", m + ("gate_up",), (_ALL, 0, _ALL), (fd, d), "linear", fp8_ok=True)
        add("mlp.up_proj.weight", m + ("gate_up",), (_ALL, 1, _ALL), (fd, d), "linear", fp8_ok=True)
        add("mlp.down_proj.weight", m + ("down",), (), (d, fd), "linear", fp8_ok=True)


def _fused_expert_entries(cfg: ModelConfig, hf: str, params: tuple, lead: tuple) -> dict:
    """transformers-5.x in-memory expert layout, accepted on load in place of the per-expert names."""
    e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    m = params + ("moe",)
    return {hf + "mlp.experts.gate_up_proj": _Entry(m + ("experts_gate_up",), lead, (e, 2 * f, d), "fused_gate_up"),
            hf + "mlp.experts.down_proj": _Entry(m + ("experts_down",), lead, (e, d, f), "fused_down")}


def _block_prefixes(cfg: ModelConfig):
    """(hf prefix, params prefix, router_state prefix, lead index, is_moe) for every decoder block, MTP
    blocks included, in HF layer order."""
    for i in range(cfg.num_hidden_layers):
        if i < cfg.first_k_dense_replace:
            yield f"model.layers.{i}.", ("params", "dense_layers", "layers"), None, (i,), False
        else:
            j = i - cfg.first_k_dense_replace
            yield (f"model.layers.{i}.", ("params", "moe_layers", "layers"),
                   ("router_state", "moe_layers", "layers"), (j,), True)
    for k in range(cfg.num_nextn_predict_layers):
        yield (f"model.layers.{cfg.num_hidden_layers + k}.", ("params", f"mtp_{k}", "block"),
               ("router_state", f"mtp_{k}", "block"), (), True)


def _layout(cfg: ModelConfig) -> dict[str, _Entry]:
    """Every tensor of the released layout (MTP copies of embedding and head included, marked dup_of)."""
    d, x = cfg.hidden_size, cfg.vocab_size
    out: dict[str, _Entry] = {
        "model.embed_tokens.weight": _Entry(("params", "embedding"), (), (x, d), "copy"),
    }
    for hf, params, state, lead, moe in _block_prefixes(cfg):
        _block_entries(cfg, hf, params, state, lead, moe, out)
    for k in range(cfg.num_nextn_predict_layers):
        hf, p = f"model.layers.{cfg.num_hidden_layers + k}.", ("params", f"mtp_{k}")
        out[hf + "enorm.weight"] = _Entry(p + ("enorm", "scale"), (), (d,), "copy")
        out[hf + "hnorm.weight"] = _Entry(p + ("hnorm", "scale"), (), (d,), "copy")
        out[hf + "eh_proj.weight"] = _Entry(p + ("eh_proj",), (), (d, 2 * d), "linear", fp8_ok=True)
        out[hf + "shared_head.norm.weight"] = _Entry(p + ("norm", "scale"), (), (d,), "copy")
        out[hf + "embed_tokens.weight"] = _Entry(("params", "embedding"), (), (x, d), "copy",
                                                 dup_of="model.embed_tokens.weight")
        out[hf + "shared_head.head.weight"] = _Entry(("params", "lm_head"), (), (x, d), "linear",
                                                     dup_of="lm_head.weight")
    out["model.norm.weight"] = _Entry(("params", "final_norm", "scale"), (), (d,), "copy")
    out["lm_head.weight"] = _Entry(("params", "lm_head"), (), (x, d), "linear")
    return out


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """The tensor names `save_checkpoint` writes for this config (the released layout)."""
    return list(_layout(cfg))


def _to_ours(w: np.ndarray, e: _Entry, block_shape: tuple) -> np.ndarray:
    if e.kind == "copy":
        return w.reshape(block_shape)
    if e.kind == "linear":
        return w.T.reshape(block_shape)
    if e.kind == "fused_gate_up":                                     # [E, 2F, D] -> [E, D, 2, F]
        n, f2, d = w.shape
        return w.reshape(n, 2, f2 // 2, d).transpose(0, 3, 1, 2)
    if e.kind == "fused_down":                                        # [E, D, F] -> [E, F, D]
        return w.transpose(0, 2, 1)
    raise AssertionError(e.kind)


def _to_hf(x: np.ndarray, e: _Entry) -> np.ndarray:
    if e.kind == "copy":
        return x.reshape(e.hf_shape)
    if e.kind == "linear":
        return x.reshape(e.hf_shape[1], e.hf_shape[0]).T
    raise AssertionError(e.kind)


# ----------------------------------------------------------------------------------------------------------
# Expected variables (shapes of `Transformer(cfg).init`, unboxed).

def _template(cfg: ModelConfig) -> dict[tuple, Any]:
    """Flat {path: ShapeDtypeStruct} of `Transformer(cfg).init(...)` with partitioning boxes removed."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from flax.core import meta
    from .model import Transformer

    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    return traverse_util.flatten_dict(meta.unbox(shapes))


def _block_shape(shape: tuple, index: tuple) -> tuple:
    return np.broadcast_to(np.empty((), np.uint8), shape)[index].shape


def _check_coverage(layout: dict[str, _Entry], template: dict[tuple, Any]) -> None:
    """Every element of every leaf is written by exactly the right amount of HF tensor data (guards against
    the model growing a parameter this map does not know about)."""
    count: dict[tuple, int] = {}
    for e in layout.values():
        if e.dup_of is None:
            count[e.leaf] = count.get(e.leaf, 0) + int(np.prod(_block_shape(template[e.leaf].shape, e.index)))
    bad = [f"{'/'.join(k)}: {count.get(k, 0)} of {int(np.prod(v.shape))} elements mapped"
           for k, v in template.items() if count.get(k, 0) != int(np.prod(v.shape))]
    bad += [f"{'/'.join(k)}: not a variable of the model" for k in count if k not in template]
    if bad:
        raise NotImplementedError("dsv3_jax/hf.py's name map is out of date with the model:\n  - " + "\n  - ".join(bad))


def _leaf_dtype(leaf: tuple, dtype: np.dtype) -> np.dtype:
    # The router (gate) and its bias stay fp32 whatever the parameter dtype (SPEC sections 4, 5, 7).
    return np.dtype(np.float32) if leaf[-1] in ("router", "router_bias") else dtype


# ----------------------------------------------------------------------------------------------------------
# Loading.

def _list_shards(path: str, problems: list[str]) -> list[str]:
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as fh:
            index = json.load(fh)
        files = sorted(set(index.get("weight_map", {}).values()))
        present = []
        for f in files:
            if os.path.exists(os.path.join(path, f)):
                present.append(os.path.join(path, f))
            else:
                problems.append(f"missing file: {f} (listed in {INDEX_FILE})")
        return present
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _read_quant_block(path: str) -> int:
    with open(os.path.join(path, "config.json")) as fh:
        hf = json.load(fh)
    q = hf.get("quantization_config") or {}
    if q:
        if q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"config.json quantization_config {q} is not supported (only fp8 e4m3 blocks)")
        bs = q.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
        if len(bs) != 2 or bs[0] != bs[1]:
            raise ValueError(f"config.json weight_block_size {bs} is not supported (square blocks only)")
        return int(bs[0])
    return FP8_BLOCK


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _check_config(cfg: ModelConfig, mtp_override: bool, info: dict[str, tuple], problems: list[str]) -> None:
    """Infer the main sizes from the tensors and report every disagreement with config.json."""
    layers: dict[int, dict[str, tuple]] = {}
    for name, (_, _, shape) in info.items():
        m = _LAYER_RE.match(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = shape
    mtp = sorted(i for i, t in layers.items() if "eh_proj.weight" in t)
    main = sorted(i for i in layers if i not in mtp)
    found: dict[str, Any] = {}
    if "model.embed_tokens.weight" in info:
        found["vocab_size"], found["hidden_size"] = info["model.embed_tokens.weight"][2]
    if main:
        found["num_hidden_layers"] = len(main)
        found["first_k_dense_replace"] = sum(1 for i in main if "mlp.gate_proj.weight" in layers[i])
    found["num_nextn_predict_layers"] = len(mtp)

    def first(key):
        for i in main + mtp:
            if key in layers[i]:
                return layers[i][key]
        return None

    if first("mlp.gate.weight") is not None:
        found["n_routed_experts"] = first("mlp.gate.weight")[0]
    if first("self_attn.q_a_proj.weight") is not None:
        found["q_lora_rank"] = first("self_attn.q_a_proj.weight")[0]
    elif first("self_attn.q_proj.weight") is not None:
        found["q_lora_rank"] = None
    if first("self_attn.kv_a_layernorm.weight") is not None:
        found["kv_lora_rank"] = first("self_attn.kv_a_layernorm.weight")[0]
    if first("mlp.gate_proj.weight") is not None:
        found["intermediate_size"] = first("mlp.gate_proj.weight")[0]
    if first("mlp.experts.0.gate_proj.weight") is not None:
        found["moe_intermediate_size"] = first("mlp.experts.0.gate_proj.weight")[0]
    elif first("mlp.experts.gate_up_proj") is not None:
        found["moe_intermediate_size"] = first("mlp.experts.gate_up_proj")[1] // 2
    for key, value in found.items():
        if key == "intermediate_size" and cfg.first_k_dense_replace == 0:
            continue
        if key == "num_nextn_predict_layers":
            # Asking for fewer MTP modules than stored (an override) is allowed: the extra ones are skipped.
            want = cfg.num_nextn_predict_layers
            if value < want or (value > want and not mtp_override):
                hint = " (pass num_nextn_predict_layers=0 to load without MTP)" if value == 0 else ""
                problems.append(f"config mismatch: num_nextn_predict_layers={want} in the config but the "
                                f"checkpoint has {value} MTP layer(s){hint}")
            continue
        if getattr(cfg, key) != value:
            problems.append(f"config mismatch: {key}={getattr(cfg, key)} in the config but the checkpoint's "
                            f"tensors imply {value}")


def load_checkpoint(path: str, dtype=np.float32, **config_overrides) -> tuple[ModelConfig, dict]:
    """Load an HF DeepSeek-V3 checkpoint directory -> (ModelConfig, variables).

    `variables` is `{'params': ..., 'router_state': ...}` of plain numpy arrays with exactly the tree, shapes
    and (for dtype=float32 and param_dtype float32) dtypes of `Transformer(cfg).init(...)` unboxed. `dtype`
    is the dtype of every parameter except the router kernel and bias, which stay fp32. `config_overrides`
    are applied on top of config.json (e.g. moe_impl='ragged'; num_nextn_predict_layers=0 skips MTP).
    Raises one ValueError listing every problem found.
    """
    dtype = _np_dtype(dtype)
    cfg = load_hf_config(path, **config_overrides)
    block = _read_quant_block(path)
    problems: list[str] = []

    # 1. Where is every tensor, and what is it? (headers only)
    shards = {f: _Shard(f) for f in _list_shards(path, problems)}
    info: dict[str, tuple[str, str, tuple]] = {}          # name -> (file, dtype string, shape)
    for f, sh in shards.items():
        for name in sh.header:
            if name in info:
                problems.append(f"duplicate tensor: {name} is in both {os.path.basename(info[name][0])} and "
                                f"{os.path.basename(f)}")
                continue
            info[name] = (f, *sh.info(name))

    # 2. What should be there?
    layout = _layout(cfg)
    for hf, params, state, lead, moe in _block_prefixes(cfg):
        if moe and (hf + "mlp.experts.gate_up_proj" in info or hf + "mlp.experts.down_proj" in info):
            for i in range(cfg.n_routed_experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    layout.pop(f"{hf}mlp.experts.{i}.{p}.weight")
            layout.update(_fused_expert_entries(cfg, hf, params, lead))
    mtp_override = "num_nextn_predict_layers" in config_overrides
    _check_config(cfg, mtp_override, info, problems)

    def skipped(name: str) -> bool:
        # MTP modules beyond an explicitly lowered num_nextn_predict_layers are not loaded.
        m = _LAYER_RE.match(name)
        return (mtp_override and m is not None
                and int(m.group(1)) >= cfg.num_hidden_layers + cfg.num_nextn_predict_layers
                and f"model.layers.{m.group(1)}.eh_proj.weight" in info)

    # 3. Validate names, shapes and dtypes, all before reading any data.
    template = _template(cfg)
    _check_coverage(layout, template)
    scales: dict[str, str] = {}                               # weight name -> its scale_inv name
    for name, (_, dt, shape) in sorted(info.items()):
        if name.endswith(SCALE_SUFFIX):
            base = name[:-len(SCALE_SUFFIX)]
            if skipped(name):
                continue
            if base not in layout or not layout[base].fp8_ok or info.get(base, (None, None))[1] != "F8_E4M3":
                problems.append(f"unexpected tensor: {name} (a scale for {base}, which is not an FP8 weight "
                                f"of this model)")
                continue
            scales[base] = name
            continue
        if name not in layout:
            if not skipped(name):
                problems.append(f"unexpected tensor: {name} {dt} {list(shape)}")
    for name, e in layout.items():
        if name not in info:
            if e.dup_of is None:
                problems.append(f"missing tensor: {name} {list(e.hf_shape)}")
            continue
        _, dt, shape = info[name]
        if shape != e.hf_shape:
            problems.append(f"wrong shape: {name} is {list(shape)}, expected {list(e.hf_shape)}")
        if e.bias:
            if dt not in _BIAS_DTYPES:
                problems.append(f"wrong dtype: {name} is {dt}, expected F32 (the routing bias must not be "
                                f"downcast)")
        elif dt == "F8_E4M3" and e.fp8_ok:
            s = name + SCALE_SUFFIX
            want = (math.ceil(e.hf_shape[0] / block), math.ceil(e.hf_shape[1] / block))
            if s not in info:
                problems.append(f"missing tensor: {s} (scale of the FP8 weight {name})")
            elif info[s][2] != want:
                problems.append(f"wrong shape: {s} is {list(info[s][2])}, expected {list(want)} "
                                f"({block}x{block} blocks of {list(e.hf_shape)})")
            elif info[s][1] not in _FLOAT_DTYPES:
                problems.append(f"wrong dtype: {s} is {info[s][1]}, expected F32")
        elif dt not in _FLOAT_DTYPES:
            allowed = "F32, BF16, F16" + (" or F8_E4M3 with a _scale_inv" if e.fp8_ok else "")
            problems.append(f"wrong dtype: {name} is {dt}, expected {allowed}")
    if problems:
        for sh in shards.values():
            sh.close()
        raise ValueError(f"checkpoint {path} does not match the model config ({len(problems)} problem(s)):\n  - "
                         + "\n  - ".join(problems))

    # 4. Read one tensor at a time into preallocated arrays.
    bufs = {leaf: np.empty(sd.shape, _leaf_dtype(leaf, dtype)) for leaf, sd in template.items()}
    dups = []
    try:
        for name in sorted(layout, key=lambda n: (info[n][0], n) if n in info else ("", n)):
            e = layout[name]
            if name not in info:
                continue
            if e.dup_of is not None:
                dups.append(name)
                continue
            w = _read(shards, info, name, scales, block)
            buf = bufs[e.leaf]
            buf[e.index] = _to_ours(w, e, _block_shape(buf.shape, e.index)).astype(buf.dtype, copy=False)
            del w
        for name in dups:                                      # MTP copies of embedding / head: check, drop
            e = layout[name]
            buf = bufs[e.leaf]
            w = _read(shards, info, name, scales, block).astype(buf.dtype)
            main = _to_hf(buf, e)                               # a view of what was loaded, no copy
            if not np.array_equal(w, main):
                diff = np.abs(w.astype(np.float32) - main.astype(np.float32)).max()
                warnings.warn(f"{name} differs from {e.dup_of} (max abs diff {diff:.3g}); the MTP module "
                              f"uses the main {e.dup_of} (shared, paper section 2.2)")
            del w, main
    finally:
        for sh in shards.values():
            sh.close()

    from flax import traverse_util
    return cfg, traverse_util.unflatten_dict(bufs)


def _read(shards: dict, info: dict, name: str, scales: dict, block: int) -> np.ndarray:
    f, dt, _ = info[name]
    w = shards[f].get(name)
    if dt == "F8_E4M3":
        s = scales[name]
        w = dequantize_fp8(w, shards[info[s][0]].get(s), block)
    return w


# ----------------------------------------------------------------------------------------------------------
# Saving.

def _flat_variables(variables, template: dict[tuple, Any]) -> dict[tuple, Any]:
    """Flatten (and unbox) variables; one ValueError listing every leaf that does not fit the config."""
    from flax import traverse_util
    from flax.core import meta

    flat = traverse_util.flatten_dict(meta.unbox(dict(variables)))
    problems = [f"missing variable: {'/'.join(k)} {list(v.shape)}" for k, v in template.items() if k not in flat]
    problems += [f"unexpected variable: {'/'.join(k)}" for k in flat if k not in template]
    problems += [f"wrong shape: {'/'.join(k)} is {list(np.shape(flat[k]))}, expected {list(v.shape)}"
                 for k, v in template.items() if k in flat and tuple(np.shape(flat[k])) != tuple(v.shape)]
    if problems:
        raise ValueError(f"variables do not match the config ({len(problems)} problem(s)):\n  - "
                         + "\n  - ".join(problems))
    return flat


def _save(path: str, config: ModelConfig, variables, shard_size_bytes: Optional[int], dtype, fp8: bool,
          extra_config: Optional[dict] = None) -> None:
    template = _template(config)
    flat = _flat_variables(variables, template)
    layout = _layout(config)
    _check_coverage(layout, template)
    out_dtype = None if dtype is None else _np_dtype(dtype)
    os.makedirs(path, exist_ok=True)
    save_hf_config(path, config)
    if extra_config:
        cfg_file = os.path.join(path, "config.json")
        with open(cfg_file) as fh:
            d = json.load(fh)
        d.update(extra_config)
        with open(cfg_file, "w") as fh:
            json.dump(d, fh, indent=2)

    tensors = []                                              # (name, shape, dtype, producer)
    for name, e in layout.items():
        leaf = flat[e.leaf]

        def block_hf(leaf=leaf, e=e):
            return _to_hf(np.asarray(leaf[e.index] if e.index else leaf), e)

        src = np.dtype(leaf.dtype)
        if e.bias:
            dt = np.dtype(np.float32)
        elif e.leaf[-1] == "router":
            dt = np.dtype(np.float32)                         # the gate is kept in high precision
        else:
            dt = out_dtype or src
        if fp8 and e.fp8_ok and not name.endswith("eh_proj.weight"):     # released: eh_proj stays bf16
            # The file order puts the fp32 scale before the 1-byte weight (alignment), so each producer
            # quantises on its own: deterministic, and only one tensor is held at a time.
            tensors.append((name, e.hf_shape, np.dtype(ml_dtypes.float8_e4m3fn),
                            lambda f=block_hf: quantize_fp8(f())[0]))
            tensors.append((name + SCALE_SUFFIX, (math.ceil(e.hf_shape[0] / FP8_BLOCK),
                                                  math.ceil(e.hf_shape[1] / FP8_BLOCK)), np.dtype(np.float32),
                            lambda f=block_hf: quantize_fp8(f())[1]))
        else:
            tensors.append((name, e.hf_shape, dt, lambda f=block_hf, dt=dt: f().astype(dt)))

    # Shard greedily in layout order (a weight and its scale always share a shard).
    shards: list[list] = [[]]
    size = 0
    total = 0
    i = 0
    while i < len(tensors):
        group = tensors[i:i + 2] if i + 1 < len(tensors) and tensors[i + 1][0] == tensors[i][0] + SCALE_SUFFIX \
            else tensors[i:i + 1]
        nbytes = sum(int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize for t in group)
        if shard_size_bytes is not None and shards[-1] and size + nbytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
        total += nbytes
        i += len(group)
    for old in glob.glob(os.path.join(path, "*.safetensors")) + [os.path.join(path, INDEX_FILE)]:
        if os.path.exists(old):
            os.remove(old)
    if len(shards) == 1:
        _write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
        return
    n = len(shards)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        _write_safetensors(os.path.join(path, fname), group)
        weight_map.update({t[0]: fname for t in group})
    with open(os.path.join(path, INDEX_FILE), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)


def save_checkpoint(path: str, config: ModelConfig, variables, shard_size_bytes: Optional[int] = None,
                    dtype=None) -> None:
    """Write an HF DeepSeek-V3 checkpoint: config.json plus safetensors with the released per-expert names
    (MTP module k as layer num_hidden_layers+k, with copies of embed_tokens and shared_head.head).

    shard_size_bytes: None writes one `model.safetensors`; otherwise shards of at most that size (a single
    larger tensor gets a shard of its own) plus `model.safetensors.index.json`. dtype: None keeps each
    leaf's dtype; else every tensor is cast to it (e.g. "bfloat16") except the router kernel and bias (kept
    fp32). Existing *.safetensors files and index in `path` are replaced."""
    _save(path, config, variables, shard_size_bytes, dtype, fp8=False)


def write_fp8_checkpoint(path: str, config: ModelConfig, variables, shard_size_bytes: Optional[int] = None,
                         dtype="bfloat16") -> None:
    """Like save_checkpoint, with every projection weight (attention, dense MLP, experts, shared experts;
    not eh_proj, which the release keeps in bf16, though the loader accepts an FP8 eh_proj too) quantised to
    float8_e4m3fn in 128x128 blocks with a `<name>_scale_inv` fp32 block scale, the rest in `dtype` (bf16 as
    released, router kept fp32), and a `quantization_config` in config.json."""
    _save(path, config, variables, shard_size_bytes, dtype, fp8=True,
          extra_config={"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                "quant_method": "fp8", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}})
