"""The whole training state as one pytree, created already sharded (never whole on one device)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from ..config import RunConfig
from ..model import Transformer
from ..sharding import activate_for, logical_rules, shardings_of
from .optimizer import make_optimizer


@struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: optimizer updates applied
    params: Any
    opt_state: Any
    router_state: Any          # {'...': {'moe': {'router_bias': fp32}}}: state, not a parameter
    rng: jax.Array             # uint32 [2]
    skipped: jax.Array         # int32: consecutive non-finite steps skipped
    total_skipped: jax.Array   # int32


def _init_boxed(model: Transformer, rc: RunConfig, optimizer, rng):
    tokens = jnp.zeros((1, min(8, rc.train.seq_len)), jnp.int32)
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init(init_rng, tokens)
    params = variables["params"]                      # boxed: leaves carry logical names
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                      router_state=variables["router_state"], rng=state_rng, skipped=zero, total_skipped=zero)


def state_shardings(model: Transformer, rc: RunConfig, mesh, optimizer=None):
    """(abstract unboxed state, its NamedShardings) for this mesh, from the logical names."""
    optimizer = optimizer or make_optimizer(rc.train)
    boxed = jax.eval_shape(lambda r: _init_boxed(model, rc, optimizer, r), jax.random.PRNGKey(0))
    shardings = shardings_of(boxed, mesh, logical_rules(rc.mesh.zero3, rc.mesh.fsdp))
    abstract = nn.unbox(boxed)
    return abstract, shardings


def create_train_state(model: Transformer, rc: RunConfig, mesh, optimizer=None) -> TrainState:
    optimizer = optimizer or make_optimizer(rc.train)
    _, shardings = state_shardings(model, rc, mesh, optimizer)
    init = jax.jit(lambda r: nn.unbox(_init_boxed(model, rc, optimizer, r)), out_shardings=shardings)
    with activate_for(mesh, rc.mesh):
        return init(jax.random.PRNGKey(rc.train.seed))
