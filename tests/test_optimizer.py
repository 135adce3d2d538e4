"""The layer-by-layer AdamW (train/optimizer.py apply_adamw) against the optax chain it replaces, and the
sharding of every large leaf of the train state on an 8-device mesh."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax.config import MeshConfig, RunConfig, run_preset
from dsv3_jax.model import Transformer
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.optimizer import apply_adamw, make_optimizer
from dsv3_jax.train.state import state_shardings


def _tree(seed: int):
    """A small param-shaped tree: a stacked [L,...] leaf, a stacked norm scale (no decay), a plain matrix."""
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"moe_layers": {"w": jax.random.normal(k[0], (3, 4, 5)), "attn_norm": {"scale": 1 + jax.random.normal(k[1], (3, 5))}},
            "lm_head": jax.random.normal(k[2], (5, 7))}


@pytest.mark.parametrize("loop_bytes", [0, None])      # every stacked leaf layer by layer; the default rule
@pytest.mark.parametrize("moments", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad_clip", [1e3, 0.5])      # the clip idle, then active
def test_layerwise_adamw_equals_the_optax_chain(moments, grad_clip, loop_bytes):
    """Four steps (warm-up lr, weight decay, both moment dtypes, clip on and off): params and every moment
    equal optax's to 1e-6 relative. Both compute the same fp32 expressions; only the order of a few
    multiplications differs (an ulp or two per step), far below 1e-6, while a wrong bias correction, clip or
    decay mask is off by 1e-3 or more."""
    tc = dataclasses.replace(run_preset("tiny").train, moment_dtype=moments, grad_clip=grad_clip, warmup_steps=3,
                             weight_decay=0.1)
    opt = make_optimizer(tc)
    params = _tree(0)
    ref_p, ref_s = params, opt.init(params)
    p, s = params, opt.init(params)
    step = jax.jit(lambda g, s, p: apply_adamw(tc, g, s, p, optax.tree.norm(g), jnp.array(True), loop_bytes))
    for i in range(4):
        grads = jax.tree.map(lambda x: x * 3.0, _tree(i + 1))
        updates, ref_s = opt.update(grads, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, updates)
        p, s = step(grads, s, p)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s))):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loop_bytes", [0, None])
def test_a_skipped_step_changes_nothing(loop_bytes):
    """ok=False (a non-finite loss or gradient): params, moments and both step counts stay exactly as they were."""
    tc = run_preset("tiny").train
    opt = make_optimizer(tc)
    params = _tree(0)
    state = opt.init(params)
    grads = jax.tree.map(lambda x: x * jnp.nan, _tree(1))
    p, s = jax.jit(lambda: apply_adamw(tc, grads, state, params, optax.tree.norm(grads), jnp.array(False),
                                             loop_bytes))()
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_large_leaf_is_sharded_over_every_device():
    """A scaled-down V3 on a (data 2, expert 2, tensor 2) mesh with zero3+fsdp: each param and moment leaf of
    at least 64 Ki elements holds 1/8 of itself per device (sharded over all three axes), so state memory per
    device falls with every device added, not with the data axis alone."""
    rc = run_preset("v3-671b").override([
        "model.num_hidden_layers=3", "model.first_k_dense_replace=1", "model.hidden_size=256",
        "model.intermediate_size=512", "model.moe_intermediate_size=128", "model.n_routed_experts=8",
        "model.vocab_size=1024", "model.num_attention_heads=4", "model.q_lora_rank=128",
        "model.kv_lora_rank=64", "model.qk_rope_head_dim=16", "model.qk_nope_head_dim=32",
        "model.v_head_dim=32", "model.n_group=2", "model.topk_group=1", "model.num_experts_per_tok=2",
        "mesh.zero3=true", "mesh.fsdp=true", "train.moment_dtype=bfloat16"])
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    abstract, shardings = state_shardings(Transformer(rc.model), rc, mesh)
    big = 0
    for part in ("params", "opt_state"):
        flat_a = jax.tree_util.tree_leaves_with_path(getattr(abstract, part))
        flat_s = jax.tree.leaves(getattr(shardings, part))
        for (path, a), s in zip(flat_a, flat_s):
            if a.size < 1 << 16:
                continue
            big += 1
            shard = int(np.prod(s.shard_shape(a.shape)))
            assert shard * 8 == a.size, f"{part}{jax.tree_util.keystr(path)} {a.shape}: spec {s.spec}"
    assert big > 10
