"""The blocked online-softmax attention (model/attention.py) against the plain core, alone and in the model;
the bf16-moment AdamW; the FSDP sharding rules."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsv3_jax.model import Transformer
from dsv3_jax.model.attention import blocked_attention
from dsv3_jax.model.mla import attention_core, causal_attention_core
from dsv3_jax.train.optimizer import scale_by_adam_stored_as
from train_utils import TEST_MODEL


def _qkv(b=2, h=3, t=40, k=12, v=8, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), jnp.float32) for s in ((b, h, t, k), (b, h, t, k), (b, h, t, v)))


@pytest.mark.parametrize("block_q,block_k", [(16, 8), (7, 13)])
def test_blocked_attention_equals_plain_forward_and_grads(block_q, block_k):
    """Causal, a random key mask, one row with no valid key at all (the uniform average, as the plain form
    gives), blocks that do and do not divide T. fp32 throughout: 1e-5 absolute is ~30 ulps at these
    magnitudes (outputs and grads are O(1)); a wrong mask or a missed rescale moves them by O(0.1)."""
    q, k, v = _qkv()
    b, t = q.shape[0], q.shape[2]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = jnp.asarray(np.random.default_rng(1).random((b, t)) > 0.3).at[1].set(False)
    mask = (pos[:, None, :, None] >= pos[:, None, None, :]) & valid[:, None, None, :]
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape[:3] + v.shape[-1:]), jnp.float32)

    def plain(q, k, v):
        return (attention_core(q, k, v, mask) * w).sum()

    def blocked(q, k, v):
        return (blocked_attention(q, k, v, pos, pos, valid, block_q, block_k) * w).sum()

    np.testing.assert_allclose(jax.jit(blocked_attention, static_argnums=(6, 7))(q, k, v, pos, pos, valid,
                                                                                 block_q, block_k),
                               attention_core(q, k, v, mask), atol=1e-5)
    for g_plain, g_blocked in zip(jax.jit(jax.grad(plain, (0, 1, 2)))(q, k, v),
                                  jax.jit(jax.grad(blocked, (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(g_blocked, g_plain, atol=1e-5)


@pytest.mark.slow
def test_model_with_blocked_attention_equals_plain():
    """The whole model (MLA with blocked attention, block 8 over T=32): same logits within 1e-5 (fp32)."""
    cfg = TEST_MODEL
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)), jnp.int32)
    variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)
    plain = jax.jit(Transformer(cfg).apply)(variables, tokens)
    blocked = jax.jit(Transformer(dataclasses.replace(cfg, attention_impl="blocked", attention_block=8)).apply)(
        variables, tokens)
    np.testing.assert_allclose(blocked.logits, plain.logits, atol=1e-5)
    np.testing.assert_allclose(blocked.mtp_logits[0], plain.mtp_logits[0], atol=1e-5)


def test_core_backward_equals_autodiff_of_the_plain_math():
    """attention_core's written-out backward (dK, dV as products on transposed operands) against jax's autodiff
    of the same math in plain jnp, with a causal mask and a row missing some keys. fp32: 1e-5 absolute is
    ~30 ulps at these magnitudes; a transposed or misplaced product moves the grads by O(0.1)."""
    q, k, v = _qkv()
    t = q.shape[2]
    mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]
    mask = jnp.broadcast_to(mask, (q.shape[0], 1, t, t)).at[1, 0, 9, 2:6].set(False)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape[:3] + v.shape[-1:]), jnp.float32)

    def reference(q, k, v):
        s = jnp.where(mask, jnp.einsum("bhtk,bhsk->bhts", q, k), -1e30)
        return (jnp.einsum("bhts,bhsv->bhtv", jax.nn.softmax(s, -1), v) * w).sum()

    grads = [jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)
             for f in (reference, lambda q, k, v: (attention_core(q, k, v, mask) * w).sum())]
    for g_ref, g_core in zip(*grads):
        np.testing.assert_allclose(g_core, g_ref, atol=1e-5)


@pytest.mark.parametrize("block", [16, 7])
def test_causal_block_skip_equals_the_masked_core(block):
    """The causal core that skips the blocks above the diagonal against the full masked core, forward and
    gradients, with blocks that do and do not divide T. 1e-5 absolute in fp32 as above: a block attending
    to a key it should not see, or missing one, moves outputs and grads by O(0.1)."""
    q, k, v = _qkv()
    t = q.shape[2]
    mask = jnp.asarray(np.tril(np.ones((t, t), bool)))[None, None]
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape[:3] + v.shape[-1:]), jnp.float32)
    np.testing.assert_allclose(causal_attention_core(q, k, v, block), attention_core(q, k, v, mask), atol=1e-5)
    grads = [jax.jit(jax.grad(lambda q, k, v: (f(q, k, v) * w).sum(), (0, 1, 2)))(q, k, v)
             for f in (lambda q, k, v: attention_core(q, k, v, mask),
                       lambda q, k, v: causal_attention_core(q, k, v, block))]
    for g_full, g_skip in zip(*grads):
        np.testing.assert_allclose(g_skip, g_full, atol=1e-5)


def test_model_default_positions_skip_blocks_and_equal_explicit_positions():
    """The model with default positions (causal by index: the block skip, 8-row blocks over T=32) against the
    same positions passed explicitly (the full masked core): logits and MTP logits within 1e-5 (fp32)."""
    cfg = dataclasses.replace(TEST_MODEL, attention_causal_block=8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)), jnp.int32)
    model = Transformer(cfg)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    skip = jax.jit(model.apply)(variables, tokens)
    full = jax.jit(model.apply)(variables, tokens, jnp.broadcast_to(jnp.arange(32), tokens.shape))
    np.testing.assert_allclose(skip.logits, full.logits, atol=1e-5)
    np.testing.assert_allclose(skip.mtp_logits[0], full.mtp_logits[0], atol=1e-5)


def test_adam_with_moments_stored_in_fp32_equals_optax_and_bf16_stays_close():
    """Stored in fp32 the transform is optax's scale_by_adam (1e-6: same math, other op order); stored in
    bf16 (8 mantissa bits, relative rounding 2^-9 per store) the updates stay within 2% over 20 steps."""
    r = np.random.default_rng(0)
    params = {"w": jnp.asarray(r.normal(size=(16, 8)), jnp.float32)}
    grads = [{"w": jnp.asarray(r.normal(size=(16, 8)), jnp.float32)} for _ in range(20)]
    ref, f32, b16 = optax.scale_by_adam(0.9, 0.95, 1e-8), *(scale_by_adam_stored_as(d, 0.9, 0.95, 1e-8)
                                                            for d in (jnp.float32, jnp.bfloat16))
    states = [t.init(params) for t in (ref, f32, b16)]
    assert states[2].mu["w"].dtype == states[2].nu["w"].dtype == jnp.bfloat16
    for g in grads:
        outs = [t.update(g, s, params) for t, s in zip((ref, f32, b16), states)]
        states = [o[1] for o in outs]
        np.testing.assert_allclose(outs[1][0]["w"], outs[0][0]["w"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(outs[2][0]["w"], outs[0][0]["w"], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("staged", [True, False])
def test_fsdp_weights_are_read_through_a_data_shard_when_staged(staged):
    """Where a weight is read (`layers.param` names its FSDP axis `*_read`), the staged rules constrain it to a
    `data` shard first (one gather over expert x tensor, then one over data); unstaged, the read names resolve
    to the stored sharding, so the constraint is a no-op. Expert weights (expert axis taken) read as stored
    either way, and without fsdp nothing changes."""
    import flax.linen as nn
    from dsv3_jax.sharding import logical_rules
    def spec(axes, **kw):
        with nn.logical_axis_rules(logical_rules(**kw)):
            return tuple(nn.logical_to_mesh_axes(axes))
    fsdp = dict(zero3=True, fsdp=True, staged_gather=staged)
    for stored, read in ((("embed", "heads"), ("embed_read", "heads")), (("q_lora", "heads", None),
                                                                         ("q_lora_read", "heads", None)),
                         (("embed", "mlp"), ("embed_read", "mlp")), (("kv_lora",), ("kv_lora_read",))):
        want = ("data",) + spec(stored, **fsdp)[1:] if staged else spec(stored, **fsdp)
        assert spec(read, **fsdp) == want, (read, spec(read, **fsdp))
    assert spec(("embed", "heads"), **fsdp) == (("data", "expert"), "tensor")
    assert spec(("expert", "embed_read", None, "mlp"), **fsdp) == spec(("expert", "embed", None, "mlp"), **fsdp)
    for kw in (dict(zero3=True), dict()):
        assert spec(("embed_read", "kv_lora_read"), **kw) == spec(("embed", "kv_lora"), **kw)


def test_fsdp_rules_shard_every_parameter_over_data_and_expert():
    """With mesh.fsdp, non-expert weights (and MLA's up-projections, which have no embed axis) are sharded
    over data x expert; expert weights keep the expert axis for their experts and data for embed."""
    from dsv3_jax.config import MeshConfig, RunConfig
    from dsv3_jax.sharding import make_mesh
    from dsv3_jax.train.state import state_shardings
    rc = RunConfig(TEST_MODEL, mesh=MeshConfig(data=2, expert=2, tensor=2, zero3=True, fsdp=True))
    _, sh = state_shardings(Transformer(rc.model), rc, make_mesh(rc.mesh))
    p = sh.params
    assert tuple(p["embedding"].spec) == ("tensor", ("data", "expert"))
    attn = p["moe_layers"]["layers"]["attn"]
    assert tuple(attn["q_b_proj"].spec)[1] == ("data", "expert")          # [layers, q_lora, heads, head_dim]
    assert tuple(attn["kv_b_proj"].spec)[1] == ("data", "expert")
    assert tuple(p["moe_layers"]["layers"]["moe"]["experts_gate_up"].spec)[1:3] == ("expert", "data")
