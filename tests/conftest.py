"""Shared pytest setup: run JAX on the host CPU with 8 virtual devices (set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _random_variables(cfg, seed: int = 0):
    """Random variables shaped like `Transformer(cfg).init` (unboxed numpy), drawn in numpy without
    compiling the init: weights N(0, initializer_range^2), norm scales U(0.5, 1.5), router kernels with
    logits of std ~2 (so the unbiased scores s spread over (0, 1)), and routing biases of magnitude ~5 with
    mixed signs, half of each group positive: b = 5*sign + U(-0.5, 0.5). With that layout the biases decide
    which experts can win, the token-dependent scores still decide which do, and group-limited routing
    changes the selection."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util
    from flax.core import meta
    from dsv3_jax.model import Transformer

    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    rng = np.random.default_rng(seed)
    out = {}
    for path, sd in traverse_util.flatten_dict(meta.unbox(shapes)).items():
        shape, dt = tuple(sd.shape), np.dtype(sd.dtype)
        if path[-1] == "scale":
            x = rng.uniform(0.5, 1.5, shape)
        elif path[-1] == "router":
            x = rng.normal(0.0, 2.0 / np.sqrt(cfg.hidden_size), shape)
        elif path[-1] == "router_bias":
            e, g = cfg.n_routed_experts, cfg.n_group
            per = e // g
            signs = np.stack([rng.permutation(np.r_[np.ones(per - per // 2), -np.ones(per // 2)])
                              for _ in range(int(np.prod(shape[:-1], dtype=int)) * g)]).reshape(shape)
            x = 5.0 * signs + rng.uniform(-0.5, 0.5, shape)
        else:
            x = rng.normal(0.0, cfg.initializer_range, shape)
        out[path] = x.astype(dt)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="session")
def random_variables():
    """`random_variables(cfg, seed=0)` -> variables dict (see _random_variables)."""
    return _random_variables
