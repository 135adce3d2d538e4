"""Load balancing (arXiv 2412.19437 section 2.1.2): the auxiliary-loss-free bias rule (sign, or the
proportional variant of Loss-Free Balancing, arXiv 2408.15664), the complementary sequence-wise balance loss
(eq. 17-20), the conventional batch-wise balance loss, and the MaxVio metric.

`moe_stats` is the dict the model returns: top-level keys name the MoE stacks ('moe_layers', 'mtp_0', ...),
the same keys under which `router_state` holds each stack's `router_bias`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from ..errors import InputError


def _bias_paths(router_state: dict) -> dict:
    """{top-level stack name: flattened path of its router_bias} for every MoE stack."""
    flat = traverse_util.flatten_dict(router_state)
    return {path[0]: path for path in flat if path[-1] == "router_bias"}


BIAS_RULES = ("sign", "proportional")
BALANCE_LOSSES = ("sequence", "batch")


def bias_step(counts: jax.Array, rule: str = "sign") -> jax.Array:
    """The direction of one bias update from counts [..., E]: `sign(mean - c_i)` (V3), or for the
    proportional rule the load error relative to the mean, `(mean - c_i) / mean` (dimensionless like the
    sign, so one rate u means the same at any batch size: an expert at twice the mean load moves by -u)."""
    c = counts.astype(jnp.float32)
    mean = c.mean(-1, keepdims=True)
    if rule == "sign":
        return jnp.sign(mean - c)
    if rule == "proportional":
        return (mean - c) / jnp.maximum(mean, 1e-9)
    raise InputError(f"unknown bias rule {rule!r}; choose one of {BIAS_RULES}")


def update_router_bias(router_state: dict, expert_counts: dict, gamma, rule: str = "sign") -> dict:
    """`b_i += gamma * bias_step(c)_i` per MoE layer, from the counts of the WHOLE global batch.

    Pure and non-gradient: applied after the optimizer step. expert_counts: {stack: [..., E]} matching each
    bias's shape (a leading layer axis for scanned stacks). The bias stays fp32 whatever the compute dtype."""
    flat = traverse_util.flatten_dict(router_state)
    for stack, path in _bias_paths(router_state).items():
        step = bias_step(expert_counts[stack], rule)
        flat[path] = (flat[path] + jnp.asarray(gamma, jnp.float32) * step).astype(jnp.float32)
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


def batch_balance_loss(seq_counts: jax.Array, seq_affinity: jax.Array, num_experts_per_tok: int,
                       seq_len: int) -> jax.Array:
    """The conventional auxiliary loss (GShard/Switch style, as in the Loss-Free paper's baseline): the same
    `sum_i f_i P_i` as the sequence-wise loss, but f_i and P_i taken over every token of the batch, summed
    over layers. Every sequence has seq_len tokens, so the batch's P_i is the mean of the sequences' P_i."""
    e, b = seq_counts.shape[-1], seq_counts.shape[-2]
    f = seq_counts.sum(-2) * (e / (num_experts_per_tok * seq_len * b))     # [..., E]
    return (f * seq_affinity.mean(-2)).sum()


def total_balance_loss(moe_stats: dict, num_experts_per_tok: int, seq_len: int,
                       kind: str = "sequence") -> jax.Array:
    """The balance loss without alpha, summed over every MoE stack: `kind` 'sequence' (V3's complementary
    loss) or 'batch' (the conventional auxiliary loss)."""
    if kind not in BALANCE_LOSSES:
        raise InputError(f"unknown balance loss {kind!r}; choose one of {BALANCE_LOSSES}")
    loss = sequence_balance_loss if kind == "sequence" else batch_balance_loss
    return sum((loss(s["seq_counts"], s["seq_affinity"], num_experts_per_tok, seq_len)
                for s in moe_stats.values()), jnp.zeros((), jnp.float32))


def max_violation(counts: jax.Array) -> jax.Array:
    """MaxVio = (max_i c_i - mean c) / mean c per layer: counts [..., E] -> [...]."""
    mean = counts.mean(-1)
    return (counts.max(-1) - mean) / jnp.maximum(mean, 1e-9)


def router_biases(router_state: dict) -> dict:
    """{stack: router_bias [..., E]} for every MoE stack."""
    flat = traverse_util.flatten_dict(router_state)
    return {stack: flat[path] for stack, path in _bias_paths(router_state).items()}


def counts_of(moe_stats: dict) -> dict:
    return {k: v["expert_counts"] for k, v in moe_stats.items()}
