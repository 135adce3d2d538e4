"""The balancing options the ablations need: the proportional bias rule, the batch-wise balance loss, no
balancing at all, and per-expert load logging. Each default leaves training as it was."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.train import balance
from dsv3_jax.config import MeshConfig, TrainConfig
from dsv3_jax.errors import InputError
from train_utils import TEST_MODEL, make_run, run_steps, synthetic_batches, write_corpus

BATCH = synthetic_batches(1, 8, 32)


def _bias(state):
    return np.asarray(state.router_state["moe_layers"]["layers"]["moe"]["router_bias"])


def test_defaults_are_todays_behaviour():
    tc = TrainConfig()
    assert (tc.bias_update_rule, tc.balance_loss, tc.log_expert_load) == ("sign", "sequence", False)


@pytest.mark.parametrize("field", ["bias_update_rule", "balance_loss"])
def test_unknown_option_is_refused(field):
    with pytest.raises(InputError, match=field):
        TrainConfig(**{field: "typo"})


def test_proportional_rule_on_hand_made_counts():
    """b += u * (mean - c_i) / mean: an expert at twice the mean load moves by -u, an idle one by +u."""
    u = 0.01
    counts = jnp.array([[8.0, 4.0, 4.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    rs = {"moe_layers": {"layers": {"moe": {"router_bias": jnp.zeros((2, 4))}}}}
    new = balance.update_router_bias(rs, {"moe_layers": counts}, u, "proportional")
    new = np.asarray(new["moe_layers"]["layers"]["moe"]["router_bias"])
    np.testing.assert_allclose(new[0], [-u, 0, 0, u], atol=1e-8)
    np.testing.assert_allclose(new[1], 0, atol=0)
    sign = balance.update_router_bias(rs, {"moe_layers": counts}, u)["moe_layers"]["layers"]["moe"]["router_bias"]
    np.testing.assert_allclose(np.asarray(sign)[0], [-u, 0, 0, u], atol=1e-8)   # same here, different below
    skew = jnp.array([[5.0, 4.0, 4.0, 3.0]])
    rs1 = {"moe_layers": {"layers": {"moe": {"router_bias": jnp.zeros((1, 4))}}}}
    prop = balance.update_router_bias(rs1, {"moe_layers": skew}, u, "proportional")
    np.testing.assert_allclose(np.asarray(prop["moe_layers"]["layers"]["moe"]["router_bias"])[0],
                               [-u / 4, 0, 0, u / 4], atol=1e-8)


def test_batch_loss_differs_from_sequence_loss():
    """Two sequences each on their own expert: every sequence is unbalanced (sequence-wise loss high) but the
    batch is balanced over those two experts (batch-wise loss lower). Uniform routing gives 1 for both."""
    e, k, t = 4, 1, 10
    seq_counts = jnp.array([[t, 0, 0, 0], [0, t, 0, 0]], jnp.float32)          # [B=2, E]
    seq_aff = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    # sequence: f = [4, 0, 0, 0] per sequence, P = [1, 0, 0, 0] -> 4; batch: f = [2, 2, 0, 0], P = [.5, .5] -> 2
    np.testing.assert_allclose(balance.sequence_balance_loss(seq_counts, seq_aff, k, t), 4.0, rtol=1e-6)
    np.testing.assert_allclose(balance.batch_balance_loss(seq_counts, seq_aff, k, t), 2.0, rtol=1e-6)
    uniform = jnp.full((2, e), t * k / e)
    np.testing.assert_allclose(balance.batch_balance_loss(uniform, jnp.full((2, e), 1 / e), k, t), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def one_step_runs():
    """One step from the same init and batch: the batch-wise loss with the proportional rule, and no balancing
    (whose unweighted balance_loss metric is still the sequence-wise loss). Two compiles, a 2-layer model."""
    def run(**changes):
        return run_steps(make_run(MeshConfig(data=1), {"num_hidden_layers": 2}, **changes), BATCH,
                         jax.devices()[:1])
    return {
        "batch_prop": run(balance_alpha=0.1, balance_loss="batch", bias_update_rule="proportional",
                          bias_update_rate=0.5),
        "none": run(balance_alpha=0.0, bias_update_rate=0.0),
    }


def test_step_uses_the_batch_loss(one_step_runs):
    """The train step's balance term is the batch-wise loss when asked, weighted by alpha."""
    (_, [m_bat], _), (_, [m_none], _) = one_step_runs["batch_prop"], one_step_runs["none"]
    assert m_bat["ce"] == pytest.approx(m_none["ce"], rel=1e-6)                # same init, same batch
    assert abs(float(m_bat["balance_loss"]) - float(m_none["balance_loss"])) > 1e-4   # batch vs sequence
    # loss = ce + lambda * mtp + alpha * balance; 1e-5: fp32 sums of a few O(1) terms
    assert float(m_bat["loss"]) == pytest.approx(
        float(m_bat["ce"] + 0.3 * m_bat["mtp_loss"] + 0.1 * m_bat["balance_loss"]), rel=1e-5)


def test_step_applies_the_proportional_rule(one_step_runs):
    """After one step the bias equals u * (mean - c) / mean of that step's counts (sign would give +-u)."""
    _, [m], state = one_step_runs["batch_prop"]
    c = np.asarray(m["expert_counts"]["moe_layers"], np.float64)              # [L, E]
    want = 0.5 * (c.mean(-1, keepdims=True) - c) / c.mean(-1, keepdims=True)
    np.testing.assert_allclose(_bias(state), want, atol=1e-6)
    assert not np.allclose(np.abs(want), 0.5)


def test_no_balancing_leaves_bias_and_loss_alone(one_step_runs):
    _, [m], state = one_step_runs["none"]
    np.testing.assert_array_equal(_bias(state), 0.0)
    assert float(m["loss"]) == pytest.approx(float(m["ce"] + 0.3 * m["mtp_loss"]), rel=1e-6)


@pytest.mark.slow
def test_expert_load_is_logged(tmp_path):
    """log_expert_load: every metrics.jsonl row holds tokens per expert (summing to tokens x K per layer)
    and the router biases, one row of E per MoE layer (main layers, then the MTP block)."""
    from dsv3_jax.train.loop import train
    rc = make_run(MeshConfig(), steps=2, log_expert_load=True, data=write_corpus(tmp_path / "c.txt"), eval_every=2,
                  checkpoint_every=2)
    train(rc, str(tmp_path / "run"), progress=False, async_checkpoints=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    layers = TEST_MODEL.num_moe_layers + TEST_MODEL.num_nextn_predict_layers
    for r in rows:
        counts = np.asarray(r["expert_counts"])
        assert counts.shape == (layers, TEST_MODEL.n_routed_experts)
        np.testing.assert_array_equal(counts.sum(-1), 8 * 32 * TEST_MODEL.num_experts_per_tok)
        assert np.asarray(r["router_bias"]).shape == counts.shape
    assert np.abs(np.asarray(rows[-1]["router_bias"])).max() > 0
