"""The ragged expert-parallel MoE compiles for a TPU (compile-only devices from libtpu; skipped without it).

XLA:CPU has no ragged_all_to_all, so this compile is the test of the TPU path: the forward and backward
of the default `moe_impl` ("auto", which resolves to `ragged` for TPU devices) on a (data 1, expert 2,
tensor 2) mesh of v5p compile-only devices, with ragged_all_to_all and the ragged dots in the compiled HLO.
"""

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import dispatch


def tpu_devices(topology="v5:2x2x1", chip_config="megacore"):
    """Compile-only TPU devices (v5e/v6e: chip_config='default'); skips the test when libtpu is missing."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")       # other processes may hold libtpu too
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    except Exception as e:                                          # libtpu present but unusable here
        pytest.skip(f"no compile-only TPU devices: {e}")


def test_ragged_expert_parallel_compiles_for_tpu():
    devices = tpu_devices()
    mesh = jax.sharding.Mesh(np.array(devices[:4]).reshape(1, 2, 2), ("data", "expert", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = ModelConfig(hidden_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=2, topk_group=1, dtype="bfloat16")
    assert dispatch.resolve_impl(cfg, mesh) == "ragged"
    n, d, e, f, k = 64, cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok

    def loss(x, idx, w, wgu, wd):
        return jnp.sum(dispatch.routed_experts(cfg, x, idx, w, wgu, wd).astype(jnp.float32) ** 2)

    tok = NamedSharding(mesh, P(("data", "expert")))
    args = (jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=tok),
            jax.ShapeDtypeStruct((n, k), jnp.int32, sharding=tok),
            jax.ShapeDtypeStruct((n, k), jnp.float32, sharding=tok),
            jax.ShapeDtypeStruct((e, d, 2, f), jnp.float32,
                                 sharding=NamedSharding(mesh, P("expert", None, None, "tensor"))),
            jax.ShapeDtypeStruct((e, f, d), jnp.float32, sharding=NamedSharding(mesh, P("expert", "tensor"))))
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3, 4))).lower(*args).compile()
    hlo = compiled.as_text()
    assert "ragged-all-to-all" in hlo
    assert "ragged-dot" in hlo                                              # the grouped matmuls
