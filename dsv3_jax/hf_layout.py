"""The name map between Hugging Face DeepSeek-V3 tensors and our variables: one `Entry` per HF tensor saying
which leaf of `Transformer(cfg).init(...)` (unboxed) it fills, which block of that leaf, and how it is laid out.

Layout conventions (ours vs HF): kernels are [in, out] (HF Linear weights [out, in]); RoPE is interleaved on
both sides, so no permutation; `q_a_proj` and `kv_a_proj_with_mqa` are fused into `attn/q_kv_a_proj`;
`q_b_proj` [q_lora, H, nope+rope], `kv_b_proj` [kv_lora, H, nope+v], `o_proj` [H, v, D]; MLPs `gate_up`
[D, 2, F] (0 = gate, 1 = up) and `down` [F, D]; experts `[E, D, 2, F]` / `[E, F, D]`; router `[D, E]` fp32;
the routing bias `e_score_correction_bias` goes to `router_state/.../moe/router_bias` (always fp32).
MTP module k is HF layer `num_hidden_layers + k` (paper section 2.2), with copies of `embed_tokens` and
`shared_head.head` that are checked against the main ones and dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import numpy as np

from .config import ModelConfig

__all__ = ["Entry", "abstract_init", "layout", "fused_expert_entries", "block_prefixes", "hf_tensor_names", "to_ours", "to_hf",
           "template", "block_shape", "check_coverage", "leaf_dtype"]

# ----------------------------------------------------------------------------------------------------------
# The name map: one entry per HF tensor, saying where in which leaf it lives and how it is laid out.

@dataclasses.dataclass(frozen=True)
class Entry:
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
        out[hf + name] = Entry(leaf, lead + tuple(index), tuple(shape), kind, **kw)

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


def fused_expert_entries(cfg: ModelConfig, hf: str, params: tuple, lead: tuple) -> dict:
    """transformers-5.x in-memory expert layout, accepted on load in place of the per-expert names."""
    e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    m = params + ("moe",)
    return {hf + "mlp.experts.gate_up_proj": Entry(m + ("experts_gate_up",), lead, (e, 2 * f, d), "fused_gate_up"),
            hf + "mlp.experts.down_proj": Entry(m + ("experts_down",), lead, (e, d, f), "fused_down")}


def block_prefixes(cfg: ModelConfig):
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


def layout(cfg: ModelConfig) -> dict[str, Entry]:
    """Every tensor of the released layout (MTP copies of embedding and head included, marked dup_of)."""
    d, x = cfg.hidden_size, cfg.vocab_size
    out: dict[str, Entry] = {
        "model.embed_tokens.weight": Entry(("params", "embedding"), (), (x, d), "copy"),
    }
    for hf, params, state, lead, moe in block_prefixes(cfg):
        _block_entries(cfg, hf, params, state, lead, moe, out)
    for k in range(cfg.num_nextn_predict_layers):
        hf, p = f"model.layers.{cfg.num_hidden_layers + k}.", ("params", f"mtp_{k}")
        out[hf + "enorm.weight"] = Entry(p + ("enorm", "scale"), (), (d,), "copy")
        out[hf + "hnorm.weight"] = Entry(p + ("hnorm", "scale"), (), (d,), "copy")
        out[hf + "eh_proj.weight"] = Entry(p + ("eh_proj",), (), (d, 2 * d), "linear", fp8_ok=True)
        out[hf + "shared_head.norm.weight"] = Entry(p + ("norm", "scale"), (), (d,), "copy")
        out[hf + "embed_tokens.weight"] = Entry(("params", "embedding"), (), (x, d), "copy",
                                                 dup_of="model.embed_tokens.weight")
        out[hf + "shared_head.head.weight"] = Entry(("params", "lm_head"), (), (x, d), "linear",
                                                     dup_of="lm_head.weight")
    out["model.norm.weight"] = Entry(("params", "final_norm", "scale"), (), (d,), "copy")
    out["lm_head.weight"] = Entry(("params", "lm_head"), (), (x, d), "linear")
    return out


def hf_tensor_names(cfg: ModelConfig) -> list[str]:
    """The tensor names `save_checkpoint` writes for this config (the released layout)."""
    return list(layout(cfg))


def to_ours(w: np.ndarray, e: Entry, block_shape: tuple) -> np.ndarray:
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


def to_hf(x: np.ndarray, e: Entry) -> np.ndarray:
    if e.kind == "copy":
        return x.reshape(e.hf_shape)
    if e.kind == "linear":
        return x.reshape(e.hf_shape[1], e.hf_shape[0]).T
    raise AssertionError(e.kind)


# ----------------------------------------------------------------------------------------------------------
# Expected variables (shapes of `Transformer(cfg).init`, unboxed).

@functools.lru_cache(maxsize=8)
def abstract_init(cfg: ModelConfig):
    """`jax.eval_shape` of `Transformer(cfg).init(...)`, leaves still boxed with their logical axis names
    (tracing the init takes a while, and loading needs it twice: shapes and shardings)."""
    import jax
    import jax.numpy as jnp
    from .model import Transformer
    return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))


def template(cfg: ModelConfig) -> dict[tuple, Any]:
    """Flat {path: ShapeDtypeStruct} of `Transformer(cfg).init(...)` with partitioning boxes removed."""
    from flax import traverse_util
    from flax.core import meta
    return traverse_util.flatten_dict(meta.unbox(abstract_init(cfg)))


def block_shape(shape: tuple, index: tuple) -> tuple:
    return np.broadcast_to(np.empty((), np.uint8), shape)[index].shape


def check_coverage(layout: dict[str, Entry], template: dict[tuple, Any]) -> None:
    """Every element of every leaf is written by exactly the right amount of HF tensor data (guards against
    the model growing a parameter this map does not know about)."""
    count: dict[tuple, int] = {}
    for e in layout.values():
        if e.dup_of is None:
            count[e.leaf] = count.get(e.leaf, 0) + int(np.prod(block_shape(template[e.leaf].shape, e.index)))
    bad = [f"{'/'.join(k)}: {count.get(k, 0)} of {int(np.prod(v.shape))} elements mapped"
           for k, v in template.items() if count.get(k, 0) != int(np.prod(v.shape))]
    bad += [f"{'/'.join(k)}: not a variable of the model" for k in count if k not in template]
    if bad:
        raise NotImplementedError("dsv3_jax/hf.py's name map is out of date with the model:\n  - " + "\n  - ".join(bad))


def leaf_dtype(leaf: tuple, dtype: np.dtype) -> np.dtype:
    # The router (gate) and its bias stay fp32 whatever the parameter dtype (paper sections 2.1.2 and 3.3.2).
    return np.dtype(np.float32) if leaf[-1] in ("router", "router_bias") else dtype


# ----------------------------------------------------------------------------------------------------------
# Slices: which part of which HF tensor a region of a leaf needs (sharded loading).

def entry_overlap(e: Entry, leaf_shape: tuple, region: tuple) -> Optional[tuple[tuple, tuple]]:
    """Where entry `e`'s block meets `region` (unit-step slices, one per leaf axis) of its leaf:
    (index into the region array, slices of the block) or None when they do not meet."""
    sel = tuple(e.index) + (_ALL,) * (len(leaf_shape) - len(e.index))
    dest, block = [], []
    for s, r, n in zip(sel, region, leaf_shape):
        r0, r1 = r.indices(n)[:2]
        if isinstance(s, (int, np.integer)):
            if not r0 <= s < r1:
                return None
            dest.append(int(s) - r0)
            continue
        s0, s1 = s.indices(n)[:2]
        lo, hi = max(s0, r0), min(s1, r1)
        if lo >= hi:
            return None
        dest.append(slice(lo - r0, hi - r0))
        block.append(slice(lo - s0, hi - s0))
    return tuple(dest), tuple(block)


def _group_range(dims: tuple, sls: tuple) -> tuple[slice, tuple]:
    """A run of our axes that flattens into one HF axis: the HF range covering the slices (whole rows of
    the trailing axes) and the slices still to apply to those trailing axes."""
    rest = int(np.prod(dims[1:], dtype=np.int64))
    return slice(sls[0].start * rest, sls[0].stop * rest), sls[1:]


def read_block(read_slice, name: str, e: Entry, bshape: tuple, sls: tuple) -> np.ndarray:
    """`to_ours(tensor, e, bshape)[sls]`, reading through `read_slice(name, hf_index)` only the HF slice it
    needs (for a linear weight: the rows and columns the region's output and input axes cover)."""
    if e.kind == "copy":
        assert tuple(bshape) == tuple(e.hf_shape), (name, bshape, e.hf_shape)
        return read_slice(name, sls)
    if e.kind == "linear":                                # ours = W.T.reshape(bshape), W [out, in]
        out_dim, in_dim = e.hf_shape
        k = next(i for i in range(1, len(bshape) + 1) if int(np.prod(bshape[:i])) == in_dim)
        in_rng, in_rest = _group_range(bshape[:k], sls[:k])
        out_rng, out_rest = _group_range(bshape[k:], sls[k:])
        w = read_slice(name, (out_rng, in_rng)).T
        w = w.reshape((sls[0].stop - sls[0].start,) + tuple(bshape[1:k])
                      + (sls[k].stop - sls[k].start,) + tuple(bshape[k + 1:]))
        return w[(_ALL,) + in_rest + (_ALL,) + out_rest]
    if e.kind == "fused_gate_up":                         # [E, 2F, D] -> [E, D, 2, F]
        se, sd, s2, sf = sls
        w = read_slice(name, (se, slice(0, e.hf_shape[1]), sd))
        return to_ours(w, e, None)[:, :, s2, sf]
    if e.kind == "fused_down":                            # [E, D, F] -> [E, F, D]
        se, sf, sd = sls
        return read_slice(name, (se, sd, sf)).transpose(0, 2, 1)
    raise AssertionError(e.kind)
