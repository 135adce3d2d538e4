"""Every routed-expert dispatch implementation on one device against one per-token reference (outputs
and gradients), dropless under extreme loads; the few-token and capacity paths and the rules that pick
them. The meshes of 8 fake devices are in tests/test_moe_dispatch_mesh.py.

The reference is a Python loop over tokens and their K experts in numpy float64, with hand-written
gradients (no JAX involved; tests/moe_utils.py). Implementations run in fp32; the tolerance is 1e-5
relative to the largest magnitude (moe_utils.close says why that is enough).
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import dispatch, expert_few, expert_kernels, expert_parallel as ep_mod
from dsv3_jax.model.moe import MoE
from moe_utils import (D, E, F, IMPLS, K, close, eqns, group_limited_routing, make_cfg, make_mesh, reference,
                       routing, run_impl, weights)



# ---------------------------------------------------------------------------------------------------
# every implementation == the per-token reference

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,n,block", [("uneven", 24, 16), ("same", 9, 4), ("random", 2, 128)])
def test_matches_per_token_reference(impl, kind, n, block):
    """Outputs and gradients (x, w, w_gate_up, w_down). 'uneven': one expert gets every token (a full
    block of 16 rows and a tail block of 8), one gets none, the rest 0-16 rows (tail blocks only);
    'same': all tokens on the same K experts (blocks of 4, two full and a partial one each); n=2 with
    128-row blocks is the decode shape (the block shrinks to the pairs there are). No mesh:
    expert_parallel is local here."""
    rng = np.random.default_rng([n, block, len(kind)])
    idx, w = routing(kind, n, rng)
    wgu, wd = weights(rng)
    x = rng.normal(size=(n, D)).astype(np.float32)
    dy = rng.normal(size=(n, D)).astype(np.float32)
    want_y, want_g = reference(x, idx, w, wgu, wd, dy)
    cfg = make_cfg(moe_impl=impl, moe_block_size=block)
    y, grads = run_impl(cfg, x, idx, w, wgu, wd, dy)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)



def test_gathered_computes_only_the_chosen_experts():
    """The compiled FLOPs of forward + backward (XLA's cost_analysis, compile only): `gathered` does the pairs'
    matmuls plus its padding, at most E x R rows (here 1 + E * R / P = 1.125 of the useful work; 1.25 leaves
    room for the elementwise ops), while `ragged`, which XLA:CPU (like XLA:GPU) expands over every expert,
    does about E / K = 8 times the useful work. What the gathered form is for (experiments/results/gpu.md)."""
    n, d, f, e, k, block = 2048, 64, 32, 16, 2, 32
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    args = (jnp.asarray(rng.normal(size=(n, d)), jnp.float32), jnp.asarray(idx),
            jnp.asarray(rng.random((n, k)), jnp.float32), jnp.zeros((e, d, 2 * f)), jnp.zeros((e, f, d)))
    useful = 3 * 2 * n * k * (d * 2 * f + f * d)                 # forward + backward (2x) of both matmuls

    def flops(kernel):
        def loss(x, idx, w, w1, w2):
            return expert_kernels.KERNELS[kernel](x, idx, w, w1, w2, block).sum()
        grad = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4)))
        cost = grad.lower(*args).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"] / useful

    gathered, ragged = flops("gathered"), flops("ragged")
    assert 1.0 <= gathered <= 1.25, gathered
    assert ragged >= 0.8 * e / k, ragged

def test_blocked_dropless_everything_on_one_expert():
    """K=1 and every token on one expert: 37 rows = 2 full blocks of 16 + a tail block of 8 holding 5."""
    rng = np.random.default_rng(1)
    n = 37
    idx = np.full((n, 1), 5, np.int32)
    w = rng.uniform(0.5, 1, (n, 1)).astype(np.float32)
    wgu, wd = weights(rng)
    x, dy = (rng.normal(size=(n, D)).astype(np.float32) for _ in range(2))
    want_y, want_g = reference(x, idx, w, wgu, wd, dy)
    cfg = make_cfg(moe_impl="blocked", num_experts_per_tok=1, moe_block_size=16)
    y, grads = run_impl(cfg, x, idx, w, wgu, wd, dy)
    close(y, want_y)
    assert np.abs(np.asarray(y)).min(axis=1).max() > 0            # no token came back empty
    for got, want in zip(grads, want_g):
        close(got, want)


@pytest.mark.parametrize("n,block", [(75, 16), (56, 32), (37, 4)])
def test_blocked_every_block_size(n, block):
    """Expert 5 holds every token (K=2, the second expert random), so its rows take each block size the
    loops have: n=75, block 16: the backward's 64-row block, then a rounded-up 8-row tail; n=56, block 32:
    one block each of 32, 16 and 8 rows; n=37, block 4: 16-row backward blocks, then rounded-up 4-row
    blocks. The other experts take the tails only. Against the float64 reference at the same 1e-5 of scale
    as the other tests (fp32 sums over at most n rows)."""
    rng = np.random.default_rng([n, block])
    others = np.array([e for e in range(E) if e != 5])
    idx = np.stack([np.full(n, 5), rng.choice(others, n)], axis=1).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (n, 2)).astype(np.float32)
    wgu, wd = weights(rng)
    x, dy = (rng.normal(size=(n, D)).astype(np.float32) for _ in range(2))
    want_y, want_g = reference(x, idx, w, wgu, wd, dy)
    cfg = make_cfg(moe_impl="blocked", num_experts_per_tok=2, moe_block_size=block)
    y, grads = run_impl(cfg, x, idx, w, wgu, wd, dy)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)


def test_blocked_backward_accumulates_per_expert():
    """The custom backward writes each expert's weight gradient once: the loop over blocks carries
    [D, 2F] and [F, D] accumulators, never a stacked [E, D, 2F] / [E, F, D] gradient (which is what
    autodiff of a scan over blocks builds, once per block)."""
    cfg = make_cfg(moe_impl="blocked")
    rng = np.random.default_rng(2)
    idx, w = routing("random", 16, rng)
    wgu, wd = weights(rng)
    x = jnp.asarray(rng.normal(size=(16, D)).astype(np.float32))
    jaxpr = jax.make_jaxpr(jax.grad(lambda wgu, wd: jnp.sum(dispatch.routed_experts(
        cfg, x, jnp.asarray(idx), jnp.asarray(w), wgu, wd)), (0, 1)))(jnp.asarray(wgu), jnp.asarray(wd))
    block_loops = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "while"]   # dynamic trip counts
    block = expert_kernels.block_rows(cfg, idx.size)
    rungs = len(expert_kernels.rungs(block))
    chunk = expert_kernels.BWD_CHUNK_BLOCKS * block <= idx.size + block      # the backward's longer blocks
    assert len(block_loops) == 2 * rungs + chunk, "one loop per block size, in the forward and the backward"
    carried = {tuple(v.aval.shape) for loop in block_loops for v in loop.outvars}
    assert (D, 2 * F) in carried and (F, D) in carried
    assert (E, D, 2 * F) not in carried and (E, F, D) not in carried


def test_exchange_shapes_and_group_limit_bound():
    """Static buffer sizes, and the host-side unit counts: with n_group == ep a token is sent to at most
    topk_group shards (dedup), against K times without dedup."""
    cfg = make_cfg()
    rng = np.random.default_rng(5)
    _, idx, _ = group_limited_routing(cfg, 64, rng)
    s = ep_mod.exchange_shape(cfg, 8, 4, dedup=True, capacity_fractions=(1.0,))
    assert s.capacities == (8,) and s.slots == min(K, E // 4)              # n per destination
    assert ep_mod.exchange_shape(cfg, 8, 4, dedup=False, capacity_fractions=(1.0,)).capacities == (16,)
    ladder = ep_mod.exchange_shape(cfg, 64, 4, dedup=True, capacity_fractions=(0.25, 0.5, 1.0))
    assert ladder.capacities == (16, 32, 64)
    sent = ep_mod.destination_counts(cfg, idx, ep=4, token_shards=8, dedup=True)
    assert sent.sum() <= 64 * cfg.topk_group
    assert ep_mod.destination_counts(cfg, idx, ep=4, token_shards=8, dedup=False).sum() == 64 * K


# ---------------------------------------------------------------------------------------------------
# the whole MoE module with each implementation

def test_moe_module_every_impl_agrees():
    cfg = make_cfg(moe_impl="dense", initializer_range=0.3)
    b, t = 4, 8
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, D))
    variables = MoE(cfg).init(jax.random.PRNGKey(1), x)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=E).astype(np.float32))
    variables = {**variables, "router_state": {"router_bias": bias}}

    def run(impl, mesh=None):
        c = cfg.replace(moe_impl=impl)

        def loss(params, x):
            (y, stats) = MoE(c).apply({**variables, "params": params}, x)
            return jnp.sum(y * jnp.cos(y)), (y, stats)
        f = jax.jit(jax.value_and_grad(loss, has_aux=True))
        if mesh is None:
            return f(variables["params"], x)
        with jax.set_mesh(mesh):
            return f(variables["params"], x)

    def forward(impl):
        return jax.jit(lambda v, x: MoE(cfg.replace(moe_impl=impl)).apply(v, x))(variables, x)

    (_, (y0, s0)), g0 = run("dense")
    for impl in ("ragged",):                                   # forward only (ragged_dot is slow on CPU)
        y, s = forward(impl)
        close(y, y0)
        np.testing.assert_array_equal(s["expert_counts"], s0["expert_counts"])
    runs = [run("blocked")]                                    # and gradients of the new paths
    if jax.device_count() >= 8:
        runs.append(run("expert_parallel", make_mesh((2, 4), ("data", "expert"))))
    for (_, (y, s)), g in runs:
        close(y, y0)
        np.testing.assert_array_equal(s["expert_counts"], s0["expert_counts"])
        for a, b_ in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            close(a, b_)


def test_block_size_rule_and_capacity_config():
    """moe_block_size 0 (the default) is 64 rows at E >= 256, 128 below; a set value wins; tiny batches
    shrink the block. moe_capacity_fractions is validated, read from JSON lists and CLI overrides, and
    feeds the exchange's capacities."""
    from dsv3_jax.config import RunConfig
    assert make_cfg().moe_block_size == 4 and ModelConfig().moe_block_size == 0
    assert expert_kernels.block_size(ModelConfig()) == 64                    # v3-671b: 256 experts
    assert expert_kernels.block_size(ModelConfig(n_routed_experts=64, n_group=8)) == 128
    assert expert_kernels.block_size(ModelConfig(moe_block_size=32)) == 32
    assert expert_kernels.block_rows(ModelConfig(), 3) == 8                   # one decode token, K=3
    for bad in ((), (0.0, 1.0), (1.5,), ("x",)):
        with pytest.raises(ValueError, match="moe_capacity_fractions"):
            make_cfg(moe_capacity_fractions=bad)
    with pytest.raises(ValueError, match="moe_block_size"):
        make_cfg(moe_block_size=-1)
    cfg = ModelConfig.from_dict({**make_cfg().to_dict(), "moe_capacity_fractions": [0.5, 1.0]})
    assert cfg.moe_capacity_fractions == (0.5, 1.0)
    rc = RunConfig(make_cfg()).override(["model.moe_capacity_fractions=[0.25,1]"])
    assert rc.model.moe_capacity_fractions == (0.25, 1)
    assert ep_mod.exchange_shape(rc.model, 64, 4).capacities == (16, 64)


# ---------------------------------------------------------------------------------------------------
# the few-token path (expert_few.py) that decode steps take

@pytest.mark.parametrize("kind,n", [("random", 3), ("same", 6), ("uneven", 20)])
def test_few_token_path_matches_reference(kind, n):
    """few_local against the per-token reference, outputs and gradients, same 1e-5 tolerance (module
    docstring): n=3 (a batch-3 decode step, blocks of 4 rows mostly empty), 'same' (K
    experts with 6 rows each: a full block of 4 and a partial one each, most of the table's blocks skip),
    'uneven' n=20 (N*K = 60 >= 4E: blocks of 8 rows; one expert on every token, so 3 blocks, one on
    none). Gradients through routed_experts with gather_if_few, which takes this
    path without a mesh while N*K <= FEW_PAIRS_PER_EXPERT * E whatever the moe_impl (checked: the traced
    program is the same for every implementation, and not the blocked kernel's)."""
    rng = np.random.default_rng([n, len(kind), 7])
    idx, w = routing(kind, n, rng)
    wgu, wd = weights(rng)
    x = rng.normal(size=(n, D)).astype(np.float32)
    dy = rng.normal(size=(n, D)).astype(np.float32)
    want_y, want_g = reference(x, idx, w, wgu, wd, dy)
    close(expert_few.few_local(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w),
                               jnp.asarray(wgu).reshape(E, D, 2 * F), jnp.asarray(wd)), want_y)
    assert n * K <= dispatch.FEW_PAIRS_PER_EXPERT * E
    traced = lambda impl, few=True: str(jax.make_jaxpr(lambda *a: dispatch.routed_experts(
        make_cfg(moe_impl=impl), *a, gather_if_few=few))(x, idx, w, wgu, wd))
    assert len({traced(impl) for impl in IMPLS}) == 1 and traced("blocked") != traced("blocked", False)

    def f(x, w, wgu, wd, idx, dy):
        y, vjp = jax.vjp(lambda *p: dispatch.routed_experts(make_cfg(), p[0], idx, *p[1:], gather_if_few=True),
                         x, w, wgu, wd)
        return y, vjp(dy)
    y, grads = jax.jit(f)(x, w, wgu, wd, idx, dy)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)


