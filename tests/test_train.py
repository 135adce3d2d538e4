"""Training step: mesh equivalence, the bias rule, microbatching, the balance loss, schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.train import balance
from dsv3_jax.config import MeshConfig, ModelConfig
from dsv3_jax.model import Transformer
from dsv3_jax.model.moe import route
from dsv3_jax.train.optimizer import learning_rate_schedule, make_optimizer
from dsv3_jax.train.state import create_train_state
from dsv3_jax.sharding import make_mesh
from train_utils import TEST_MODEL, make_run, run_steps, synthetic_batches

BATCHES = synthetic_batches(5, 8, 32)


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(make_run(MeshConfig(data=1)), BATCHES, jax.devices()[:1])


FSDP = dict(zero3=True, fsdp=True)


# The presets' default impl runs in the default suite (the path users run); dense only with -m slow.
@pytest.mark.parametrize("moe_impl,sharding", [
    pytest.param("dense", {}, marks=pytest.mark.slow, id="dense"),
    pytest.param(ModelConfig().moe_impl, {}, id="default"),
    pytest.param(ModelConfig().moe_impl, FSDP, id="default-fsdp"),
    pytest.param(ModelConfig().moe_impl, dict(FSDP, staged_gather=False), marks=pytest.mark.slow,
                 id="default-fsdp-one-gather")])
def test_2x2x2_mesh_matches_one_device(single_device_run, moe_impl, sharding):
    """5 steps on a (data 2, expert 2, tensor 2) mesh: same losses and router biases as one device's
    dense dispatch, with dense and with the presets' default ("auto": the expert-parallel form on this
    mesh), with replicated weights and with zero3 + FSDP (weights read in two gathers, or in one).
    1e-5 relative: fp32 reductions are split and ordered differently, nothing else differs (every
    dispatch computes the same sums; tests/test_moe_dispatch.py checks them to 1e-5 of a float64 loop)."""
    losses1, _, state1 = single_device_run
    losses8, _, state8 = run_steps(make_run(MeshConfig(data=2, expert=2, tensor=2, **sharding),
                                            {"moe_impl": moe_impl}), BATCHES)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    assert losses1[-1] < losses1[0]  # it trains
    # Biases move by +-gamma per step: equal sign decisions give exactly equal biases.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
                 state8.router_state, state1.router_state)
    bias = np.asarray(state1.router_state["moe_layers"]["layers"]["moe"]["router_bias"])
    assert np.abs(bias).max() > 0


@pytest.mark.slow
def test_microbatch_counts_are_whole_batch(single_device_run):
    """With 2 microbatches the bias rule sees the counts of the whole batch (and the loss is the same)."""
    losses1, metrics1, state1 = single_device_run
    losses2, metrics2, state2 = run_steps(make_run(MeshConfig(data=1), microbatches=2), BATCHES[:1],
                                          jax.devices()[:1])
    c1 = metrics1[0]["expert_counts"]["moe_layers"]
    c2 = metrics2[0]["expert_counts"]["moe_layers"]
    np.testing.assert_array_equal(c2, c1)
    assert c2.sum() == 8 * 32 * TEST_MODEL.num_experts_per_tok * TEST_MODEL.num_moe_layers
    np.testing.assert_allclose(losses2[0], losses1[0], rtol=1e-5)


def test_bias_rule_on_hand_made_counts():
    gamma = 0.001
    counts = jnp.array([[10.0, 2.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0]])   # layer 0: expert 0 overloaded
    rs = {"moe_layers": {"layers": {"moe": {"router_bias": jnp.full((2, 4), 5.0)}}}}
    new = balance.update_router_bias(rs, {"moe_layers": counts}, gamma)["moe_layers"]["layers"]["moe"]["router_bias"]
    np.testing.assert_allclose(new[0], [5 - gamma, 5 + gamma, 5 + gamma, 5 + gamma], rtol=0, atol=1e-7)
    np.testing.assert_allclose(new[1], [5.0] * 4)            # balanced layer: unchanged
    assert new.dtype == jnp.float32


def test_bias_is_not_a_parameter():
    """The bias is absent from params, hence from gradients, optimizer state and weight decay."""
    rc = make_run()
    mesh = make_mesh(rc.mesh, jax.devices()[:1])
    state = create_train_state(Transformer(rc.model), rc, mesh, make_optimizer(rc.train))
    leaf_paths = lambda tree: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}
    assert not any("router_bias" in p for p in leaf_paths(state.params))
    assert not any("router_bias" in p for p in leaf_paths(state.opt_state))
    assert all("router_bias" in p for p in leaf_paths(state.router_state))


def test_bias_changes_selection_not_weights():
    """Adding a bias changes which experts win but the gate weights of an expert stay its unbiased s."""
    cfg = TEST_MODEL
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, cfg.hidden_size)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(cfg.hidden_size, cfg.n_routed_experts)) * 0.1, jnp.float32)
    plain = route(cfg, x, kernel, jnp.zeros(cfg.n_routed_experts))
    bias = jnp.asarray(rng.choice([-5.0, 5.0], cfg.n_routed_experts) * rng.uniform(0.5, 1.5, cfg.n_routed_experts))
    biased = route(cfg, x, kernel, bias)
    assert not np.array_equal(np.sort(plain.expert_index, 1), np.sort(biased.expert_index, 1))
    s = np.asarray(biased.affinity)
    for r in (plain, biased):
        sel = np.take_along_axis(s, np.asarray(r.expert_index), 1)
        want = sel / sel.sum(1, keepdims=True) * cfg.routed_scaling_factor
        np.testing.assert_allclose(np.asarray(r.gate_weight), want, rtol=1e-6)
    # group limit: never more than topk_group groups per token; counts sum to tokens * K
    groups = np.asarray(biased.expert_index) // (cfg.n_routed_experts // cfg.n_group)
    assert max(len(set(g)) for g in groups) <= cfg.topk_group
    hits = jax.nn.one_hot(biased.expert_index, cfg.n_routed_experts).sum((0, 1))
    assert float(hits.sum()) == 64 * cfg.num_experts_per_tok


def test_sequence_balance_loss_matches_numpy():
    """Eq. 17-20 in numpy from the router's own outputs (indicator: the experts actually routed to)."""
    cfg = TEST_MODEL
    rng = np.random.default_rng(1)
    b, t, e, k = 3, 10, cfg.n_routed_experts, cfg.num_experts_per_tok
    x = jnp.asarray(rng.normal(size=(b * t, cfg.hidden_size)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(cfg.hidden_size, e)) * 0.2, jnp.float32)
    r = route(cfg, x, kernel, jnp.asarray(rng.normal(size=e), jnp.float32))
    from dsv3_jax.model.moe import routing_stats
    stats = routing_stats(cfg, r, b)
    got = balance.sequence_balance_loss(stats["seq_counts"], stats["seq_affinity"], k, t)

    idx, s = np.asarray(r.expert_index).reshape(b, t, k), np.asarray(r.affinity).reshape(b, t, e)
    want = 0.0
    for seq in range(b):
        f = np.array([e / (k * t) * sum(i in idx[seq, tt] for tt in range(t)) for i in range(e)])
        s_norm = s[seq] / s[seq].sum(-1, keepdims=True)
        p = s_norm.mean(0)
        want += (f * p).sum() / b
    np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_max_violation():
    np.testing.assert_allclose(balance.max_violation(jnp.array([[4.0, 4, 4, 4], [8.0, 4, 2, 2]])), [0.0, 1.0])


