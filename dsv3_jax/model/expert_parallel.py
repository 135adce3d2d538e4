"""Expert parallelism: `moe_impl='expert_parallel'`, routed experts split over the mesh's `expert` axis.

How the caller turns it on: make a mesh with an `expert` axis ambient while tracing the model, e.g.
`with dsv3_jax.sharding.activate(mesh): jax.jit(step)(...)` (which is `jax.set_mesh(mesh)` plus the
logical rules), or `with jax.set_mesh(mesh):` directly; the deprecated `with mesh:` is read too. Use Auto
axes (`jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)`, as `sharding.make_mesh` does); with
Explicit axes the inputs are resharded to the specs below first. Without an ambient mesh, or with an
expert axis of size 1, this is exactly the local `blocked` path (same numbers, no collectives).

Inside `jax.shard_map` over the whole mesh:
  tokens     x [N,D], idx/w [N,K] split over the token axes (`data`, `expert`: batch -> data x expert, as in
             `sharding.logical_rules`), replicated over `tensor`; N that does not split (decode) is padded
             with weight-0 tokens;
  weights    w_gate_up [E,D,2,F] as P('expert', None, None, 'tensor'), w_down [E,F,D] as
             P('expert', 'tensor', None): each device holds E/ep experts (and F/tp of each), so the
             weights are never gathered; their gradients come back with the same sharding (psum-ed over
             `data` by shard_map's transpose).
Per device, with n local tokens and E_l = E/ep local experts:
  1. Dispatch units. dedup=True (default): one unit per (token, destination shard) that owns at least
     one of the token's experts; each unit carries the token's row once plus up to min(K, E_l) (local
     expert, weight) slots. With group-limited routing and n_group == ep (groups map onto shards) a
     token reaches at most topk_group shards, so it is sent at most topk_group times, not K times.
     dedup=False: one unit per (token, expert) pair (the naive scheme, kept to measure the difference).
  2. Units are sorted by destination (stable argsort) and gathered into a fixed [ep, C, D] send buffer
     (plus [ep, C, slots] ids and weights); `jax.lax.all_to_all` over `expert` delivers them.
     `ragged_all_to_all` would send only the real rows, but XLA:CPU does not implement it (UNIMPLEMENTED in
     jax 0.10.2), so C is static. The dropless worst case is n rows per destination with dedup (every
     local token may pick the same shard) and n * min(K, E_l) without. CAPACITY_FRACTIONS (default
     0.25 .. 1.0 of that) lists several static capacities. The busiest destination of any device (a pmax
     over the mesh) picks the smallest capacity that holds it, and `lax.switch` runs that branch: the
     exchanged shapes follow the routing and stay dropless. Then the group limit really cuts the traffic:
     E=64, ep=8, 256 tokens per device moves 5 rows per token with topk_group=4 and 7 without, against 8
     for the worst-case buffer and 64 with one unit per pair (experiments/results/bench_moe.md).
  3. The receiver runs the local `blocked` computation over its E_l experts (ids of other shards are a
     sentinel that is skipped), weighting each row's slots, psum-ing partial sums over `tensor`.
  4. One row per unit goes back through the reverse all_to_all; each token sums its units (a gather).
Expert counts for the bias rule are computed outside this region from the global routing (moe.py's
routing_stats), so they are global already; nothing inside needs a psum for them.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from .dispatch import block_rows, blocked, blocked_local
from .layers import dtype_of

EXPERT_AXIS = "expert"
TOKEN_AXES = ("data", "expert")      # mesh axes that split tokens (batch -> data x expert)
TENSOR_AXIS = "tensor"               # splits each expert's width F (mlp -> tensor)
# Static capacities per destination, as fractions of the dropless worst case; the smallest that fits the
# busiest destination is picked at run time (lax.switch). (1.0,) keeps only the worst case: one branch,
# less compile time, but the traffic no longer follows the routing (no gain from the group limit).
CAPACITY_FRACTIONS: tuple = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0)


def current_mesh():
    """The ambient mesh: `jax.set_mesh` (abstract mesh) first, then the legacy `with mesh:`; else None."""
    am = jax.sharding.get_abstract_mesh()
    if am is not None and not am.empty:
        return am
    try:
        from jax._src import mesh as mesh_lib
        pm = mesh_lib.thread_resources.env.physical_mesh
        if not pm.empty:
            return pm
    except Exception:       # private API moved: only the deprecated `with mesh:` form is lost
        pass
    return None


class ExchangeShape(NamedTuple):
    """Static shapes of one device's exchange (each direction)."""
    ep: int                 # expert-axis size
    local_tokens: int       # n
    slots: int              # (expert, weight) slots per unit
    capacities: tuple       # candidate rows per destination (the last is the dropless worst case)