@pytest.mark.parametrize("kind,n,fits", [("random", 4, True), ("same", 6, True), ("uneven", 20, False)])
def test_capacity_path_matches_reference(kind, n, fits):
    """capacity_local (C row slots per expert, matmuls batched over E) against the per-token reference, same
    1e-5 tolerance. Where every expert's pairs fit in C (random n=4; 'same': K experts with 6 pairs each,
    C=8), the slot form alone matches; where one expert has more (uneven n=20: expert 0 on all 20 tokens,
    C=18), the slot form drops pairs (checked: off by more than 1e-3) and capacity_local must send the two
    past C through few_local's blocks to match."""
    rng = np.random.default_rng([n, len(kind), 11])
    idx, w = routing(kind, n, rng)
    wgu, wd = weights(rng)
    x = rng.normal(size=(n, D)).astype(np.float32)
    want_y, _ = reference(x, idx, w, wgu, wd, np.zeros((n, D), np.float32))
    c = expert_few.expert_capacity(n * K, E)
    assert (np.bincount(idx.ravel(), minlength=E).max() <= c) == fits
    args = [jnp.asarray(a) for a in (x, idx, w, wgu.reshape(E, D, 2 * F), wd)]
    slots = expert_few.capacity_slots(*args, c)
    if fits:
        close(slots, want_y)
    else:
        assert np.abs(np.asarray(slots) - want_y).max() > 1e-3
    close(jax.jit(expert_few.capacity_local)(*args), want_y)


