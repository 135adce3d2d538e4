"""DeepSeekMoE (arXiv 2412.19437 §2.1.2, eqs. 12-16): sigmoid router with a selection-only bias,
group-limited top-k, shared experts, and dropless routed experts through a pluggable dispatch (dispatch.py).

The routing bias lives in the `router_state` collection, not in `params`: it gets no gradient, no optimizer
state and no weight decay, and is updated by `balance.update_router_bias` after each step.
Axis letters: see layers.py.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..config import ModelConfig
from .dispatch import routed_experts
from .layers import MLP, param


class Routing(NamedTuple):
    expert_index: jax.Array   # [N, K] int32, chosen experts
    gate_weight: jax.Array    # [N, K] fp32, normalised unbiased affinities times routed_scaling_factor
    affinity: jax.Array       # [N, E] fp32, sigmoid scores s (unbiased)


def route(cfg: ModelConfig, x: jax.Array, router_kernel: jax.Array, router_bias: jax.Array) -> Routing:
    """x [N, D] -> Routing. Everything in fp32 (the gate is kept in high precision)."""
    e, g, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    s = jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32)))   # [N, E]
    choice = s + router_bias.astype(jnp.float32)                                               # bias: selection only
    if cfg.topk_group < g:  # also topk_group == 1: keep only the best group
        # A group's score is the sum of its top-2 biased scores; keep the best topk_group groups and mask
        # the others with -inf (not 0: with negative biases 0 would still let masked experts win).
        grouped = choice.reshape(-1, g, e // g)                                                # [N, G, E/G]
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)                                     # [N, G]
        _, keep = jax.lax.top_k(group_score, cfg.topk_group)                                   # [N, topk_group]
        keep_mask = jnp.zeros_like(group_score, dtype=bool).at[jnp.arange(keep.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(keep_mask, e // g, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, k)                                                          # [N, K]
    w = jnp.take_along_axis(s, idx, axis=1)                                                    # unbiased s
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return Routing(idx.astype(jnp.int32), w * cfg.routed_scaling_factor, s)


def routing_stats(cfg: ModelConfig, r: Routing, batch: int) -> dict:
    """Per-layer statistics: expert_counts [E] over all tokens here (the bias rule and MaxVio), and per
    sequence seq_counts [B, E] and seq_affinity [B, E] (mean of s normalised over experts) for the
    sequence-wise balance loss. The loss's indicator uses the experts actually routed to (biased top-k)."""
    e = cfg.n_routed_experts
    hits = jax.nn.one_hot(r.expert_index, e, dtype=jnp.float32).sum(1)                        # [N, E]
    hits = hits.reshape(batch, -1, e)                                                          # [B, T, E]
    norm_s = r.affinity / r.affinity.sum(-1, keepdims=True)
    return {
        "expert_counts": hits.sum((0, 1)),
        "seq_counts": hits.sum(1),
        "seq_affinity": norm_s.reshape(batch, -1, e).mean(1),
    }


class MoE(nn.Module):
    """x [B,T,D] -> (shared(x) + sum_k w_k expert_k(x) [B,T,D], stats). The residual is added by the block."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array):
        cfg = self.cfg
        b, t, d = x.shape
        e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
        router_kernel = param(self, "router", (d, e), ("embed", None), cfg, dtype=jnp.float32)
        router_bias = self.variable("router_state", "router_bias", lambda: jnp.zeros((e,), jnp.float32)).value
        w_gate_up = param(self, "experts_gate_up", (e, d, 2, f), ("expert", "embed", None, "mlp"), cfg)
        w_down = param(self, "experts_down", (e, f, d), ("expert", "mlp", "embed"), cfg)

        x2 = x.reshape(b * t, d)                                                               # [N, D]
        r = route(cfg, x2, router_kernel, router_bias)
        # gather_if_few: decode steps read only the chosen experts' weights. The scope names the kernel's ops in
        # profiles (experiments/spec_cost.py splits a step into parts by it).
        with jax.named_scope("routed_experts"):
            y = routed_experts(cfg, x2, r.expert_index, r.gate_weight, w_gate_up, w_down,
                               gather_if_few=True)                                              # [N, D]
        y = y.reshape(b, t, d).astype(x.dtype)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.n_shared_experts * f, name="shared")(x)
        return y, routing_stats(cfg, r, b)
