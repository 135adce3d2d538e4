"""Every routed-expert implementation on meshes of 8 host CPU devices (the shard_map forms of
expert_parallel.py: all_gather and all_to_all exchanges, the blocked and ragged kernels, F split over
`tensor`, zero3 weights gathered inside), against the per-token reference of tests/moe_utils.py (fp32,
tolerance 1e-5 relative: moe_utils.close says why), and what "auto" resolves to on each mesh.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # conftest does this too

import numpy as np
import pytest

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.model import dispatch, expert_kernels, expert_parallel as ep_mod
from moe_utils import (D, E, F, K, IMPLS, close, eqns, fwd_bwd, group_limited_routing, jaxpr_primitives,
                       make_cfg, make_mesh, needs8, routed_case, run_impl, weights)


@needs8
@pytest.mark.parametrize("dedup,fractions,n", [(True, (1.0,), 64), (True, (0.75, 1.0), 256),
                                               (False, (1.0,), 64)])
def test_expert_parallel_equals_single_device(dedup, fractions, n):
    """Outputs and gradients equal the single-device blocked result; the routed weights (and their
    gradients) are a quarter per device outside and inside the shard_map. The second case runs the
    capacity ladder and checks that a capacity below the worst case was the one taken."""
    cfg = make_cfg(moe_impl="expert_parallel")                   # n_group 4 == expert axis 4, topk_group 2
    rng = np.random.default_rng(3)
    x, idx, w = group_limited_routing(cfg, n, rng)
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


@needs8
def test_expert_parallel_fallbacks():
    """No mesh: the local blocked path, bit for bit. An expert axis of 1: local tokens and every expert
    per shard, the same up to rounding. (The (2,2,2) mesh and padded decode batches: below.)"""
    cfg = make_cfg(moe_impl="expert_parallel")
    (x, idx, w, wgu, wd, _), _ = routed_case(cfg, 4)
    fn = jax.jit(lambda *a: dispatch.routed_experts(cfg, *a))
    local = np.asarray(jax.jit(lambda *a: dispatch.routed_experts(cfg.replace(moe_impl="blocked"), *a))(
        x, idx, w, wgu, wd))
    np.testing.assert_array_equal(np.asarray(fn(x, idx, w, wgu, wd)), local)
    with jax.set_mesh(make_mesh((8, 1), ("data", "expert"))):
        close(fn(x, idx, w, wgu, wd), local)



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
    (x, idx, w, wgu, wd, dy), (want_y, want_g) = routed_case(cfg, 7)
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
    (x, idx, w, wgu, wd, dy), (want_y, want_g) = routed_case(cfg, 7)
    with jax.set_mesh(make_mesh(*MESHES[mesh_name])):
        y, grads = run_impl(cfg, x, idx, w, wgu, wd, dy)
    close(y, want_y)
    for got, want in zip(grads, want_g):
        close(got, want)
    prims = jaxpr_primitives(cfg, make_mesh(*MESHES[mesh_name]))
    assert {"scan", "remat2"} <= prims and "remat2" not in jaxpr_primitives(
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
    (x, idx, w, wgu, wd, dy), (want_y, want_g) = routed_case(cfg, 7)
    mesh = make_mesh(*MESHES["data2-expert2-tensor2"])
    zero3 = (NamedSharding(mesh, P("expert", "data", None, "tensor")), NamedSharding(mesh, P("expert", "tensor", "data")))
    wgu_s, wd_s = jax.device_put(wgu, zero3[0]), jax.device_put(wd, zero3[1])
    def over_data(*args):       # the collectives over `data` in the step's jaxpr
        jaxpr = jax.make_jaxpr(fwd_bwd(cfg))(*args).jaxpr
        names = (e.primitive.name for e in eqns(jaxpr) if e.primitive.name != "pvary"
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
    prims = jaxpr_primitives(cfg, ep_mesh)
    assert {"shard_map", "all_to_all"} <= prims
    prims = jaxpr_primitives(cfg.replace(moe_impl="blocked"), ep_mesh)
    assert "all_gather" in prims and "all_to_all" not in prims
    assert "shard_map" not in jaxpr_primitives(cfg, make_mesh((1, 1, 1), ("data", "expert", "tensor")))
