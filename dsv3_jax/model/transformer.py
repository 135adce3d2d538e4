"""The decoder block, the scanned layer stacks, and the whole model with its MTP chain.

Parameter tree (every leaf carries logical axis names; scanned stacks add a leading 'layers' axis):
  embed/embedding [X,D]
  dense_layers/{attn_norm, attn, mlp_norm, mlp}        first_k_dense_replace layers, scanned
  moe_layers/{attn_norm, attn, mlp_norm, moe}          the remaining layers, scanned
  final_norm, lm_head [D,X]
  mtp_{k}/{enorm, hnorm, eh_proj, block, norm}         k = 0..D-1 (HF layer num_hidden_layers + k)
The routing bias sits at router_state/<same path>/moe/router_bias. For decoding, a stack's params may also
come per layer, <stack>/layer_<i>/... without the 'layers' axis (`dsv3_jax.infer.decode.decode_params`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct
from jax.ad_checkpoint import checkpoint_name

from ..config import ModelConfig
from .layers import MLP, RMSNorm, constrain, param
from .mla import MLA, LatentContext
from .moe import MoE
from .rope import rope_angles

# Activations a named policy may keep, tagged with `checkpoint_name` where they are made (mla.py and
# DecoderBlock). Left out, as in arXiv 2412.19437 section 3.2.3: RMSNorm outputs and the MLA
# up-projections (queries, per-head keys and values), which the backward recomputes.
PAPER_SAVED = ("mla_down_proj", "attn_core", "attn_out", "ffn_out")
_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "full": _cp.nothing_saveable,
    "dots": _cp.checkpoint_dots,
    "dots_no_batch": _cp.checkpoint_dots_with_no_batch_dims,
    # full, with each layer's input (the only thing `full` keeps) in pinned host memory (TPU/GPU)
    "offload_inputs": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"], offload_src="device",
        offload_dst="pinned_host"),
    "paper": _cp.save_only_these_names(*PAPER_SAVED),
    "paper_offload": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input", *PAPER_SAVED],
        offload_src="device", offload_dst="pinned_host"),
}


@struct.dataclass
class ModelOutput:
    logits: jax.Array                 # [B,T,X] fp32: position t predicts token t+1
    mtp_logits: tuple                 # D arrays [B,T,X]: depth k (1-based) at position t predicts t+k+1
    hidden: jax.Array                 # [B,T,D] last main block output, before the final norm (h^0)
    moe_stats: dict                   # {'moe_layers': {expert_counts [L,E], seq_counts [L,B,E],
                                      #   seq_affinity [L,B,E]}, 'mtp_k': {... without L}}


STACKS = ("dense_layers", "moe_layers")     # the main layer stacks, in order (names in the param tree)
LAYER_PREFIX = "layer_"     # per-layer decoding params: <stack>/layer_<i> in place of <stack>/layers [L,...]


class DecoderBlock(nn.Module):
    """Pre-norm residual block: h + MLA(norm(h)), then h + FFN(norm(h)) with FFN dense or MoE.

    Returns (h, (stats, latents)): the MoE statistics (None for a dense FFN) and, when decoding with a
    `LatentContext` `cache`, the new tokens' latents (c_kv, k_pe) for the cache (None otherwise).
    Decoding in place (`cache.layer` set), h is the scan carry (h [B,T,D], the stack's `LatentContext`) and so
    is the first returned value: the cache is written layer by layer inside the scan (latents None). With
    `cache.outputs_from` q, the block's output covers new tokens [q:] only."""
    cfg: ModelConfig
    moe: bool

    @nn.compact
    def __call__(self, h, cos, sin, positions, kv_mask, cache: Optional[LatentContext] = None):
        cfg = self.cfg
        in_place = isinstance(h, tuple)
        if in_place:
            h, cache = h
        h = checkpoint_name(h, "layer_input")
        a = MLA(cfg, name="attn")(RMSNorm(cfg, name="attn_norm")(h), cos, sin, positions, kv_mask, cache)
        a, latents = a if cache is not None else (a, None)
        h = h[:, cache.outputs_from:] + a if cache is not None and cache.layer is not None else h + a
        z = RMSNorm(cfg, name="mlp_norm")(h)
        if self.moe:
            y, stats = MoE(cfg, name="moe")(z)
        else:
            y, stats = MLP(cfg, cfg.intermediate_size, name="mlp")(z), None
        y = checkpoint_name(y, "ffn_out")
        h = constrain(h + y, ("batch", "length", "act_embed"))
        return ((h, latents), (stats, None)) if in_place else (h, (stats, latents))


def block_class(cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return DecoderBlock
    return nn.remat(DecoderBlock, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)


class Stack(nn.Module):
    """`length` DecoderBlocks under nn.scan: one compiled body whatever the depth. A decoding `cache` (a
    `LatentContext` with a leading layer axis) is scanned with the layers, or, with `cache.layer` set, carried
    through them and written in place. Decoding with stacked params runs the layers as a rolled loop, which
    copies each layer's slice of the stacked weights at every step (a dynamic slice: matmuls on XLA:CPU read
    contiguous operands); with the per-layer params of `dsv3_jax.infer.decode.decode_params`
    (`layer_<i>` in place of `layers`) the layers are unrolled and read their own weights in place, the
    cache still stacked and written in place (experiments/results/decode_weights.md). Returns (h, stats [L,...]
    or None, new latents [L,B,T,*], the written `LatentContext`, or None)."""
    cfg: ModelConfig
    moe: bool
    length: int

    @nn.compact
    def __call__(self, h, cos, sin, positions, kv_mask, cache: Optional[LatentContext] = None):
        if self.has_variable("params", f"{LAYER_PREFIX}0"):
            return self.per_layer(h, cos, sin, positions, kv_mask, cache)
        scanned = nn.scan(
            block_class(self.cfg),
            variable_axes={"params": 0, "router_state": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 4 + (0,),
            length=self.length,
            unroll=1 if cache is not None else min(self.cfg.scan_unroll, self.length),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        if cache is not None and cache.layer is not None:
            (h, cache), (stats, _) = scanned(self.cfg, self.moe, name="layers")(
                (h, cache.replace(layer=jnp.zeros((), jnp.int32))), cos, sin, positions, kv_mask, None)
            return h, stats, cache
        h, (stats, latents) = scanned(self.cfg, self.moe, name="layers")(h, cos, sin, positions, kv_mask, cache)
        return h, stats, latents

    def per_layer(self, h, cos, sin, positions, kv_mask, cache: Optional[LatentContext]):
        """The same blocks unrolled over per-layer params (decoding and prefill only: nothing here
        initialises a stack); the same returns as the scanned form, stats and latents stacked."""
        in_place = cache is not None and cache.layer is not None
        if in_place:
            h = (h, cache.replace(layer=jnp.zeros((), jnp.int32)))
        stats, latents = [], []
        for i in range(self.length):
            layer_cache = None if cache is None or in_place else jax.tree.map(lambda x: x[i], cache)
            h, (layer_stats, new) = block_class(self.cfg)(self.cfg, self.moe, name=f"{LAYER_PREFIX}{i}")(
                h, cos, sin, positions, kv_mask, layer_cache)
            stats.append(layer_stats)
            latents.append(new)
        stack = lambda xs: None if xs[0] is None else jax.tree.map(lambda *x: jnp.stack(x), *xs)
        if in_place:
            h, cache = h
            return h, stack(stats), cache
        return h, stack(stats), stack(latents)


class MTPModule(nn.Module):
    """Multi-token prediction depth k (arXiv 2412.19437, section 2.2, equations 21-22):
    h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]) (the embedding half first, as in the released
    checkpoint's eh_proj), then a full MoE block (with a decoding `cache`, a `LatentContext` of one layer). Returns (h^k, norm(h^k) for the shared head, stats, new latents or None)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_prev, emb_next, cos, sin, positions, kv_mask, cache: Optional[LatentContext] = None):
        cfg = self.cfg
        d = cfg.hidden_size
        w = param(self, "eh_proj", (2 * d, d), (None, "embed"), cfg)
        x = jnp.concatenate([RMSNorm(cfg, name="enorm")(emb_next), RMSNorm(cfg, name="hnorm")(h_prev)], -1)
        h = jnp.dot(x.astype(cfg.dtype), w.astype(cfg.dtype)).astype(h_prev.dtype)             # [B,T,D]
        h, (stats, latents) = block_class(cfg)(cfg, True, name="block")(h, cos, sin, positions, kv_mask, cache)
        return h, RMSNorm(cfg, name="norm")(h), stats, latents


def output_logits(h_normed: jax.Array, lm_head: jax.Array) -> jax.Array:
    """[..., D] -> fp32 logits [..., X]; the head stays in high precision. One 2-D matmul (faster than the
    3-D einsum on CPU)."""
    lead, d = h_normed.shape[:-1], h_normed.shape[-1]
    logits = jnp.dot(h_normed.reshape(-1, d).astype(jnp.float32), lm_head.astype(jnp.float32))
    return logits.reshape(lead + (-1,))


class Transformer(nn.Module):
    """DeepSeek-V3. `apply(variables, tokens)` -> ModelOutput (`.logits`, `.mtp_logits`, `.moe_stats`).

    Decoding (dsv3_jax/infer) runs the same modules through `apply(..., method=...)`: `trunk` with one
    `LatentContext` per stack, `main_logits`, and `mtp_depth` with its module's `LatentContext`."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        # read as stored: a staged read made its scatter-add gradient a full-table all-reduce (pod_memory.md)
        self.embedding = param(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg,
                               read_in_stages=False)
        if cfg.num_dense_layers:
            self.dense_layers = Stack(cfg, False, cfg.num_dense_layers)
        if cfg.num_moe_layers:
            self.moe_layers = Stack(cfg, True, cfg.num_moe_layers)
        self.final_norm = RMSNorm(cfg)
        self.lm_head = param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)
        self.mtp = [MTPModule(cfg, name=f"mtp_{k}") for k in range(cfg.num_nextn_predict_layers)]

    def embed(self, tokens: jax.Array) -> jax.Array:
        # Token ids are checked at the edge (data pipeline, generate): jnp.take clamps silently here.
        return constrain(jnp.take(self.embedding, tokens, axis=0), ("batch", "length", "act_embed"))

    def head(self, h_normed: jax.Array) -> jax.Array:
        return output_logits(h_normed, self.lm_head)

    def main_logits(self, h0: jax.Array) -> jax.Array:
        """h^0 [..., D] (before the final norm) -> fp32 logits [..., X]."""
        return self.head(self.final_norm(h0))

    def trunk(self, tokens, positions=None, kv_mask=None, caches: Optional[dict] = None):
        """Embedding and every main block: returns (h^0 [B,T,D], stats, (cos, sin, positions), latents).

        caches: None (training), or for decoding {stack name: LatentContext with a leading layer axis};
        latents then holds each stack's new (c_kv [L,B,T,C], k_pe [L,B,T,R]), or, in place (`layer` set), its
        written `LatentContext` ({} without caches)."""
        b, t = tokens.shape
        # The blocks get None for default positions (MLA then knows causality is by index).
        block_positions = positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            block_positions = None if caches is None else positions
        cos, sin = rope_angles(self.cfg, positions)
        h = self.embed(tokens)
        stats: dict[str, Any] = {}
        latents: dict[str, Any] = {}
        depths = {"dense_layers": self.cfg.num_dense_layers, "moe_layers": self.cfg.num_moe_layers}
        for name in (n for n in STACKS if depths[n]):
            cache = None if caches is None else caches[name]
            h, stack_stats, new = getattr(self, name)(h, cos, sin, block_positions, kv_mask, cache)
            if stack_stats is not None:
                stats[name] = stack_stats
            if new is not None:
                latents[name] = new
        return h, stats, (cos, sin, positions), latents

    def mtp_depth(self, k: int, h_prev, next_tokens, positions, kv_mask=None, cache: Optional[LatentContext] = None,
                  rope=None):
        """MTP module k (0-based) on h^k [B,T,D] and the tokens one further ahead [B,T] at positions [B,T]
        (None: the default 0..T-1, with `rope` given): returns (logits [B,T,X] through the shared head,
        h^{k+1}, stats, new latents or None)."""
        cos, sin = rope if rope is not None else rope_angles(self.cfg, positions)
        h, h_normed, stats, latents = self.mtp[k](h_prev, self.embed(next_tokens), cos, sin, positions, kv_mask,
                                                  cache)
        return self.head(h_normed), h, stats, latents

    def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
                 kv_mask: Optional[jax.Array] = None, *, mtp: bool = True) -> ModelOutput:
        """tokens [B,T] int32. positions [B,T] (default 0..T-1); kv_mask [B,T] marks real (non-pad) tokens.
        mtp=False skips the MTP chain (its logits come back empty)."""
        h0, stats, (cos, sin, _), _ = self.trunk(tokens, positions, kv_mask)
        logits = self.main_logits(h0)
        mtp_logits = []
        h = h0
        for k in range(len(self.mtp) if mtp else 0):
            # Depth k+1 at position i sees token i+k+1; the last k+1 positions see padding and are masked
            # in the loss, which keeps shapes static. Original positions, causal chain unchanged.
            shifted = jnp.pad(tokens[:, k + 1:], ((0, 0), (0, k + 1)))
            depth_logits, h, stats[f"mtp_{k}"], _ = self.mtp_depth(k, h, shifted, positions, kv_mask,
                                                                   rope=(cos, sin))
            mtp_logits.append(depth_logits)
        return ModelOutput(logits=logits, mtp_logits=tuple(mtp_logits), hidden=h0, moe_stats=stats)
