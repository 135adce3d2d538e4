"""Random model variables for tests and benchmarks without a checkpoint."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from .config import ModelConfig
from .model import Transformer


def random_variables(cfg: ModelConfig, seed: int = 0, *, norm_range: Optional[tuple[float, float]] = None,
                     router_std: Optional[float] = None, bias: str = "normal", bias_scale: float = 0.1) -> dict:
    """Variables shaped like `Transformer(cfg).init(...)` (unboxed jax arrays), drawn with numpy in the
    variables' sorted path order without compiling the init. Weights N(0, initializer_range^2), and:

    norm_range: norm scales U(lo, hi); None: ones (as the init).
    router_std: std of the router kernels; None: initializer_range.
    bias: the routing biases (router_state), "normal": N(0, bias_scale^2), non-zero as after training;
      "grouped": magnitude ~5 with mixed signs, half of each group positive (5 * sign + U(-0.5, 0.5)), so the
      biases decide which experts can win, the token-dependent scores still decide which do, and
      group-limited routing changes the selection (the layout the HF parity tests use)."""
    if bias not in ("normal", "grouped"):
        raise ValueError(f"bias must be 'normal' or 'grouped', got {bias!r}")
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    rng = np.random.default_rng(seed)
    out = {}
    for path, sd in sorted(traverse_util.flatten_dict(meta.unbox(shapes)).items()):
        shape, dt = tuple(sd.shape), np.dtype(sd.dtype)
        if path[0] == "router_state":
            x = rng.normal(0.0, bias_scale, shape) if bias == "normal" else _grouped_bias(cfg, shape, rng)
        elif path[-1] == "scale":
            x = np.ones(shape) if norm_range is None else rng.uniform(*norm_range, shape)
        elif path[-1] == "router" and router_std is not None:
            x = rng.normal(0.0, router_std, shape)
        else:
            x = rng.normal(0.0, cfg.initializer_range, shape)
        out[path] = jnp.asarray(x.astype(dt))
    return traverse_util.unflatten_dict(out)


def _grouped_bias(cfg: ModelConfig, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    per = cfg.n_routed_experts // cfg.n_group
    rows = int(np.prod(shape[:-1], dtype=int)) * cfg.n_group
    signs = np.stack([rng.permutation(np.r_[np.ones(per - per // 2), -np.ones(per // 2)]) for _ in range(rows)])
    return 5.0 * signs.reshape(shape) + rng.uniform(-0.5, 0.5, shape)
