"""Every routed-expert dispatch implementation against one per-token reference (outputs and gradients),
dropless under extreme loads, and every implementation on meshes of 8 host CPU devices (the shard_map
forms of expert_parallel.py: all_gather and all_to_all exchanges, with the blocked and ragged kernels).

The reference is a Python loop over tokens and their K experts in numpy float64, with hand-written
gradients (no JAX involved). Implementations run in fp32; the tolerance is 1e-5 relative to the largest
magnitude of the compared quantity (plus 1e-7 absolute): fp32 rounding (2^-24 ~ 6e-8) accumulated over
sums of D, F and K terms stays around 1e-6 here, while a dropped, duplicated or misrouted pair changes
the result by O(1) relative to that scale.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # conftest does this too

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import dispatch, expert_few, expert_kernels, expert_parallel as ep_mod
from dsv3_jax.model.moe import MoE, route

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
    block_loops = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "while"]   # dynamic trip counts
    block = expert_kernels.block_rows(cfg, idx.size)
    rungs = len(expert_kernels.rungs(block))
    chunk = expert_kernels.BWD_CHUNK_BLOCKS * block <= idx.size + block      # the backward's longer blocks
    assert len(block_loops) == 2 * rungs + chunk, "one loop per block size, in the forward and the backward"
    carried = {tuple(v.aval.shape) for loop in block_loops for v in loop.outvars}
    assert (D, 2 * F) in carried and (F, D) in carried
    assert (E, D, 2 * F) not in carried and (E, F, D) not in carried


def _eqns(jaxpr):
    """Every equation, recursing into sub-jaxprs (loop bodies, custom rules, branches)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _eqns(sub)


# ---------------------------------------------------------------------------------------------------
# expert parallel on 8 fake CPU devices

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: XLA_FLAGS set too late")


def _group_limited_routing(cfg, n, rng):
    """Real router output (sigmoid, group limit), so a token reaches at most topk_group groups."""
    x = jnp.asarray(rng.normal(size=(n, cfg.hidden_size)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(cfg.hidden_size, cfg.n_routed_experts)).astype(np.float32))
    r = route(cfg, x, kernel, jnp.zeros((cfg.n_routed_experts,), jnp.float32))
    return np.asarray(x), np.array(r.expert_index), np.array(r.gate_weight)


@needs8
@pytest.mark.parametrize("dedup,fractions,n", [(True, (1.0,), 64), (True, (0.75, 1.0), 256),
                                               (False, (1.0,), 64)])