@pytest.mark.parametrize("e,k,n,want", [(8, 3, 3, "capacity"), (8, 3, 21, "capacity"), (16, 2, 4, "few"),
                                        (32, 2, 16, "capacity"), (32, 2, 17, "few")])
def test_capacity_path_only_when_most_experts_are_chosen(monkeypatch, e, k, n, want):
    """The few-token rule (dispatch docstring): capacity_local once N*K >= E and its E*C rows are at most
    CAPACITY_ROWS (E=32, K=2: 16 tokens give C=4, 128 rows; 17 give C=6, 192 rows), few_local below E pairs
    (E=16, K=2, 4 tokens) or past that; the output matches the reference either way."""
    chosen = []
    for name in ("capacity_local", "few_local"):
        monkeypatch.setattr(dispatch, name, lambda *a, _f=getattr(expert_few, name), _n=name: (
            chosen.append(_n.split("_")[0]), _f(*a))[1])
    rng = np.random.default_rng([e, k, n])
    idx, w = routing("random", n, rng, e, k)
    wgu, wd = weights(rng, e)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = dispatch.routed_experts(make_cfg(), *(jnp.asarray(a) for a in (x, idx, w, wgu, wd)), gather_if_few=True)
    assert chosen == [want]
    close(y, reference(x, idx, w, wgu, wd, np.zeros((n, D), np.float32))[0])


