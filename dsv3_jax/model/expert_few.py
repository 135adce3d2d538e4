"""Routed experts for a handful of tokens (a decode step, a speculative verify step): loop over the experts
the tokens chose, not over all E.

The training kernel (expert_kernels.blocked_local) sorts the pairs, then loops over every expert and over
blocks of rows sized for thousands of pairs; for a few tokens that machinery is the whole cost. `few_local`
instead takes the distinct experts the N tokens chose (at most min(N*K, E) of them), and for each runs
the expert's FFN on all N token rows (a [N, D] x [D, 2F] product costs about what a 1-row one costs while N
is small: the weights are the traffic) and adds it weighted by each token's gate for that expert (zero for
tokens that did not choose it). No sort, no row gather, no scatter; each used expert's weights are read
once, in place.

The loop has a static trip count, min(N*K, E), so reverse-mode autodiff works (lax.fori_loop lowers to
scan); iterations past the number of distinct experts skip their work with lax.cond.
Axis letters: see layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax


def used_experts(idx: jax.Array, num_experts: int):
    """idx [N,K] -> (experts [U] int32: the distinct chosen ids ascending, then padding; count: how many
    are real). U = min(N*K, num_experts), static."""
    u = min(idx.size, num_experts)
    chosen = jnp.zeros((num_experts,), bool).at[idx.reshape(-1)].set(True)       # [E]
    experts = jnp.nonzero(chosen, size=u, fill_value=0)[0].astype(jnp.int32)     # [U]
    return experts, chosen.sum().astype(jnp.int32)


def few_local(x: jax.Array, idx: jax.Array, w: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """x [N,D], idx/w [N,K], w1 [E,D,2F] (gate | up), w2 [E,F,D], already cast -> [N,D]:
    `sum_k w[n,k] * Expert_{idx[n,k]}(x[n])`, one pass per distinct chosen expert."""
    e, _, f2 = w1.shape
    f = f2 // 2
    experts, count = used_experts(idx, e)
    w = w.astype(x.dtype)

    def expert(j, y):
        ex = experts[j]

        def run(y):
            a1 = lax.dynamic_index_in_dim(w1, ex, keepdims=False)                 # [D, 2F]
            a2 = lax.dynamic_index_in_dim(w2, ex, keepdims=False)                 # [F, D]
            h = x @ a1                                                            # [N, 2F]
            gate = jnp.where(idx == ex, w, 0).sum(1)                              # [N]
            return y + ((nn.silu(h[:, :f]) * h[:, f:]) @ a2) * gate[:, None]
        return lax.cond(j < count, run, lambda y: y, y)
    return lax.fori_loop(0, experts.shape[0], expert, jnp.zeros((x.shape[0], w2.shape[2]), x.dtype))
