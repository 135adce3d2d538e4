"""Dropless routed-expert computation behind one interface, chosen by `ModelConfig.moe_impl`.

Every implementation computes, for each token n, `sum_k w[n,k] * Expert_{idx[n,k]}(x[n])` with no token
dropped, and is checked against the same per-token reference in tests/test_moe_dispatch.py.
  dense   every expert on every token, then a weighted combine (O(E) work; the simple reference)
  ragged  tokens sorted by expert, grouped GEMM with jax.lax.ragged_dot (the GPU/TPU path)
Axis letters: see layers.py (P = token-expert pairs, N*K of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..config import ModelConfig
from .layers import dtype_of


def routed_experts(cfg: ModelConfig, x: jax.Array, idx: jax.Array, w: jax.Array,
                   w_gate_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """x [N,D], idx/w [N,K], w_gate_up [E,D,2,F], w_down [E,F,D] -> [N,D] in the compute dtype."""
    impl = IMPLS.get(cfg.moe_impl)
    if impl is None:
        raise NotImplementedError(f"moe_impl={cfg.moe_impl!r} has no implementation in this build")
    return impl(cfg, x, idx, w, w_gate_up, w_down)


def dense(cfg, x, idx, w, w_gate_up, w_down):
    dt = dtype_of(cfg.dtype)
    h = jnp.einsum("ND,EDGF->ENGF", x.astype(dt), w_gate_up.astype(dt))
    a = nn.silu(h[:, :, 0]) * h[:, :, 1]                                         # [E,N,F]
    y = jnp.einsum("ENF,EFD->END", a, w_down.astype(dt))                          # [E,N,D]
    combine = (jax.nn.one_hot(idx, w_down.shape[0], dtype=jnp.float32) * w[..., None]).sum(1)   # [N,E]
    return jnp.einsum("END,NE->ND", y, combine.astype(dt))


def sort_by_expert(idx: jax.Array, num_experts: int):
    """Stable order of the token-expert pairs by expert: (order [P], inverse [P], group_sizes [E])."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = jnp.argsort(order)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, inverse, group_sizes


def combine(y_sorted: jax.Array, inverse: jax.Array, w: jax.Array) -> jax.Array:
    """Un-sort pair outputs [P,D] (a gather, no scatter) and take the weighted sum over each token's K."""
    n, k = w.shape
    y = y_sorted[inverse].reshape(n, k, -1)                                       # [N,K,D]
    return jnp.einsum("NKD,NK->ND", y, w.astype(y.dtype))


def ragged(cfg, x, idx, w, w_gate_up, w_down):
    dt = dtype_of(cfg.dtype)
    e, d, _, f = w_gate_up.shape
    k = idx.shape[1]
    order, inverse, sizes = sort_by_expert(idx, e)
    xs = x.astype(dt)[order // k]                                                 # [P,D]
    h = jax.lax.ragged_dot(xs, w_gate_up.reshape(e, d, 2 * f).astype(dt), sizes)  # [P,2F]
    a = nn.silu(h[:, :f]) * h[:, f:]
    y = jax.lax.ragged_dot(a, w_down.astype(dt), sizes)                           # [P,D]
    return combine(y, inverse, w)


IMPLS = {"dense": dense, "ragged": ragged, "blocked": ragged}  # blocked: placeholder until the CPU path lands
