"""The speculative step compiled for greedy requests only (`greedy_only`, dsv3_jax/infer/speculative.py) against
the step that picks its rule at run time: greedy generation now runs the former, so the equality tests of
tests/test_infer.py no longer reach the run-time rule's greedy branch; this test does, on the same tiny model
and state (a model whose drafts are right about half of the time, so rows accept and reject in one batch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.infer import generate, split_variables
from dsv3_jax.infer.decode import CHUNK, jit_decode_steps
from dsv3_jax.infer.queue import jit_prefill_rows, take_rows
from dsv3_jax.infer.request import GenerationRequest, start_request
from dsv3_jax.infer.speculative import jit_speculative_steps, start_state
from test_infer import CFG_A, MAX_LEN, agreeing_variables, prompts_20


def test_greedy_only_step_equals_run_time_rule():
    """Three device calls of 8 steps from one prefill, temperature 0: tokens, acceptance and the decode state
    are identical (exact: the same greedy rule, compiled with and without the conditionals around it)."""
    params, rs = split_variables(agreeing_variables(CFG_A))
    req = GenerationRequest(prompts_20()[:8], 48, max_len=MAX_LEN)
    outs = {}
    for greedy_only in (False, True):
        run = start_request(CFG_A, params, rs, req, mtp=True)
        st = start_state(run.lengths, run.tokens, run.tok, run.prefill.h_tail, 1)
        step, cache, got = jit_speculative_steps(CFG_A, greedy_only=greedy_only), run.cache, []
        for call in range(3):
            st, cache, emitted = step(params, rs, cache, st, jnp.ones((8,), bool), run.sampling, 1 + 8 * call, 8)
            got.append(jax.device_get((emitted, st)))
        outs[greedy_only] = got
    accepted = np.concatenate([e[1] for e, _ in outs[True]])
    assert 0.2 < accepted.mean() < 0.9, accepted.mean()               # both paths of the rule ran
    for a, b in zip(jax.tree_util.tree_leaves(outs[False]), jax.tree_util.tree_leaves(outs[True])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("speculative", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["plain", "speculative"])
def test_generate_compiles_its_step_program_once(speculative):
    """Weights on a mesh (as `generate --run-dir` places them, on a 1x1x1 one by default): the first device
    call of the decode loop gets the same input types as the calls after it (request.replicated_on_mesh_of), so the
    step program compiles once per request shape, not twice (it did: host-placed lengths and tokens)."""
    cfg = CFG_A.replace(moe_block_size=3)            # a config of its own: fresh jit caches for this test
    mesh = jax.make_mesh((1, 1, 1), ("data", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    variables = jax.device_put(agreeing_variables(cfg), NamedSharding(mesh, PartitionSpec()))
    out, stats = generate(cfg, variables, prompts_20()[:3], max_new_tokens=3 * CHUNK, speculative=speculative)
    assert stats["main_forwards"] > CHUNK            # more than one device call ran
    step = (jit_speculative_steps(cfg, greedy_only=True) if speculative else jit_decode_steps(cfg, True))
    assert step._cache_size() == 1


@pytest.mark.slow
def test_queue_compiles_refill_and_steps_once():
    """The serving queue on weights on a mesh: its first take gets the cache and slot state placed as the
    takes return them (request.replicated_on_mesh_of), so each program compiles once (host-placed inputs to
    the first refill made the second compile again). Plain greedy rows of equal length finish together, so
    every refill stages and takes two rows: one shape each. (take_rows is shared by all configs: at most one
    new program here.)"""
    cfg = CFG_A.replace(moe_block_size=5)            # a config of its own: fresh jit caches for this test
    mesh = jax.make_mesh((1, 1, 1), ("data", "expert", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    variables = jax.device_put(agreeing_variables(cfg), NamedSharding(mesh, PartitionSpec()))
    takes = take_rows._cache_size()
    out, stats = generate(cfg, variables, prompts_20()[:6], max_new_tokens=4, batch_size=2)
    assert stats["prefill_calls"] == 3 and stats["device_calls"] == 3
    assert jit_prefill_rows(cfg, "plain", 1, None)._cache_size() == 1    # the queue's key (drafts 1)
    assert take_rows._cache_size() - takes <= 1
    assert jit_decode_steps(cfg)._cache_size() == 1                # the queue's key (queue._plain_steps)


def test_queue_takes_host_weights():
    """Weights given as numpy arrays (as loaded from an .npz) run through the queue too: the slot state's
    placement falls back to the default device when the weights have no sharding (it raised AttributeError)."""
    host = jax.tree.map(np.asarray, agreeing_variables(CFG_A))
    out, _ = generate(CFG_A, host, prompts_20()[:3], max_new_tokens=2, batch_size=2)
    ref, _ = generate(CFG_A, agreeing_variables(CFG_A), prompts_20()[:3], max_new_tokens=2)
    assert out == ref


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_generate_compiles_once_on_a_2x2x2_mesh(speculative):
    """The compile-once check above on a real mesh of 8 devices, as `generate --mesh data=2,expert=2,tensor=2`
    runs it: weights with their training shardings, the CLI's generation rules, the default MoE dispatch.
    The mesh compiles the step as many times as one device does (once per attention window the request
    crosses), a second request of the same shape compiles nothing, and the tokens are those of one device."""
    from flax import traverse_util
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.hf import variable_shardings
    from dsv3_jax.infer.cli import _on_mesh, generation_rules
    from dsv3_jax.sharding import make_mesh
    from test_infer import check_same_greedy

    cfg = CFG_A.replace(moe_impl="auto", moe_block_size=7)     # the presets' dispatch; fresh jit caches
    v = agreeing_variables(cfg)
    prompts = prompts_20()[:4]                                  # rows split over data x expert = 4
    step = jit_speculative_steps(cfg, greedy_only=True) if speculative else jit_decode_steps(cfg, True)
    ref, _ = generate(cfg, v, prompts, max_new_tokens=3 * CHUNK, speculative=speculative)
    one_device = step._cache_size()
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    shardings = variable_shardings(cfg, mesh)
    placed = traverse_util.unflatten_dict({k: jax.device_put(x, shardings[k])
                                           for k, x in traverse_util.flatten_dict(v).items()})
    outs, compiled = [], []
    with _on_mesh(mesh, generation_rules(mesh, len(prompts))):
        for _ in range(2):
            outs.append(generate(cfg, placed, prompts, max_new_tokens=3 * CHUNK, speculative=speculative)[0])
            compiled.append(step._cache_size() - one_device)
    assert compiled == [one_device, one_device], (one_device, compiled)
    assert outs[0] == outs[1]
    check_same_greedy(outs[0], ref, prompts, cfg, v)
