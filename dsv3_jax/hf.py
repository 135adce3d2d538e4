"""Hugging Face DeepSeek-V3 checkpoints <-> our variables (the name map is in hf_layout.py).

`load_checkpoint(dir)` reads `config.json` and one or many `*.safetensors` shards (with or without
`model.safetensors.index.json`), one tensor at a time, into preallocated numpy arrays shaped exactly like
`Transformer(cfg).init(...)` (unboxed), so a checkpoint is never held twice; or, given a mesh, straight into
sharded jax.Arrays, each process reading only the slices its devices hold. It accepts:
  * the released layout: per-expert `mlp.experts.E.{gate,up,down}_proj.weight`, layer `num_hidden_layers+k`
    holding MTP module k (with copies of `embed_tokens` and `shared_head.head`, checked and dropped);
  * transformers-5.x fused expert tensors `mlp.experts.gate_up_proj [E, 2F, D]` / `mlp.experts.down_proj
    [E, D, F]` if a file has them (transformers 5.24's `save_pretrained` itself writes per-expert names);
  * FP8 e4m3 projection weights with `<name>_scale_inv` fp32 blocks `[ceil(out/B), ceil(in/B)]` (B = 128,
    or `quantization_config.weight_block_size`), dequantised as `W[i,j] = float(W8[i,j]) * S[i//B, j//B]`;
  * bf16 / fp16 / fp32 tensors.
Every problem (missing, unexpected, wrong shape, wrong dtype, config mismatch) is collected first and raised
as ONE InputError listing them all, before any tensor data is read.

`save_checkpoint` writes `config.json` plus safetensors shards with the released per-expert names (and an
index json when sharded). `write_fp8_checkpoint` writes the same with projection weights quantised to e4m3
in 128x128 blocks (for tests; DeepSeek's own FP8 layout).

"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings
from typing import Any, Optional

import ml_dtypes
import numpy as np

from . import hf_layout as hl
from .config import ModelConfig, from_hf_dict, read_hf_config_json, save_hf_config
from .errors import InputError, MissingInputError
from .hf_layout import hf_tensor_names
from .safetensors_io import (BIAS_DTYPES, FLOAT_DTYPES, FP8_BLOCK, SafetensorsFile, dequantize_fp8,
                             dequantize_fp8_slice, np_dtype, quantize_fp8, read_safetensors_header, scale_blocks,
                             write_safetensors)

__all__ = ["load_checkpoint", "save_checkpoint", "write_fp8_checkpoint", "dequantize_fp8", "quantize_fp8",
           "hf_tensor_names", "read_safetensors_header", "variable_shardings"]

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
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
        raise MissingInputError(f"no *.safetensors files in {path}")
    return files


def _quant_block(raw: dict) -> int:
    """The FP8 block size of config.json's quantization_config (128 when absent)."""
    q = raw.get("quantization_config") or {}
    if q:
        if q.get("quant_method", "fp8") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
            raise InputError(f"config.json quantization_config {q} is not supported (only fp8 e4m3 blocks)")
        bs = q.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
        if len(bs) != 2 or bs[0] != bs[1]:
            raise InputError(f"config.json weight_block_size {bs} is not supported (square blocks only)")
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


def load_checkpoint(path: str, dtype=np.float32, mesh=None, zero3: bool = False, fsdp: bool = False,
                    **config_overrides) -> tuple[ModelConfig, dict]:
    """Load an HF DeepSeek-V3 checkpoint directory -> (ModelConfig, variables).

    `variables` is `{'params': ..., 'router_state': ...}` with exactly the tree, shapes and (for
    dtype=float32 and param_dtype float32) dtypes of `Transformer(cfg).init(...)` unboxed. `dtype` is the
    dtype of every parameter except the router kernel and bias, which stay fp32. `config_overrides` are
    applied on top of config.json (e.g. moe_impl='ragged'; num_nextn_predict_layers=0 skips MTP).

    Without a mesh the leaves are numpy arrays read whole. With a mesh they are jax.Arrays placed with
    their training shardings (`sharding.logical_rules(zero3, fsdp)`: a fine-tune starts without a reshard),
    and each process reads from the files only the slices its own devices hold (for FP8 weights, only the
    128x128 scale blocks covering them).

    A checkpoint without the MTP layer whose config.json still says `num_nextn_predict_layers: 1` (what
    transformers' save_pretrained writes) loads without MTP, with a warning. Raises one InputError listing
    every problem found, before any tensor data is read.
    """
    dtype = np_dtype(dtype)
    ck = _open(path, config_overrides)
    try:
        if mesh is None:
            variables = _read_whole(ck, dtype)
        else:
            variables = _read_sharded(ck, dtype, mesh, zero3, fsdp)
    finally:
        ck.close()
    return ck.cfg, variables