def test_expert_parallel_equals_single_device(dedup, fractions, n):
    """Outputs and gradients equal the single-device blocked result; the routed weights (and their
    gradients) are a quarter per device outside and inside the shard_map. The second case runs the
    capacity ladder and checks that a capacity below the worst case was the one taken."""
    cfg = make_cfg(moe_impl="expert_parallel")                   # n_group 4 == expert axis 4, topk_group 2
    rng = np.random.default_rng(3)
    x, idx, w = _group_limited_routing(cfg, n, rng)
    idx[:5] = np.arange(E - K, E)                                  # some skew: shard 3 is the busiest
    shape = ep_mod.exchange_shape(cfg, n // 8, 4, dedup, fractions)
    need = ep_mod.destination_counts(cfg, idx, ep=4, token_shards=8, dedup=dedup).max()
    if len(fractions) > 1:
        assert need <= shape.capacities[-2] < shape.capacities[-1]     # a smaller buffer sufficed
    wgu, wd = weights(rng)
    dy = rng.normal(size=(n, D)).astype(np.float32)
    local = cfg.replace(moe_impl="blocked")
    want_y, want_g = run_impl(local, x, idx, w, wgu, wd, dy)

    mesh = make_mesh((2, 4), ("data", "expert"))
    seen = []
    real = expert_kernels.blocked_local

    def spy(xr, ir, wr, w1, w2, block, num_valid_experts=None):
        seen.append((w1.shape, w2.shape))
        return real(xr, ir, wr, w1, w2, block, num_valid_experts)

    tok = NamedSharding(mesh, P(("data", "expert")))
    exp = NamedSharding(mesh, P("expert"))
    args = [jax.device_put(a, s) for a, s in ((x, tok), (idx, tok), (w, tok), (wgu, exp), (wd, exp))]
    assert args[3].addressable_shards[0].data.shape == (E // 4, D, 2, F)      # a quarter outside
    assert args[4].addressable_shards[0].data.shape == (E // 4, F, D)

    expert_kernels.KERNELS["blocked"] = spy
    try:
        with jax.set_mesh(mesh):
            y, grads = fwd_bwd(cfg, dedup=dedup, capacity_fractions=fractions)(
                args[0], args[2], args[3], args[4], args[1], jax.device_put(dy, tok))
    finally:
        expert_kernels.KERNELS["blocked"] = real
    assert seen and all(s == ((E // 4, D, 2 * F), (E // 4, F, D)) for s in seen)   # a quarter inside
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)
    assert grads[2].addressable_shards[0].data.shape == (E // 4, D, 2, F)          # grads stay sharded
    assert grads[3].addressable_shards[0].data.shape == (E // 4, F, D)


def _routed_case(cfg, seed, n=32):
    """Router output for n tokens, weights, a cotangent, and the reference output and gradients."""
    rng = np.random.default_rng(seed)
    x, idx, w = _group_limited_routing(cfg, n, rng)
    wgu, wd = weights(rng)
    dy = rng.normal(size=(n, D)).astype(np.float32)
    return (x, idx, w, wgu, wd, dy), reference(x, idx, w, wgu, wd, dy)


@needs8
def test_expert_parallel_fallbacks():
    """No mesh: the local blocked path, bit for bit. An expert axis of 1: local tokens and every expert
    per shard, the same up to rounding. (The (2,2,2) mesh and padded decode batches: below.)"""
    cfg = make_cfg(moe_impl="expert_parallel")
    (x, idx, w, wgu, wd, _), _ = _routed_case(cfg, 4)
    fn = jax.jit(lambda *a: dispatch.routed_experts(cfg, *a))
    local = np.asarray(jax.jit(lambda *a: dispatch.routed_experts(cfg.replace(moe_impl="blocked"), *a))(
        x, idx, w, wgu, wd))
    np.testing.assert_array_equal(np.asarray(fn(x, idx, w, wgu, wd)), local)
    with jax.set_mesh(make_mesh((8, 1), ("data", "expert"))):
        close(fn(x, idx, w, wgu, wd), local)


def test_exchange_shapes_and_group_limit_bound():
    """Static buffer sizes, and the host-side unit counts: with n_group == ep a token is sent to at most
    topk_group shards (dedup), against K times without dedup."""
    cfg = make_cfg()
    rng = np.random.default_rng(5)
    _, idx, _ = _group_limited_routing(cfg, 64, rng)
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


# ---------------------------------------------------------------------------------------------------
# every implementation on meshes; what "auto" picks; the config fields of the dispatch

MESHES = {"data2-expert2-tensor2": ((2, 2, 2), ("data", "expert", "tensor")),
          "data4-tensor2": ((4, 1, 2), ("data", "expert", "tensor")),
          "data8": ((8,), ("data",))}


@needs8
@pytest.mark.parametrize("impl,mesh_name", [(i, "data2-expert2-tensor2") for i in IMPLS] + [
    ("blocked", "data4-tensor2"), ("ragged", "data4-tensor2"), ("auto", "data8")])
def test_every_impl_on_a_mesh_matches_reference(impl, mesh_name):
    """Outputs and gradients inside jit under an ambient mesh (as the train step runs): the shard_map
    forms with the blocked and ragged kernels, both exchanges, F split over `tensor` (partial sums
    psum-ed), a mesh without `expert` or `tensor` axes; and 3 tokens (a decode batch that does not split
    over 8 devices: padded with weight-0 tokens)."""
    cfg = make_cfg(moe_impl=impl)
    (x, idx, w, wgu, wd, dy), (want_y, want_g) = _routed_case(cfg, 7)
    with jax.set_mesh(make_mesh(*MESHES[mesh_name])):
        y, grads = run_impl(cfg, x, idx, w, wgu, wd, dy)
        y3 = jax.jit(lambda *a: dispatch.routed_experts(cfg, *a))(x[:3], idx[:3], w[:3], wgu, wd)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)
    close(y3, want_y[:3])


@needs8
@pytest.mark.parametrize("impl,mesh_name", [("expert_parallel", "data2-expert2-tensor2"),
                                            ("ragged", "data2-expert2-tensor2")])
def test_slot_passes_match_reference(impl, mesh_name):
    """moe_slot_passes (one rematerialised kernel pass per slot on the receiving shard) gives the same
    outputs and gradients as the reference, with F split over `tensor`; its jaxpr has the scan over the
    slots and the remat. Tolerance as above (fp32: the passes only reorder sums of K terms)."""
    cfg = make_cfg(moe_impl=impl, moe_slot_passes=True, moe_capacity_fractions=(1.0,))
    (x, idx, w, wgu, wd, dy), (want_y, want_g) = _routed_case(cfg, 7)
    with jax.set_mesh(make_mesh(*MESHES[mesh_name])):
        y, grads = run_impl(cfg, x, idx, w, wgu, wd, dy)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)
    prims = _primitives(cfg, make_mesh(*MESHES[mesh_name]))
    assert {"scan", "remat2"} <= prims and "remat2" not in _primitives(
        cfg.replace(moe_slot_passes=False), make_mesh(*MESHES[mesh_name]))


@needs8
@pytest.mark.parametrize("impl", ["expert_parallel", "ragged", "blocked"])
def test_zero3_expert_weights_gather_inside_and_reduce_scatter_their_gradients(impl):
    """Under zero3 (the rules put the expert weights' D on `data`) the shard_map takes them D-sharded and
    all-gathers them inside, so the backward is a reduce-scatter (psum_scatter) into each device's shard,
    not an all-reduce of the full weights followed by a slice. Outputs and gradients equal the reference
    (fp32, tolerance as above), and the gradients keep the zero3 sharding. Without zero3 nothing is gathered
    inside, and the replicated weights' gradients are psum-ed over `data`."""
    from dsv3_jax.sharding import activate
    cfg = make_cfg(moe_impl=impl, moe_capacity_fractions=(1.0,))
    (x, idx, w, wgu, wd, dy), (want_y, want_g) = _routed_case(cfg, 7)
    mesh = make_mesh(*MESHES["data2-expert2-tensor2"])
    zero3 = (NamedSharding(mesh, P("expert", "data", None, "tensor")), NamedSharding(mesh, P("expert", "tensor", "data")))
    wgu_s, wd_s = jax.device_put(wgu, zero3[0]), jax.device_put(wd, zero3[1])
    def over_data(*args):       # the collectives over `data` in the step's jaxpr
        jaxpr = jax.make_jaxpr(fwd_bwd(cfg))(*args).jaxpr
        names = (e.primitive.name for e in _eqns(jaxpr) if e.primitive.name != "pvary"
                 and "data" in str(e.params.get("axis_name", e.params.get("axes", ""))))
        return sorted("psum" if n.startswith("psum") else n for n in names)    # psum_invariant in jax 0.10

    with activate(mesh, zero3=True, fsdp=True):
        y, grads = run_impl(cfg, x, idx, w, wgu_s, wd_s, dy)
        collectives = over_data(x, w, wgu_s, wd_s, idx, dy)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)
    assert collectives == ["all_gather", "all_gather", "reduce_scatter", "reduce_scatter"], collectives
    assert grads[2].sharding.is_equivalent_to(zero3[0], 4) and grads[3].sharding.is_equivalent_to(zero3[1], 3)
    with activate(mesh, zero3=False):       # weights replicated over data: their gradients are summed (psum)
        assert over_data(x, w, wgu, wd, idx, dy) == ["psum", "psum"]


def _primitives(cfg, mesh):
    (x, idx, w, wgu, wd, _), _ = _routed_case(cfg, 8)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda *a: dispatch.routed_experts(cfg, *a))(x, idx, w, wgu, wd)
    return {e.primitive.name for e in _eqns(jaxpr.jaxpr)}


@needs8
def test_auto_resolves_by_platform_and_mesh():
    """auto is the default of every preset and of HF loads. On CPU: blocked without a mesh or with an
    expert axis of 1, the expert-parallel form (all_to_all over `expert`) with an expert axis above 1;
    explicit choices pass through. The traced program shows the form: blocked on an expert mesh
    all-gathers instead."""
    from dsv3_jax.config import PRESETS, from_hf_dict, to_hf_dict
    cfg = make_cfg()
    assert cfg.moe_impl == "auto" and all(p.moe_impl == "auto" for p in PRESETS.values())
    assert from_hf_dict(to_hf_dict(PRESETS["v3-671b"])).moe_impl == "auto"             # HF loads too
    ep_mesh = make_mesh((2, 2, 2), ("data", "expert", "tensor"))
    assert dispatch.resolve_impl(cfg, None) == "blocked"
    assert dispatch.resolve_impl(cfg, make_mesh((8, 1, 1), ("data", "expert", "tensor"))) == "blocked"
    assert dispatch.resolve_impl(cfg, ep_mesh) == "expert_parallel"
    assert dispatch.resolve_impl(cfg.replace(moe_impl="dense"), ep_mesh) == "dense"
    prims = _primitives(cfg, ep_mesh)
    assert {"shard_map", "all_to_all"} <= prims
    prims = _primitives(cfg.replace(moe_impl="blocked"), ep_mesh)
    assert "all_gather" in prims and "all_to_all" not in prims
    assert "shard_map" not in _primitives(cfg, make_mesh((1, 1, 1), ("data", "expert", "tensor")))


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
        return {e.primitive.name for e in _eqns(jax.make_jaxpr(lambda *a: dispatch.routed_experts(
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