def exchange_shape(cfg: ModelConfig, local_tokens: int, ep: int, dedup: bool = True,
                   capacity_fractions: Sequence[float] | None = None) -> ExchangeShape:
    capacity_fractions = CAPACITY_FRACTIONS if capacity_fractions is None else capacity_fractions
    k, e_local = cfg.num_experts_per_tok, cfg.n_routed_experts // ep
    slots = min(k, e_local)
    worst = local_tokens if dedup else local_tokens * slots
    caps = sorted({max(1, min(worst, math.ceil(worst * fr / 8) * 8)) for fr in capacity_fractions} | {worst})
    return ExchangeShape(ep, local_tokens, slots if dedup else 1, tuple(caps))


def exchange_bytes_per_token(cfg: ModelConfig, shape: ExchangeShape, capacity: int) -> dict:
    """Bytes one local token accounts for, per direction, for a [ep, capacity] exchange: the activations
    (compute dtype) and the dispatch metadata (int32 id + fp32 weight per slot)."""
    act = jnp.dtype(dtype_of(cfg.dtype)).itemsize
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
    n, k = idx.shape
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


def _exchange_and_compute(x, uid, uw, tok, order, starts, counts, ep, cap, e_local, w1, w2, block, tp_axis):
    """Send [ep, cap] rows, compute on the receiving shard, send the results back: [ep, cap, D]."""
    d = x.shape[1]
    num_units = order.shape[0]
    c = jnp.arange(cap, dtype=jnp.int32)
    pos = starts[:, None] + c[None, :]                                             # [ep, cap]
    ok = c[None, :] < counts[:, None]
    unit = order[jnp.minimum(pos, num_units - 1)]                                  # [ep, cap]
    x_send = x[tok[unit]]                                                          # [ep, cap, D]
    id_send = jnp.where(ok[..., None], uid[unit], e_local)                        # [ep, cap, slots]
    w_send = jnp.where(ok[..., None], uw[unit], 0.0)
    a2a = lambda v: lax.all_to_all(v, EXPERT_AXIS, 0, 0)
    x_recv, id_recv, w_recv = a2a(x_send), a2a(id_send), a2a(w_send)
    slots = id_recv.shape[-1]
    y = blocked_local(x_recv.reshape(ep * cap, d), id_recv.reshape(ep * cap, slots),
                      w_recv.reshape(ep * cap, slots), w1, w2, block, num_valid_experts=e_local)
    if tp_axis is not None:
        y = lax.psum(y, tp_axis)
    return a2a(y.reshape(ep, cap, d))