class _Checkpoint:
    """A validated checkpoint: its config, name map, template and the open files."""

    def __init__(self, cfg, layout, tmpl, shards, info, scales, block):
        self.cfg, self.layout, self.template, self.shards = cfg, layout, tmpl, shards
        self.info, self.scales, self.block = info, scales, block

    def read(self, name: str) -> np.ndarray:
        f, dt, _ = self.info[name]
        w = self.shards[f].get(name)
        if dt == "F8_E4M3":
            s = self.scales[name]
            w = dequantize_fp8(w, self.shards[self.info[s][0]].get(s), self.block)
        return w

    def read_slice(self, name: str, index: tuple) -> np.ndarray:
        """`tensor[index]` (unit-step slices), FP8 dequantised from its covering scale blocks only."""
        f, dt, _ = self.info[name]
        w = self.shards[f].get_slice(name, index)
        if dt == "F8_E4M3":
            s = self.scales[name]
            sc = self.shards[self.info[s][0]].get_slice(s, scale_blocks(*index, self.block))
            w = dequantize_fp8_slice(w, sc, *index, self.block)
        return w

    def bytes_read(self) -> int:
        return sum(sh.bytes_read for sh in self.shards.values())

    def close(self) -> None:
        for sh in self.shards.values():
            sh.close()


