"""Routed experts on a device mesh: the kernels of expert_kernels.py per shard inside `jax.shard_map`.

dispatch.py picks the form (`ModelConfig.moe_impl`). The mesh is passed in or is the ambient one
(`jax.set_mesh(mesh)`, which `dsv3_jax.sharding.activate` does), read with the public
`jax.sharding.get_abstract_mesh()`; the deprecated `with mesh:` context is not read. Use Auto axes (as
`sharding.make_mesh` does); with Explicit axes the inputs are resharded to the specs below first.

Inside `jax.shard_map` over the whole mesh:
  tokens   x [N,D], idx/w [N,K] split over the token axes (`data`, `expert`: batch -> data x expert, as in
           `sharding.logical_rules`), replicated over `tensor`; N that does not split (decode) is padded
           with weight-0 tokens;
  weights  w_gate_up [E,D,2,F] as P('expert', None, None, 'tensor'), w_down [E,F,D] as
           P('expert', 'tensor', None): each device holds E_l = E/ep experts and F/tp of each, never
           gathered over `expert`. Under zero3 (the rules shard their `embed` axis D over `data`) they come
           in with that sharding too and are all-gathered over `data` inside, in the compute dtype, so that
           the backward's transpose is a reduce-scatter straight to each device's shard of the gradient. A
           weight replicated over `data` at the boundary would get its gradient by an all-reduce of the
           full [E_l, D, 2F] per layer and microbatch (experiments/results/pod_memory.md, session 18).
Each device runs a kernel on its local experts (ids of other shards become a sentinel the kernel skips) and
psums its partial sums over `tensor`. The exchange over `expert` is one of:
  all_to_all  the expert-parallel form (moe_impl expert_parallel and ragged): below;
  all_gather  (moe_impl blocked) each expert shard gathers its `expert` peers' tokens, computes its local
              experts' share for all of them, and a psum_scatter returns each token's sum to its shard.
              Simpler, but it moves ep x the tokens where all_to_all moves only the rows routed.
With an expert axis of 1 both are the same: local tokens, every expert, partial sums over `tensor`.

The all_to_all exchange, per device with n local tokens:
  1. Dispatch units. dedup=True (default): one unit per (token, destination shard) that owns at least one
     of the token's experts: the token's row once plus up to min(K, E_l) (local expert, weight) slots. With
     group-limited routing and n_group == ep (groups map onto shards) a token is sent at most topk_group
     times, not K times (arXiv 2412.19437 §2.1.2, node-limited routing). dedup=False: one unit per
     (token, expert) pair, kept to measure the difference.
  2. Units sorted by destination fill a static [ep, C, D] buffer (plus [ep, C, slots] ids and weights).
     The dropless worst case is C = n with dedup, n * min(K, E_l) without. `ModelConfig.
     moe_capacity_fractions` of it are the candidate C: the busiest destination of any device (a pmax over
     the mesh) picks the smallest that holds it and `lax.switch` runs that branch, so traffic follows the
     routing and nothing is dropped. Transport: `jax.lax.ragged_all_to_all` on TPU/GPU (only the real rows
     move), `jax.lax.all_to_all` of the whole buffer elsewhere (XLA:CPU has no ragged_all_to_all).
     Rows per token for each scheme: experiments/results/bench_moe.md. The backward keeps every branch's
     buffers, and with ragged_all_to_all the ladder saves no traffic: `[1.0]` is the setting for big
     models on TPU (experiments/results/pod_memory.md).
  3. The receiver runs the kernel over its E_l experts, weighting each row's slots (all slots in one call,
     or with `ModelConfig.moe_slot_passes` one rematerialised pass per slot: `_slot_passes`).
  4. One row per unit comes back the same way; each token sums its units (a gather).
Expert counts for the bias rule come from the global routing outside this region (moe.py), so nothing here
needs a psum for them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..errors import InputError
from .expert_kernels import KERNELS, block_rows, local_experts

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "expert")      # mesh axes that split tokens (batch -> data x expert)
TENSOR_AXIS = "tensor"               # splits each expert's width F (mlp -> tensor)
RAGGED_ALL_TO_ALL_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")     # XLA:CPU lacks it (jax 0.10.2)


def current_mesh():
    """The ambient mesh set by `jax.set_mesh` (abstract inside jit), or None."""
    am = jax.sharding.get_abstract_mesh()
    return None if am is None or am.empty else am


def mesh_platform(mesh) -> str:
    """Platform of the mesh's devices ('cpu', 'tpu', 'gpu'...), which may not be the default backend's
    (compile-only TPU devices on a CPU host); the default backend without a mesh."""
    am = getattr(mesh, "abstract_mesh", mesh)           # a concrete Mesh, or already abstract
    device = getattr(am, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def axis_size(mesh, name: str) -> int:
    return dict(mesh.shape).get(name, 1) if mesh is not None else 1


def weight_shard_axes(mesh, hidden: int, used: Sequence[Optional[str]]) -> tuple:
    """The mesh axes the active logical rules shard the expert weights' `embed` axis over (`data` under
    zero3: sharding.logical_rules), when the hidden size splits over them; () otherwise (no rules active,
    or no zero3)."""
    spec = nn.logical_to_mesh_axes(("expert", "embed", None, "mlp"))
    axes = spec[1] if spec is not None and len(spec) > 1 else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a in mesh.axis_names and a not in used and axis_size(mesh, a) > 1)
    return axes if axes and hidden % math.prod(axis_size(mesh, a) for a in axes) == 0 else ()


class ExchangeShape(NamedTuple):
    """Static shapes of one device's exchange (each direction)."""
    ep: int                 # expert-axis size
    local_tokens: int       # n
    slots: int              # (expert, weight) slots per unit
    capacities: tuple       # candidate rows per destination (the last is the dropless worst case)