def test_few_token_path_only_for_few_tokens():
    """Past FEW_PAIRS_PER_EXPERT * E pairs (a prefill, a train step) the implementation's own kernel runs;
    up to GATHER_TOKENS tokens (batch-1 decode and verify steps) the per-pair gather does."""
    rng = np.random.default_rng(3)
    n = dispatch.FEW_PAIRS_PER_EXPERT * E // K + 1
    idx, w = routing("random", n, rng)
    wgu, wd = weights(rng)
    x = rng.normal(size=(n, D)).astype(np.float32)

    def primitives(x, idx, w):
        return {e.primitive.name for e in eqns(jax.make_jaxpr(lambda *a: dispatch.routed_experts(
            make_cfg(), *a, gather_if_few=True))(x, idx, w, wgu, wd).jaxpr)}
    assert "cond" not in primitives(x, idx, w) and "while" in primitives(x, idx, w)      # blocked loops
    assert {"cond", "while", "scan"}.isdisjoint(primitives(x[:dispatch.GATHER_TOKENS], idx[:dispatch.GATHER_TOKENS],
                                                          w[:dispatch.GATHER_TOKENS]))


@pytest.mark.parametrize("kind,n,c", [("same", 6, 1), ("same", 6, 4), ("uneven", 20, 2), ("uneven", 20, 9),
                                      ("random", 12, 1)])
def test_capacity_overflow_blocks_match_reference(kind, n, c):
    """capacity_local with a small C: each expert's pairs past C go through few_local's blocks (`skip`), so
    nothing is dropped however many experts overflow and by how much ('same': K experts with n pairs each;
    'uneven': one expert on every token; 'random' with C=1: most experts past C), against the per-token
    reference to the same 1e-5 tolerance; and the blocks alone hold exactly what the slots drop."""
    rng = np.random.default_rng([n, c, 13])
    idx, w = routing(kind, n, rng)
    wgu, wd = weights(rng)
    x = rng.normal(size=(n, D)).astype(np.float32)
    assert np.bincount(idx.ravel(), minlength=E).max() > c
    want = reference(x, idx, w, wgu, wd, np.zeros((n, D), np.float32))[0]
    args = [jnp.asarray(a) for a in (x, idx, w, wgu.reshape(E, D, 2 * F), wd)]
    close(jax.jit(lambda *a: expert_few.capacity_local(*a, capacity=c))(*args), want)
    close(expert_few.capacity_slots(*args, c) + expert_few.few_local(*args, skip=c), want)
