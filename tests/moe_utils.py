"""The per-token routed-expert reference (numpy float64, hand-written gradients) and the helpers that
tests/test_moe_dispatch.py (one device) and tests/test_moe_dispatch_mesh.py (8 fake devices) share.

Tolerance of `close`: 1e-5 relative to the largest magnitude of the compared quantity (plus 1e-7 absolute).
fp32 rounding (2^-24 ~ 6e-8) accumulated over sums of D, F and K terms stays around 1e-6 here, while a
dropped, duplicated or misrouted pair changes the result by O(1) relative to that scale.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # conftest does this too

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import dispatch, expert_parallel as ep_mod
from dsv3_jax.model.moe import route

IMPLS = ("auto", "dense", "ragged", "blocked", "gathered", "expert_parallel")
D, F, E, K = 16, 8, 8, 3


def make_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=D, intermediate_size=32, moe_intermediate_size=F,
                num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1, n_routed_experts=E,
                n_shared_experts=1, num_experts_per_tok=K, n_group=4, topk_group=2, q_lora_rank=None,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, rope_scaling=None,
                max_position_embeddings=64, num_nextn_predict_layers=0, moe_block_size=4, initializer_range=0.5)
    base.update(kw)
    return ModelConfig(**base)


def make_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


# ---------------------------------------------------------------------------------------------------
# reference: per token, per chosen expert, numpy float64, hand-written backward

def _silu(z):
    return z / (1 + np.exp(-z))


def reference(x, idx, w, wgu, wd, dy):
    """Returns y [N,D] and the gradients of sum(y * dy) wrt x, w, wgu, wd."""
    x, w, wgu, wd, dy = (np.asarray(a, np.float64) for a in (x, w, wgu, wd, dy))
    idx = np.asarray(idx)
    y, dx, dw = np.zeros_like(x), np.zeros_like(x), np.zeros_like(w)
    dwgu, dwd = np.zeros_like(wgu), np.zeros_like(wd)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            g, u = x[n] @ wgu[e, :, 0], x[n] @ wgu[e, :, 1]
            sg = 1 / (1 + np.exp(-g))
            a = _silu(g) * u
            o = a @ wd[e]
            y[n] += w[n, k] * o
            dw[n, k] = dy[n] @ o
            do = w[n, k] * dy[n]
            dwd[e] += np.outer(a, do)
            da = wd[e] @ do
            du, dg = da * _silu(g), da * u * sg * (1 + g * (1 - sg))
            dwgu[e, :, 0] += np.outer(x[n], dg)
            dwgu[e, :, 1] += np.outer(x[n], du)
            dx[n] += wgu[e, :, 0] @ dg + wgu[e, :, 1] @ du
    return y, (dx, dw, dwgu, dwd)


def close(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.abs(got - want).max()
    assert err <= rel * np.abs(want).max() + 1e-7, f"max error {err:.3g} vs scale {np.abs(want).max():.3g}"


# ---------------------------------------------------------------------------------------------------
# routing patterns (each token's K experts are distinct, as top-k gives)

def routing(kind, n, rng, e=E, k=K):
    if kind == "random":
        idx = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    elif kind == "uneven":          # expert 0: every token; expert e-1: none; the rest skewed
        p = np.linspace(1, 6, e - 2)
        p /= p.sum()
        idx = np.stack([np.r_[0, 1 + rng.choice(e - 2, k - 1, replace=False, p=p)] for _ in range(n)])
    elif kind == "same":            # every token picks the same K experts: nothing may be dropped
        idx = np.tile(np.arange(e - k, e), (n, 1))
    else:
        raise ValueError(kind)
    idx = np.stack([rng.permutation(r) for r in idx]).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    return idx, w


def weights(rng, e=E, d=D, f=F):
    wgu = (rng.normal(size=(e, d, 2, f)) / np.sqrt(d)).astype(np.float32)
    wd = (rng.normal(size=(e, f, d)) / np.sqrt(f)).astype(np.float32)
    return wgu, wd


def fwd_bwd(cfg, **kw):
    """One jit: y and the gradients of sum(y * dy) wrt x, w, w_gate_up, w_down."""
    impl = (lambda x, idx, w, a, b: ep_mod.expert_parallel(cfg, x, idx, w, a, b, **kw)) if kw else \
        (lambda x, idx, w, a, b: dispatch.routed_experts(cfg, x, idx, w, a, b))

    def f(x, w, wgu, wd, idx, dy):
        y, vjp = jax.vjp(lambda x, w, wgu, wd: impl(x, idx, w, wgu, wd), x, w, wgu, wd)
        return y, vjp(dy.astype(y.dtype))
    return jax.jit(f)


def run_impl(cfg, x, idx, w, wgu, wd, dy):
    return fwd_bwd(cfg)(x, w, wgu, wd, idx, dy)


def eqns(jaxpr):
    """Every equation, recursing into sub-jaxprs (loop bodies, custom rules, branches)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from eqns(sub)


needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set too late")


def group_limited_routing(cfg, n, rng):
    """Real router output (sigmoid, group limit), so a token reaches at most topk_group groups."""
    x = jnp.asarray(rng.normal(size=(n, cfg.hidden_size)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(cfg.hidden_size, cfg.n_routed_experts)).astype(np.float32))
    r = route(cfg, x, kernel, jnp.zeros((cfg.n_routed_experts,), jnp.float32))
    return np.asarray(x), np.array(r.expert_index), np.array(r.gate_weight)


def routed_case(cfg, seed, n=32):
    """Router output for n tokens, weights, a cotangent, and the reference output and gradients."""
    rng = np.random.default_rng(seed)
    x, idx, w = group_limited_routing(cfg, n, rng)
    wgu, wd = weights(rng)
    dy = rng.normal(size=(n, D)).astype(np.float32)
    return (x, idx, w, wgu, wd, dy), reference(x, idx, w, wgu, wd, dy)


def jaxpr_primitives(cfg, mesh):
    """The primitive names in the traced routed-expert program under `mesh` (which form the dispatch took)."""
    (x, idx, w, wgu, wd, _), _ = routed_case(cfg, 8)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda *a: dispatch.routed_experts(cfg, *a))(x, idx, w, wgu, wd)
    return {e.primitive.name for e in eqns(jaxpr.jaxpr)}