def expert_parallel(cfg: ModelConfig, x, idx, w, w_gate_up, w_down, *, mesh=None, dedup: bool = True,
                    capacity_fractions: Sequence[float] | None = None):
    """Same contract as dispatch.routed_experts; see the module docstring. capacity_fractions defaults to
    the module's CAPACITY_FRACTIONS (read at call time, so it can be changed globally)."""
    mesh = mesh if mesh is not None else current_mesh()
    names = tuple(mesh.axis_names) if mesh is not None else ()
    if EXPERT_AXIS not in names or dict(mesh.shape)[EXPERT_AXIS] == 1:
        return blocked(cfg, x, idx, w, w_gate_up, w_down)
    sizes = dict(mesh.shape)
    ep = sizes[EXPERT_AXIS]
    e, d, _, f = w_gate_up.shape
    n, k = idx.shape
    if e % ep:
        raise ValueError(f"n_routed_experts={e} is not divisible by the mesh's expert axis ({ep}); "
                         f"change mesh.expert or n_routed_experts")
    token_axes = tuple(a for a in TOKEN_AXES if a in names)
    shards = math.prod(sizes[a] for a in token_axes)
    if n % shards:
        # Tokens that do not split evenly (a decode batch of 1 under a training mesh): pad with tokens of
        # weight 0 on expert 0, which add nothing to any output or gradient, and drop them afterwards.
        pad = shards - n % shards
        y = expert_parallel(cfg, jnp.pad(x, ((0, pad), (0, 0))), jnp.pad(idx, ((0, pad), (0, 0))),
                            jnp.pad(w, ((0, pad), (0, 0))), w_gate_up, w_down, mesh=mesh, dedup=dedup,
                            capacity_fractions=capacity_fractions)
        return y[:n]
    tp = TENSOR_AXIS if TENSOR_AXIS in names and sizes[TENSOR_AXIS] > 1 and f % sizes[TENSOR_AXIS] == 0 else None
    e_local, n_local = e // ep, n // shards
    shape = exchange_shape(cfg, n_local, ep, dedup, capacity_fractions)
    dt = dtype_of(cfg.dtype)

    def body(x, idx, w, w_gate_up, w_down):
        w1 = w_gate_up.reshape(e_local, d, -1).astype(dt)                          # [E_l, D, 2F_l]
        w2 = w_down.astype(dt)
        udest, uid, uw = _units(idx, w, ep, e_local, dedup, shape.slots)           # [n, U], [n, U, slots]
        units = udest.shape[1]
        flat_dest = udest.reshape(-1)
        order = jnp.argsort(flat_dest, stable=True).astype(jnp.int32)
        counts = jnp.bincount(flat_dest, length=ep + 1)[:ep].astype(jnp.int32)
        starts = (jnp.cumsum(counts) - counts).astype(jnp.int32)
        rank = jnp.argsort(order).astype(jnp.int32) - starts[jnp.minimum(flat_dest, ep - 1)]
        tok = jnp.arange(n_local * units, dtype=jnp.int32) // units
        uid, uw = uid.reshape(-1, shape.slots), uw.reshape(-1, shape.slots)
        xl = x.astype(dt)

        def run(cap):
            def go():
                back = _exchange_and_compute(xl, uid, uw, tok, order, starts, counts, ep, cap, e_local,
                                             w1, w2, block_rows(cfg, ep * cap * shape.slots), tp)
                got = back[jnp.minimum(flat_dest, ep - 1), jnp.minimum(rank, cap - 1)]   # [n*U, D]
                got = jnp.where((flat_dest < ep)[:, None], got, 0)
                return got.reshape(n_local, units, d).sum(1)
            return go

        if len(shape.capacities) == 1:
            return run(shape.capacities[0])()
        need = lax.pmax(counts.max(), tuple(names))
        branch = jnp.searchsorted(jnp.asarray(shape.capacities, jnp.int32), need).astype(jnp.int32)
        return lax.switch(jnp.minimum(branch, len(shape.capacities) - 1), [run(c) for c in shape.capacities])

    tok_spec = P(token_axes, None)
    in_specs = (tok_spec, tok_spec, tok_spec, P(EXPERT_AXIS, None, None, tp), P(EXPERT_AXIS, tp, None))
    args = (x, idx.astype(jnp.int32), w.astype(jnp.float32), w_gate_up, w_down)
    if _explicit(mesh, names):
        args = tuple(jax.sharding.reshard(a, s) for a, s in zip(args, in_specs))
    fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tok_spec)
    return fn(*args)


def _explicit(mesh, names) -> bool:
    types = getattr(mesh, "axis_types", None) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)