def _open(path: str, config_overrides: dict) -> _Checkpoint:
    """Read config.json and every header; check names, shapes and dtypes; raise all problems at once."""
    raw = read_hf_config_json(path)
    cfg = from_hf_dict(raw, **config_overrides)
    block = _quant_block(raw)
    problems: list[str] = []

    # 1. Where is every tensor, and what is it? (headers only)
    shards = {f: SafetensorsFile(f) for f in _list_shards(path, problems)}
    info: dict[str, tuple[str, str, tuple]] = {}          # name -> (file, dtype string, shape)
    for f, sh in shards.items():
        for name in sh.header:
            if name in info:
                problems.append(f"duplicate tensor: {name} is in both {os.path.basename(info[name][0])} and "
                                f"{os.path.basename(f)}")
                continue
            info[name] = (f, *sh.info(name))

    # 2. What should be there? The MTP depth follows the tensors unless the caller chose it.
    mtp_override = "num_nextn_predict_layers" in config_overrides
    stored_mtp = sum(1 for name in info if name.endswith(".eh_proj.weight"))
    has_layer_n = any(name.startswith(f"model.layers.{cfg.num_hidden_layers}.") for name in info)
    if not mtp_override and cfg.num_nextn_predict_layers > 0 and not has_layer_n:
        warnings.warn(f"{path}: config.json says num_nextn_predict_layers={cfg.num_nextn_predict_layers} but "
                      f"the checkpoint has no MTP module (no model.layers.{cfg.num_hidden_layers}.*; transformers' "
                      f"save_pretrained drops it): loaded without MTP, so speculative decoding is unavailable",
                      stacklevel=3)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    elif not mtp_override and "num_nextn_predict_layers" not in raw and "num_mtp_layers" not in raw and stored_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=stored_mtp)
    lay = hl.layout(cfg)
    for hf, params, state, lead, moe in hl.block_prefixes(cfg):
        if moe and (hf + "mlp.experts.gate_up_proj" in info or hf + "mlp.experts.down_proj" in info):
            for i in range(cfg.n_routed_experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    lay.pop(f"{hf}mlp.experts.{i}.{p}.weight")
            lay.update(hl.fused_expert_entries(cfg, hf, params, lead))
    _check_config(cfg, mtp_override, info, problems)

    def skipped(name: str) -> bool:
        # MTP modules beyond an explicitly lowered num_nextn_predict_layers are not loaded.
        m = _LAYER_RE.match(name)
        return (mtp_override and m is not None
                and int(m.group(1)) >= cfg.num_hidden_layers + cfg.num_nextn_predict_layers
                and f"model.layers.{m.group(1)}.eh_proj.weight" in info)

    # 3. Validate names, shapes and dtypes, all before reading any data.
    tmpl = hl.template(cfg)
    hl.check_coverage(lay, tmpl)
    scales = _check_tensors(lay, info, block, skipped, problems)
    ck = _Checkpoint(cfg, lay, tmpl, shards, info, scales, block)
    if problems:
        ck.close()
        raise InputError(f"checkpoint {path} does not match the model config ({len(problems)} problem(s)):\n  - "
                         + "\n  - ".join(problems))
    return ck


def _check_tensors(lay: dict, info: dict, block: int, skipped, problems: list[str]) -> dict[str, str]:
    """Report unexpected, missing, mis-shaped and mis-typed tensors -> {FP8 weight name: its scale name}."""
    scales: dict[str, str] = {}
    for name, (_, dt, shape) in sorted(info.items()):
        if name.endswith(SCALE_SUFFIX):
            base = name[:-len(SCALE_SUFFIX)]
            if skipped(name):
                continue
            if base not in lay or not lay[base].fp8_ok or info.get(base, (None, None))[1] != "F8_E4M3":
                problems.append(f"unexpected tensor: {name} (a scale for {base}, which is not an FP8 weight "
                                f"of this model)")
                continue
            scales[base] = name
            continue
        if name not in lay:
            if not skipped(name):
                problems.append(f"unexpected tensor: {name} {dt} {list(shape)}")
    for name, e in lay.items():
        if name not in info:
            if e.dup_of is None:
                problems.append(f"missing tensor: {name} {list(e.hf_shape)}")
            continue
        _, dt, shape = info[name]
        if shape != e.hf_shape:
            problems.append(f"wrong shape: {name} is {list(shape)}, expected {list(e.hf_shape)}")
        if e.bias:
            if dt not in BIAS_DTYPES:
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
            elif info[s][1] not in FLOAT_DTYPES:
                problems.append(f"wrong dtype: {s} is {info[s][1]}, expected F32")
        elif dt not in FLOAT_DTYPES:
            allowed = "F32, BF16, F16" + (" or F8_E4M3 with a _scale_inv" if e.fp8_ok else "")
            problems.append(f"wrong dtype: {name} is {dt}, expected {allowed}")
    return scales


def _read_whole(ck: _Checkpoint, dtype: np.dtype) -> dict:
    """One tensor at a time into preallocated numpy arrays (a checkpoint is never held twice)."""
    from flax import traverse_util
    bufs = {leaf: np.empty(sd.shape, hl.leaf_dtype(leaf, dtype)) for leaf, sd in ck.template.items()}
    dups = []
    for name in sorted(ck.layout, key=lambda n: (ck.info[n][0], n) if n in ck.info else ("", n)):
        e = ck.layout[name]
        if name not in ck.info:
            continue
        if e.dup_of is not None:
            dups.append(name)
            continue
        w = ck.read(name)
        buf = bufs[e.leaf]
        buf[e.index] = hl.to_ours(w, e, hl.block_shape(buf.shape, e.index)).astype(buf.dtype, copy=False)
        del w
    for name in dups:                                      # MTP copies of embedding / head: check, drop
        e = ck.layout[name]
        buf = bufs[e.leaf]
        w = ck.read(name).astype(buf.dtype)
        main = hl.to_hf(buf, e)                            # a view of what was loaded, no copy
        if not np.array_equal(w, main):
            diff = np.abs(w.astype(np.float32) - main.astype(np.float32)).max()
            warnings.warn(f"{name} differs from {e.dup_of} (max abs diff {diff:.3g}); the MTP module "
                          f"uses the main {e.dup_of} (shared, paper section 2.2)")
        del w, main
    return traverse_util.unflatten_dict(bufs)


def variable_shardings(cfg: ModelConfig, mesh, zero3: bool = False, fsdp: bool = False) -> dict:
    """{leaf path: NamedSharding} of `Transformer(cfg).init(...)` on `mesh`: the training shardings (the
    logical names of the modules through `sharding.logical_rules`; where a parameter is stored, which
    `mesh.staged_gather` does not change)."""
    from flax import traverse_util
    from .sharding import logical_rules, shardings_of
    return traverse_util.flatten_dict(shardings_of(hl.abstract_init(cfg), mesh, logical_rules(zero3, fsdp)))


def _read_sharded(ck: _Checkpoint, dtype: np.dtype, mesh, zero3: bool, fsdp: bool) -> dict:
    """Each leaf as a jax.Array built from its addressable shards: a shard reads only the HF slices that
    cover it (so a process reads what its devices hold), is read once however many local devices hold it,
    and its host buffer is dropped once placed, so host memory beyond the placed arrays is one shard of one
    leaf. The MTP copies of embedding and head are not read (the unsharded load checks them)."""
    import jax
    from flax import traverse_util

    shardings = variable_shardings(ck.cfg, mesh, zero3, fsdp)
    entries: dict[tuple, list] = {}
    for name, e in ck.layout.items():
        if e.dup_of is None:
            entries.setdefault(e.leaf, []).append((name, e))
    out = {}
    for leaf, sd in ck.template.items():
        shape, dt = tuple(sd.shape), hl.leaf_dtype(leaf, dtype)
        regions = {d: tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
                   for d, index in shardings[leaf].addressable_devices_indices_map(shape).items()}
        order = sorted(regions, key=lambda d: (tuple((r.start, r.stop) for r in regions[d]), d.id))
        arrays, host, key = [], None, None
        for d in order:                          # devices holding the same region are adjacent
            k = tuple((r.start, r.stop) for r in regions[d])
            if k != key:
                host, key = _read_region(ck, entries[leaf], shape, regions[d], dt), k
            arrays.append(jax.device_put(host, d))
        del host
        out[leaf] = jax.make_array_from_single_device_arrays(shape, shardings[leaf], arrays)
    return traverse_util.unflatten_dict(out)


def _read_region(ck: _Checkpoint, entries: list, shape: tuple, region: tuple, dt: np.dtype) -> np.ndarray:
    """`leaf[region]` assembled from the HF slices of the entries that meet it."""
    buf = np.empty(tuple(r.stop - r.start for r in region), dt)
    for name, e in entries:
        hit = hl.entry_overlap(e, shape, region)
        if hit is not None:
            w = hl.read_block(ck.read_slice, name, e, hl.block_shape(shape, e.index), hit[1])
            buf[hit[0]] = w.astype(dt, copy=False)
    return buf


# ----------------------------------------------------------------------------------------------------------
# Saving.

def _flat_variables(variables, template: dict[tuple, Any]) -> dict[tuple, Any]:
    """Flatten (and unbox) variables; one InputError listing every leaf that does not fit the config."""
    from flax import traverse_util
    from flax.core import meta

    flat = traverse_util.flatten_dict(meta.unbox(dict(variables)))
    problems = [f"missing variable: {'/'.join(k)} {list(v.shape)}" for k, v in template.items() if k not in flat]
    problems += [f"unexpected variable: {'/'.join(k)}" for k in flat if k not in template]
    problems += [f"wrong shape: {'/'.join(k)} is {list(np.shape(flat[k]))}, expected {list(v.shape)}"
                 for k, v in template.items() if k in flat and tuple(np.shape(flat[k])) != tuple(v.shape)]
    if problems:
        raise InputError(f"variables do not match the config ({len(problems)} problem(s)):\n  - "
                         + "\n  - ".join(problems))
    return flat


def _save(path: str, config: ModelConfig, variables, shard_size_bytes: Optional[int], dtype, fp8: bool,
          extra_config: Optional[dict] = None) -> None:
    tmpl = hl.template(config)
    flat = _flat_variables(variables, tmpl)
    lay = hl.layout(config)
    hl.check_coverage(lay, tmpl)
    out_dtype = None if dtype is None else np_dtype(dtype)
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
    for name, e in lay.items():
        leaf = flat[e.leaf]

        def block_hf(leaf=leaf, e=e):
            return hl.to_hf(np.asarray(leaf)[e.index], e)

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
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
        return
    n = len(shards)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(path, fname), group)
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