def exchange_shape(cfg: ModelConfig, local_tokens: int, ep: int, dedup: bool = True,
                   capacity_fractions: Optional[Sequence[float]] = None) -> ExchangeShape:
    """capacity_fractions defaults to cfg.moe_capacity_fractions."""
    fractions = cfg.moe_capacity_fractions if capacity_fractions is None else capacity_fractions
    k, e_local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
    slots = min(k, e_local)
    worst = local_tokens if dedup else local_tokens * slots
    caps = sorted({max(1, min(worst, math.ceil(worst * fr / 8) * 8)) for fr in fractions} | {worst})
    return ExchangeShape(ep, local_tokens, slots if dedup else 1, tuple(caps))


def exchange_bytes_per_token(cfg: ModelConfig, shape: ExchangeShape, capacity: int) -> dict:
    """Bytes one local token accounts for, per direction, for a [ep, capacity] exchange: the activations
    (compute dtype) and the dispatch metadata (int32 id + fp32 weight per slot)."""
    act = jnp.dtype(cfg.dtype).itemsize
    rows = shape.ep * capacity / shape.local_tokens
    d = cfg.hidden_size
    return {"rows_per_token": rows,
            "dispatch_bytes_per_token": rows * (d * act + shape.slots * 8),
            "combine_bytes_per_token": rows * d * act}


