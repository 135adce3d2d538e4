"""Parameter counts from the model's own abstract init (jax.eval_shape: shapes only, no memory)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from .config import ModelConfig
from .model import Transformer


def abstract_params(cfg: ModelConfig) -> dict:
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    variables = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.PRNGKey(0), t), tokens)
    return nn.unbox(variables["params"])


def count_params(cfg: ModelConfig) -> dict:
    """total (main model), activated per token (routed experts scaled by K/E; embedding and head included),
    and the MTP modules' own parameters (the shared embedding and head not counted again)."""
    flat = traverse_util.flatten_dict(abstract_params(cfg))
    total = mtp = activated = routed = embedding = 0
    for path, leaf in flat.items():
        n = math.prod(leaf.shape)
        if path[0].startswith("mtp_"):
            mtp += n
            continue
        total += n
        if path[-1].startswith("experts_"):
            routed += n
            n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
        if path[-1] == "embedding":
            embedding += n
        activated += n
    return {"total": total, "activated": int(round(activated)), "activated_without_embedding":
            int(round(activated - embedding)), "mtp": mtp, "routed_experts": routed, "embedding": embedding}