def test_lr_schedule_phases():
    rc = make_run(learning_rate=1.0, warmup_steps=10, stable_steps=5, decay_steps=10, final_lr=0.1,
                  lr_tail=((40, 0.05),))
    s = learning_rate_schedule(rc.train)
    assert float(s(0)) == 0.0 and abs(float(s(5)) - 0.5) < 1e-6
    assert abs(float(s(12)) - 1.0) < 1e-6                          # constant
    assert 0.1 < float(s(20)) < 1.0                                # cosine
    assert abs(float(s(30)) - 0.1) < 1e-6 and abs(float(s(45)) - 0.05) < 1e-6


def test_gamma_schedule():
    """gamma constant by default (V3), optionally cosine-decayed with the lr, and 0 after the stop step."""
    from dsv3_jax.train.optimizer import bias_rate
    const = make_run(bias_update_rate=1e-3).train
    assert float(bias_rate(const, 0)) == float(bias_rate(const, 10_000)) == np.float32(1e-3)
    decayed = make_run(bias_update_rate=1e-2, bias_update_rate_final=1e-3, warmup_steps=10, stable_steps=10,
                       decay_steps=10, bias_update_stop_step=40).train
    got = [float(bias_rate(decayed, s)) for s in (0, 20, 25, 30, 35, 40)]
    np.testing.assert_allclose(got, [1e-2, 1e-2, 5.5e-3, 1e-3, 1e-3, 0.0], rtol=1e-5)