def destination_counts(cfg: ModelConfig, idx: np.ndarray, ep: int, token_shards: int, dedup: bool = True):
    """Host-side mirror of the unit counting: [token_shards, ep] units each device sends to each shard
    (shards along the token axes in mesh order, expert fastest, as P(('data','expert')) lays them out)."""
    idx = np.asarray(idx)
    n, k = idx.shape
    e_local = cfg.n_routed_experts // ep
    dest = (idx // e_local).reshape(token_shards, n // token_shards, k)
    if dedup:
        hit = np.zeros((token_shards, n // token_shards, ep), bool)
        for j in range(ep):
            hit[..., j] = (dest == j).any(-1)
        return hit.sum(1)
    return np.stack([(dest == j).sum((1, 2)) for j in range(ep)], -1)


def _units(idx, w, ep, e_local, dedup, slots):
    """Per local token: U units with destination (ep = not sent), local expert ids and weights [U, slots]."""
    dest = idx // e_local                                                          # [n, K]
    lid = idx % e_local
    if not dedup:                                                                  # one unit per pair
        return dest, lid[..., None], w[..., None]
    shard = jnp.arange(ep, dtype=idx.dtype)
    mine = dest[:, None, :] == shard[None, :, None]                                # [n, ep, K]
    # The (at most `slots`) pairs of each (token, shard) first, in K order: stable argsort of "not mine".
    pick = jnp.argsort(~mine, axis=-1, stable=True)[..., :slots]                   # [n, ep, slots]
    sel = jnp.take_along_axis(mine, pick, -1)
    ids = jnp.where(sel, jnp.take_along_axis(jnp.broadcast_to(lid[:, None], mine.shape), pick, -1), e_local)
    wts = jnp.where(sel, jnp.take_along_axis(jnp.broadcast_to(w[:, None], mine.shape), pick, -1), 0.0)
    udest = jnp.where(mine.any(-1), shard[None, :], ep)                           # [n, ep]
    return udest, ids, wts


class LocalExperts(NamedTuple):
    """What a shard computes with: its experts' weights (compute dtype) and the kernel."""
    kernel: Callable        # expert_kernels.KERNELS entry
    w1: jax.Array           # [E_l, D, 2F_l]
    w2: jax.Array           # [E_l, F_l, D]
    block: int              # rows per block (blocked kernel)
    tp_axis: Optional[str]  # axis to psum partial sums over (F split), or None
    slot_passes: bool = False   # one recomputed kernel pass per slot (ModelConfig.moe_slot_passes)

    def __call__(self, x, ids, w):
        """x [M,D], ids/w [M,slots] (ids >= E_l skipped) -> [M,D], summed over `tensor`."""
        if self.slot_passes and ids.shape[1] > 1:
            y = _slot_passes(self, x, ids, w)
        else:
            y = self.kernel(x, ids, w, self.w1, self.w2, self.block, num_valid_experts=self.w1.shape[0])
        return lax.psum(y, self.tp_axis) if self.tp_axis is not None else y


def _slot_passes(experts: LocalExperts, x, ids, w):
    """x [M,D], ids/w [M,slots] -> [M,D]: the kernel once per slot instead of once over all M*slots pairs.
    One call sorts the pairs into [M*slots, D] row buffers (and [M*slots, 2F]) and keeps them for its
    backward: at the dropless worst case, K times the receive buffer. Pass s takes each row's slot s (rows
    without one skip it), so a pass's buffers are [M, D]. The passes run in a scan with a rematerialised
    body: the backward holds one pass's buffers at a time and recomputes that pass's forward (one more
    kernel forward per layer). Weight gradients add up over the passes in the compute dtype.
    Measured: experiments/results/pod_memory.md."""
    e_local = experts.w1.shape[0]

    @jax.checkpoint
    def one(x, slot_ids, slot_w, w1, w2):                                         # [M], [M] -> [M, D]
        return experts.kernel(x, slot_ids[:, None], slot_w[:, None], w1, w2, experts.block,
                              num_valid_experts=e_local)

    y = one(x, ids[:, 0], w[:, 0], experts.w1, experts.w2)

    def body(acc, slot):
        return acc + one(x, slot[0], slot[1], experts.w1, experts.w2), None

    y, _ = lax.scan(body, y, (ids[:, 1:].T, w[:, 1:].T))
    return y


class SendPlan(NamedTuple):
    """One device's dispatch units sorted by destination (step 2 of the module docstring)."""
    x: jax.Array            # [n, D] local tokens, compute dtype
    ids: jax.Array          # [n*U, slots] local expert id per slot (E_l: empty)
    weights: jax.Array      # [n*U, slots]
    token: jax.Array        # [n*U] the token each unit carries
    order: jax.Array        # [n*U] units sorted by destination
    starts: jax.Array       # [ep] first sorted unit of each destination
    counts: jax.Array       # [ep] units for each destination


def _transport(v, fill, send_sizes, recv_sizes):
    """[ep, C, ...] -> [ep, C, ...]: block j goes to expert shard j, block i of the result came from
    shard i. With sizes (TPU/GPU) only each block's first send_sizes[j] rows move (ragged_all_to_all);
    the other received rows hold `fill`."""
    if send_sizes is None:
        return lax.all_to_all(v, EXPERT_AXIS, 0, 0)
    ep, cap = v.shape[:2]
    flat = v.reshape(ep * cap, *v.shape[2:])
    offsets = jnp.arange(ep, dtype=jnp.int32) * cap
    mine = jnp.full((ep,), lax.axis_index(EXPERT_AXIS) * cap, jnp.int32)   # where my block lands on each peer
    out = lax.ragged_all_to_all(flat, jnp.full_like(flat, fill), offsets, send_sizes.astype(jnp.int32),
                                mine, recv_sizes.astype(jnp.int32), axis_name=EXPERT_AXIS)
    return out.reshape(v.shape)


def _exchange_and_compute(plan: SendPlan, experts: LocalExperts, *, cap: int, ragged: bool) -> jax.Array:
    """Send [ep, cap] rows, compute on the receiving shard, send the results back: [ep, cap, D]."""
    ep, e_local, d = plan.counts.shape[0], experts.w1.shape[0], plan.x.shape[1]
    c = jnp.arange(cap, dtype=jnp.int32)
    ok = c[None, :] < plan.counts[:, None]                                         # [ep, cap]
    unit = plan.order[jnp.minimum(plan.starts[:, None] + c[None, :], plan.order.shape[0] - 1)]
    x_send = plan.x[plan.token[unit]]                                              # [ep, cap, D]
    id_send = jnp.where(ok[..., None], plan.ids[unit], e_local)                   # [ep, cap, slots]
    w_send = jnp.where(ok[..., None], plan.weights[unit], 0.0)
    sent = plan.counts if ragged else None
    got = lax.all_to_all(plan.counts, EXPERT_AXIS, 0, 0, tiled=True) if ragged else None
    x_recv, id_recv, w_recv = (_transport(v, fill, sent, got)
                               for v, fill in ((x_send, 0), (id_send, e_local), (w_send, 0)))
    slots = id_recv.shape[-1]
    y = experts(x_recv.reshape(ep * cap, d), id_recv.reshape(ep * cap, slots), w_recv.reshape(ep * cap, slots))
    return _transport(y.reshape(ep, cap, d), 0, got, sent)


def _all_to_all_form(cfg, x, idx, w, experts: LocalExperts, *, ep, dedup, capacity_fractions, ragged, axes):
    """Steps 1-4 of the module docstring on one device: x [n,D], idx/w [n,K] -> [n,D]."""
    n, d = x.shape
    e_local = experts.w1.shape[0]
    shape = exchange_shape(cfg, n, ep, dedup, capacity_fractions)
    udest, uid, uw = _units(idx, w, ep, e_local, dedup, shape.slots)               # [n, U], [n, U, slots]
    units = udest.shape[1]
    dest = udest.reshape(-1)
    order = jnp.argsort(dest, stable=True).astype(jnp.int32)
    counts = jnp.bincount(dest, length=ep + 1)[:ep].astype(jnp.int32)
    starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
    rank = jnp.argsort(order).astype(jnp.int32) - starts[jnp.minimum(dest, ep - 1)]
    plan = SendPlan(x, uid.reshape(-1, shape.slots), uw.reshape(-1, shape.slots),
                    jnp.arange(n * units, dtype=jnp.int32) // units, order, starts, counts)

    def run(cap):
        def go():
            ex = experts._replace(block=block_rows(cfg, ep * cap * shape.slots))
            back = _exchange_and_compute(plan, ex, cap=cap, ragged=ragged)
            got = back[jnp.minimum(dest, ep - 1), jnp.minimum(rank, cap - 1)]    # [n*U, D]
            got = jnp.where((dest < ep)[:, None], got, 0)
            return got.reshape(n, units, d).sum(1)
        return go

    if len(shape.capacities) == 1:
        return run(shape.capacities[0])()
    need = lax.pmax(counts.max(), axes)
    branch = jnp.searchsorted(jnp.asarray(shape.capacities, jnp.int32), need).astype(jnp.int32)
    return lax.switch(jnp.minimum(branch, len(shape.capacities) - 1), [run(c) for c in shape.capacities])


def _all_gather_form(x, idx, w, experts: LocalExperts):
    """Gather the `expert` peers' tokens, compute the local experts' share, return each token's sum to
    its shard: x [n,D], idx/w [n,K] -> [n,D]."""
    e_local = experts.w1.shape[0]
    xg, ig, wg = (lax.all_gather(a, EXPERT_AXIS, tiled=True) for a in (x, idx, w))   # [ep*n, ...]
    lid = ig - lax.axis_index(EXPERT_AXIS) * e_local
    y = experts(xg, jnp.where((lid >= 0) & (lid < e_local), lid, e_local), wg)
    return lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)


def sharded_experts(cfg: ModelConfig, x, idx, w, w_gate_up, w_down, *, mesh, kernel: str = "blocked",
                    exchange: str = "all_to_all", dedup: bool = True,
                    capacity_fractions: Optional[Sequence[float]] = None):
    """Same contract as dispatch.routed_experts, on `mesh` (see the module docstring). kernel: a key of
    expert_kernels.KERNELS; exchange: 'all_to_all' or 'all_gather'."""
    names = tuple(mesh.axis_names)
    ep, tp_size = axis_size(mesh, EXPERT_AXIS), axis_size(mesh, TENSOR_AXIS)
    e, d, _, f = w_gate_up.shape
    n, k = idx.shape
    if e % ep:
        raise InputError(f"n_routed_experts={e} is not divisible by the mesh's expert axis ({ep}); "
                         f"change mesh.expert or n_routed_experts")
    token_axes = tuple(a for a in TOKEN_AXES if a in names)
    shards = math.prod(axis_size(mesh, a) for a in token_axes)
    if n % shards:
        # Tokens that do not split evenly (a decode batch of 1 under a training mesh): pad with tokens of
        # weight 0 on expert 0, which add nothing to any output or gradient, and drop them afterwards.
        pad = ((0, shards - n % shards), (0, 0))
        return sharded_experts(cfg, jnp.pad(x, pad), jnp.pad(idx, pad), jnp.pad(w, pad), w_gate_up, w_down,
                               mesh=mesh, kernel=kernel, exchange=exchange, dedup=dedup,
                               capacity_fractions=capacity_fractions)[:n]
    tp = TENSOR_AXIS if tp_size > 1 and f % tp_size == 0 else None
    ex_axis = EXPERT_AXIS if EXPERT_AXIS in names else None
    fsdp = weight_shard_axes(mesh, d, used=(ex_axis, tp))
    e_local = e // ep
    dt = jnp.dtype(cfg.dtype)
    ragged = mesh_platform(mesh) in RAGGED_ALL_TO_ALL_PLATFORMS

    def body(x, idx, w, w_gate_up, w_down):
        x, w_gate_up, w_down = x.astype(dt), w_gate_up.astype(dt), w_down.astype(dt)  # gathered in dt
        if fsdp:    # gathered here so that the backward reduce-scatters the gradients (module docstring)
            w_gate_up = lax.all_gather(w_gate_up, fsdp, axis=1, tiled=True)
            w_down = lax.all_gather(w_down, fsdp, axis=2, tiled=True)
        experts = LocalExperts(KERNELS[kernel], w_gate_up.reshape(e_local, d, -1), w_down,
                               block_rows(cfg, idx.size * ep), tp, cfg.moe_slot_passes)
        if ep == 1:
            return experts(x, idx, w)
        if exchange == "all_gather":
            return _all_gather_form(x, idx, w, experts)
        return _all_to_all_form(cfg, x, idx, w, experts, ep=ep, dedup=dedup, ragged=ragged, axes=names,
                                capacity_fractions=capacity_fractions)

    tok_spec = P(token_axes, None)
    in_specs = (tok_spec, tok_spec, tok_spec, P(ex_axis, fsdp or None, None, tp), P(ex_axis, tp, fsdp or None))
    args = (x, idx.astype(jnp.int32), w.astype(jnp.float32), w_gate_up, w_down)
    if any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", None) or ()):
        args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tok_spec)(*args)


def expert_parallel(cfg: ModelConfig, x, idx, w, w_gate_up, w_down, *, mesh=None, dedup: bool = True,
                    capacity_fractions: Optional[Sequence[float]] = None, kernel: str = "blocked"):
    """moe_impl='expert_parallel': the all_to_all form on `mesh` (default: the ambient mesh); the local
    kernel when there is no mesh or it has one device."""
    mesh = mesh if mesh is not None else current_mesh()
    if mesh is None or mesh.size == 1:
        return local_experts(cfg, kernel, x, idx, w, w_gate_up, w_down)
    return sharded_experts(cfg, x, idx, w, w_gate_up, w_down, mesh=mesh, kernel=kernel, exchange="all_to_all",
                           dedup=dedup, capacity_fractions=capacity_fractions)
