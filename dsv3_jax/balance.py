"""Load balancing (SPEC section 5): the auxiliary-loss-free bias rule, the complementary sequence-wise
balance loss, and the MaxVio metric.

`moe_stats` is the dict the model returns: top-level keys name the MoE stacks ('moe_layers', 'mtp_0', ...),
the same keys under which `router_state` holds each stack's `router_bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util


def _bias_paths(router_state: dict) -> dict:
    """{top-level stack name: flattened path of its router_bias} for every MoE stack."""
    flat = traverse_util.flatten_dict(router_state)
    return {path[0]: path for path in flat if path[-1] == "router_bias"}


def update_router_bias(router_state: dict, expert_counts: dict, gamma) -> dict:
    """`b_i += gamma * sign(mean_j c_j - c_i)` per MoE layer, from the counts of the WHOLE global batch.

    Pure and non-gradient: applied after the optimizer step. expert_counts: {stack: [..., E]} matching each
    bias's shape (a leading layer axis for scanned stacks). The bias stays fp32 whatever the compute dtype."""
    flat = traverse_util.flatten_dict(router_state)
    for stack, path in _bias_paths(router_state).items():
        c = expert_counts[stack].astype(jnp.float32)
        b = flat[path]
        flat[path] = (b + jnp.asarray(gamma, jnp.float32) * jnp.sign(c.mean(-1, keepdims=True) - c)).astype(jnp.float32)
    return traverse_util.unflatten_dict(flat)


def sequence_balance_loss(seq_counts: jax.Array, seq_affinity: jax.Array, num_experts_per_tok: int,
                          seq_len: int) -> jax.Array:
    """Eq. 17-20 without alpha, averaged over sequences and summed over layers.

    seq_counts [..., B, E]: times expert i was selected in sequence b (the experts actually routed to);
    seq_affinity [..., B, E]: mean over the sequence of s_{i,t} / sum_j s_{j,t}.
    f_i = N_r / (K_r T) * count_i;  P_i = seq_affinity_i;  L = sum_i f_i P_i."""
    e = seq_counts.shape[-1]
    f = seq_counts * (e / (num_experts_per_tok * seq_len))
    per_seq = (f * seq_affinity).sum(-1)                       # [..., B]
    return per_seq.mean(-1).sum()


def total_balance_loss(moe_stats: dict, num_experts_per_tok: int, seq_len: int) -> jax.Array:
    return sum((sequence_balance_loss(s["seq_counts"], s["seq_affinity"], num_experts_per_tok, seq_len)
                for s in moe_stats.values()), jnp.zeros((), jnp.float32))


def max_violation(counts: jax.Array) -> jax.Array:
    """MaxVio = (max_i c_i - mean c) / mean c per layer: counts [..., E] -> [...]."""
    mean = counts.mean(-1)
    return (counts.max(-1) - mean) / jnp.maximum(mean, 1e-9)


def counts_of(moe_stats: dict) -> dict:
    return {k: v["expert_counts"] for k, v in moe_stats.items()}
