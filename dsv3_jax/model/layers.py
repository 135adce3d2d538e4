"""Small building blocks: parameters with logical axis names, RMSNorm, the SwiGLU MLP.

Einsum axis letters used across `dsv3_jax/model`:
  B batch, T query length, S key length, N tokens (flattened B*T), D hidden (embed), H heads,
  K query/key head dim, R rope head dim, V value head dim, Q q_lora_rank, C kv_lora_rank,
  F FFN width, G the gate|up pair (2), E experts, X vocab.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from ..config import ModelConfig
from ..sharding import FSDP_AXES


def dtype_of(name: str):
    return jnp.dtype(name)


def param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
          cfg: ModelConfig, init=None, dtype=None, read_in_stages: bool = True) -> jax.Array:
    """A parameter with logical axis names (sharding lives in `sharding.py`, never here).

    Every learnable weight starts N(0, initializer_range^2) as in the paper (std 0.006)."""
    init = init or nn.initializers.normal(stddev=cfg.initializer_range)
    value = module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                         dtype or dtype_of(cfg.param_dtype))
    # read through `*_read` names, so FSDP weights can be gathered in two stages (sharding.logical_rules)
    read_axes = tuple(f"{a}_read" if a in FSDP_AXES else a for a in axes)
    return constrain(value, read_axes) if read_in_stages else value


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding hint for activations; a no-op outside a mesh with rules."""
    return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
    """`scale * x / rms(x)`, computed in fp32 and cast back, as the reference does."""
    cfg: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param(self, "scale", (x.shape[-1],), (self.axis_name,), self.cfg, init=nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return scale.astype(x.dtype) * x32.astype(x.dtype)


@jax.custom_vjp
def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N,A] @ w [A,B] -> [N,B], with the weight gradient computed as a plain product.

    Autodiff's dW = x^T dy contracts over the rows of both operands, a form XLA:CPU runs outside its fast
    matmul library; transposing the narrower of x and dy first (and, if that is dy, the small [B,A] result
    back) makes it a standard [A,N] @ [N,B] product. The barriers keep XLA from folding the transposes
    back into the product. Same products and sums as autodiff."""
    return jnp.dot(x, w)


def _dense_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _dense_bwd(res, dy):
    x, w = res
    dx = jnp.dot(dy, w.T)                                                         # [N,A]
    if x.shape[1] <= dy.shape[1]:
        dw = jnp.dot(jax.lax.optimization_barrier(x.T), dy)                       # [A,N] @ [N,B]
    else:
        dw_t = jnp.dot(jax.lax.optimization_barrier(dy.T), x)                     # [B,N] @ [N,A]
        dw = jax.lax.optimization_barrier(dw_t).T
    return dx.astype(x.dtype), dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, dtype) -> jax.Array:
    """`down(silu(gate(x)) * up(x))` on 2-D activations `[N, D]` (2-D matmuls are fastest on CPU).

    w_gate_up: [D, 2, F] (gate first); w_down: [F, D]."""
    d, _, f = w_gate_up.shape
    h = dense(x.astype(dtype), w_gate_up.reshape(d, 2 * f).astype(dtype))      # [N, 2F]
    h = nn.silu(h[:, :f]) * h[:, f:]                                              # [N, F]
    return dense(h, w_down.astype(dtype))                                         # [N, D]


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers' FFN and the shared experts (width `width`)."""
    cfg: ModelConfig
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = x.shape[-1]
        w_gate_up = param(self, "gate_up", (d, 2, self.width), ("embed", None, "mlp"), cfg)
        w_down = param(self, "down", (self.width, d), ("mlp", "embed"), cfg)
        y = swiglu(x.reshape(-1, d), w_gate_up, w_down, dtype_of(cfg.dtype))
        return y.reshape(x.shape).astype(x.dtype)
