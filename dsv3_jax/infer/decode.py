"""Prefill and cached decoding over the latent KV cache (arXiv 2412.19437, section 2.1.1: only c_KV and
RoPE(k_pe) are cached), through the model's own modules: `Transformer.trunk` / `main_logits` / `mtp_depth`
with a `LatentContext` per stack, via `Transformer.apply(..., method=...)`. What stays here is what only
inference has: the cache's storage and slots, sampling, the jitted entry points, the on-device step loops,
and the per-layer params layout decoding reads its weights from (`decode_params`).

Positions and masking: slot == position (see cache.py). A forward over new tokens at `positions` [B,T]
(contiguous per row, starting at `positions[:, 0]`, which may differ between rows) attends to
  * the cached context: slots `< positions[b, 0]` of row b (everything before the first new token), and
  * the new tokens themselves, causally by position (`pos_q >= pos_k`), restricted to `key_valid`,
and writes the new tokens' `c_KV` / `RoPE(k_pe)` at slots `positions` (invalid keys are not written).
So a decode step can take several tokens at once (speculative verification), rows can have different
lengths (right-padded batches), and entries past a row's length (padding, rejected drafts) are never seen.
A step attends over the cache's first W slots only, the smallest static window that covers its largest
position + 1 (`MLA.attend_in_place`): its attention costs what the context in use costs, not the cache size.

Prefill uses the expanded form (per-head keys/values from `kv_b_proj`, as in training); decode steps use the
absorbed form (`MLA.cached_attention(absorbed=True)`) unless asked otherwise (the benchmark's baseline).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from ..config import ModelConfig
from ..errors import InputError
from ..model.mla import LatentContext
from ..model.transformer import LAYER_PREFIX, Transformer
from .cache import KVCache, LayerCache


# Variables -------------------------------------------------------------------------------------------------

def split_variables(variables: Any) -> tuple[dict, dict]:
    """`Transformer.init`/checkpoint variables -> (params, router_state), unboxed (no logical-axis boxes)."""
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection (as Transformer.init returns)")
    v = nn.meta.unbox(variables)
    return v["params"], v.get("router_state", {})


def _stack_depths(cfg: ModelConfig) -> dict:
    return {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}


def _per_layer(tree: dict, depth: int) -> dict:
    """A stack's {'layers': leaves [L,...]} -> {'layer_<i>': leaves [...]} (unchanged if already per layer)."""
    if "layers" not in tree:
        return tree
    return {f"{LAYER_PREFIX}{i}": jax.tree.map(lambda x: x[i], tree["layers"]) for i in range(depth)}


# The most bytes of stacked layer weights `decode_params` splits: the split is a second copy of them while the
# caller's stacked params stay alive, and the unrolled step compiles one body per layer; a model past this
# keeps decoding from the stacked params (the rolled loop).
PER_LAYER_MAX_BYTES = 1 << 30
# The fewest bytes of stacked layer weights for which a batch decodes faster per layer: weights well past the
# CPU's last-level cache (32 MiB here), read from memory at every step. Smaller models (the tiny preset's
# 14 MiB of layers) and batch-1 requests (whose few tokens gather their experts from the stack) decode as
# fast or faster from the stack (experiments/results/decode_weights.md, session 11).
PER_LAYER_MIN_BYTES = 64 << 20


def decode_params(cfg: ModelConfig, params: dict, max_bytes: int = PER_LAYER_MAX_BYTES, *,
                  rows: Optional[int] = None, min_bytes: int = PER_LAYER_MIN_BYTES) -> dict:
    """Params for decoding: each main stack's stacked weights [L,...] split once into per-layer trees
    (`<stack>/layer_<i>` in place of `<stack>/layers`), so that the decode step's unrolled layers read their
    weights in place instead of a rolled loop copying each layer's slice out of the stack at every step. A
    batch of a model whose layers do not fit in the CPU's caches decodes 1.4-1.7x faster so (the copies alone
    are not what costs: experiments/results/decode_weights.md, session 11). Everything else is shared.

    `forward`, `mtp_forward`, `prefill`, `decode_step` and the jitted steps take either layout (router_state
    stays stacked: its per-layer rows are sliced inside the step). Memory: a second copy of the main layers'
    weights while the stacked params stay alive (the caller's variables). So stacks of more than `max_bytes`
    (all shards together) are left stacked: the params come back unchanged (V3-size models decode as before).
    rows: the batch the params will decode (`generate` passes it): given, the split happens only where it pays,
    two or more rows and at least `min_bytes` of stacked weights; None splits whatever the size.
    Idempotent. Raises InputError when a stack's depth does not match cfg, or cfg has no such stack."""
    out = dict(params)
    stacks = {}
    for name, depth in _stack_depths(cfg).items():
        if not depth:
            if name in params:
                raise InputError(f"params hold '{name}' but the config has no such layers: params and config "
                                 "come from different models")
            continue
        if name not in params:
            continue                # nothing to split (the model's own check names what is missing)
        stack = params[name]
        if "layers" in stack:
            got = {x.shape[0] for x in jax.tree.leaves(stack["layers"])}
        else:
            got = {len(stack)} if set(stack) == {f"{LAYER_PREFIX}{i}" for i in range(len(stack))} else {None}
        if got != {depth}:
            raise InputError(f"params['{name}'] hold {sorted(got, key=str)} layers, the config {depth}: params "
                             "and config come from different models")
        if "layers" in stack:
            stacks[name] = depth
    nbytes = sum(x.size * x.dtype.itemsize for name in stacks for x in jax.tree.leaves(params[name]))
    if nbytes > max_bytes or (rows is not None and (rows < 2 or nbytes < min_bytes)):
        return params
    out.update({name: _unstack(params[name], depth) for name, depth in stacks.items()})
    return out


@functools.partial(jax.jit, static_argnums=1)
def _unstack(stack: dict, depth: int) -> dict:
    """`_per_layer` in one compiled call (one dispatch per stack; the slices keep the stack's sharding)."""
    return _per_layer(stack, depth)


def _matching_router_state(cfg: ModelConfig, params: dict, router_state: dict) -> dict:
    """router_state in the params' layout: per-layer rows of a stack whose params are per layer."""
    if not router_state:
        return router_state
    out = dict(router_state)
    for name, depth in _stack_depths(cfg).items():
        if depth and name in router_state and f"{LAYER_PREFIX}0" in params.get(name, {}):
            out[name] = _per_layer(router_state[name], depth)
    return out


def _apply(cfg: ModelConfig, params: dict, router_state: dict, method, *args):
    return Transformer(cfg).apply({"params": params,
                                   "router_state": _matching_router_state(cfg, params, router_state)},
                                  *args, method=method)


# Whole-model forwards ----------------------------------------------------------------------------------------

STACK_CACHES = {"dense_layers": "dense", "moe_layers": "moe"}     # model stack name -> KVCache field


def _context(layers: LayerCache, read_cache: bool, absorbed: bool, outputs_from: int = 0) -> LatentContext:
    """The model's view of a stack's cache. Reading it (decoding), the context carries a layer index and the
    model writes the new latents into the stacked arrays in place (`MLA.attend_in_place`); not reading it
    (prefill), the model returns the new latents and `LayerCache.write` stores them."""
    if not read_cache:
        return LatentContext(None, None, dtype=layers.c_kv.dtype, absorbed=absorbed)
    return LatentContext(layers.c_kv, layers.k_pe, dtype=layers.c_kv.dtype, absorbed=absorbed,
                         layer=jnp.zeros((), jnp.int32), outputs_from=outputs_from)


def _written(layers: LayerCache, new, positions, key_valid) -> LayerCache:
    """The cache after a forward: the context written in place, or the returned latents stored at slots
    `positions` (invalid keys dropped)."""
    if isinstance(new, LatentContext):
        return LayerCache(new.c_kv, new.k_pe).constrain()
    slots = positions if key_valid is None else jnp.where(key_valid, positions, -1)
    return layers.write(*new, slots)


def forward(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, tokens: jax.Array,
            positions: jax.Array, *, read_cache: bool = True, absorbed: bool = True,
            key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, KVCache]:
    """Main blocks over new tokens [B,T] at `positions` [B,T]: returns (h^0 [B,T,D] before the final norm,
    the cache with the new latents written). read_cache=False ignores the cache's content (prefill)."""
    stacks = {name: getattr(cache, field) for name, field in STACK_CACHES.items() if getattr(cache, field) is not None}
    contexts = {name: _context(layers, read_cache, absorbed) for name, layers in stacks.items()}
    h0, _, _, latents = _apply(cfg, params, router_state, Transformer.trunk, tokens, positions, key_valid, contexts)
    return h0, cache.replace(**{STACK_CACHES[name]: _written(stacks[name], latents[name], positions, key_valid)
                                for name in stacks})


def main_logits(cfg: ModelConfig, params: dict, h0: jax.Array) -> jax.Array:
    """h^0 -> fp32 logits through the final norm and the output head (`Transformer.main_logits`)."""
    return _apply(cfg, params, {}, Transformer.main_logits, h0)


def mtp_forward(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, h_prev: jax.Array,
                next_tokens: jax.Array, positions: jax.Array, *, k: int = 0, read_cache: bool = True,
                absorbed: bool = True, key_valid: Optional[jax.Array] = None, outputs_from: int = 0):
    """MTP module k (0-based) at positions [B,T] over its own cache (`Transformer.mtp_depth`): returns
    (logits [B,T-q,X], h^{k+1} [B,T-q,D], cache with the new latents written), q = outputs_from: positions
    before it only write their latents (reading the cache only)."""
    layer = cache.mtp[k]
    logits, h, _, new = _apply(cfg, params, router_state, Transformer.mtp_depth, k, h_prev, next_tokens,
                               positions, key_valid, _context(layer, read_cache, absorbed, outputs_from))
    layer = _written(layer, new if isinstance(new, LatentContext) else (new[0][None], new[1][None]), positions,
                     key_valid)
    return logits, h, cache.replace(mtp=tuple(layer if i == k else c for i, c in enumerate(cache.mtp)))


# The drafts per speculative step the prefill's hidden-state tail serves (speculative.py needs h^0 at the
# drafts + 1 positions before the first new token).
MAX_DRAFTS = 3


class Prefill(NamedTuple):
    logits: jax.Array      # [B,X] fp32 at each row's last real prompt token (predicts the first new token)
    h_last: jax.Array      # [B,D] h^0 at position n_b - 1
    h_tail: jax.Array      # [B,MAX_DRAFTS+1,D] h^0 at positions n_b - MAX_DRAFTS - 1 .. n_b - 1 (zeros below 0)
    cache: KVCache


def prefill(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, tokens: jax.Array,
            lengths: jax.Array, *, mtp: bool = False) -> Prefill:
    """Run right-padded prompts tokens [B,T] (row b real for its first lengths[b] tokens) through the model
    in the expanded form and fill the cache at slots 0..T-1. With mtp, MTP module 1's cache is filled too
    (position i sees h^0_i and Emb(t_{i+1}); entries from i = n_b - 1 on are placeholders that speculative
    decoding rewrites)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = positions < lengths[:, None]
    h0, cache = forward(cfg, params, router_state, cache, tokens, positions, read_cache=False, absorbed=False,
                        key_valid=valid)
    rows = jnp.arange(b)
    h_last = h0[rows, lengths - 1]
    tail = lengths[:, None] + jnp.arange(-MAX_DRAFTS - 1, 0)                           # [B,W]
    h_tail = jnp.where((tail >= 0)[..., None], h0[rows[:, None], jnp.maximum(tail, 0)], 0)
    if mtp:
        nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        _, _, cache = mtp_forward(cfg, params, router_state, cache, h0, nxt, positions, read_cache=False,
                                  absorbed=False, key_valid=valid)
    return Prefill(main_logits(cfg, params, h_last), h_last, h_tail, cache)


def decode_step(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, tokens: jax.Array,
                positions: jax.Array, *, absorbed: bool = True):
    """New tokens [B,T] (T >= 1, causal among themselves) at positions [B,T] after a cached context of
    positions[:, 0] tokens per row. Returns (logits [B,T,X] fp32, h^0 [B,T,D], cache)."""
    h0, cache = forward(cfg, params, router_state, cache, tokens, positions, absorbed=absorbed)
    return main_logits(cfg, params, h0), h0, cache


# Sampling ---------------------------------------------------------------------------------------------------
# temperature and top_p are traced scalars, so one compiled step serves every setting; temperature == 0 is
# greedy, selected at run time with lax.cond (only the taken branch runs: greedy draws no random numbers).

class Sampling(NamedTuple):
    """The traced sampling arguments of a request: step j of a request samples with fold_in(key, j)."""
    key: jax.Array
    temperature: jax.Array     # fp32 scalar, 0 = greedy
    top_p: jax.Array           # fp32 scalar


def filtered_logits(logits: jax.Array, temperature, top_p) -> jax.Array:
    """logits / temperature in fp32, with tokens outside the top-p nucleus set to -inf (temperature > 0)."""
    z = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)

    def nucleus(z):
        order = jnp.argsort(-z, axis=-1)
        sorted_p = jnp.take_along_axis(jax.nn.softmax(z, axis=-1), order, axis=-1)
        keep_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < top_p           # always keeps the top token
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        return jnp.where(keep, z, -jnp.inf)

    return jax.lax.cond(top_p < 1.0, nucleus, lambda z: z, z)


def sampling_probs(logits: jax.Array, temperature, top_p) -> jax.Array:
    """softmax(logits / temperature) restricted to the top-p nucleus (temperature > 0)."""
    return jax.nn.softmax(filtered_logits(logits, temperature, top_p), axis=-1)


def sample_from(probs: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from probs [..., X] (exactly the argmax when probs is one-hot)."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Greedy (argmax) when temperature == 0, else a draw from the tempered top-p distribution."""
    return jax.lax.cond(temperature > 0, lambda z: sample_from(sampling_probs(z, temperature, top_p), key),
                        greedy, logits.astype(jnp.float32))


# Jitted entry points (cached per config) ---------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def jit_prefill(cfg: ModelConfig, mtp: bool = False):
    """jit(prefill + first-token sample): (params, router_state, cache, tokens, lengths, key, temperature,
    top_p) -> (first_token [B], Prefill). The cache argument is donated."""
    def fn(params, router_state, cache, tokens, lengths, key, temperature=0.0, top_p=1.0):
        out = prefill(cfg, params, router_state, cache, tokens, lengths, mtp=mtp)
        return sample(out.logits, key, temperature, top_p), out
    return jax.jit(fn, donate_argnums=(2,))


@functools.lru_cache(maxsize=64)
def jit_decode_step(cfg: ModelConfig, absorbed: bool = True):
    """jit(decode_step): (params, router_state, cache, tokens [B,T], positions [B,T]) ->
    (logits, h0, cache), cache donated."""
    def fn(params, router_state, cache, tokens, positions):
        return decode_step(cfg, params, router_state, cache, tokens, positions, absorbed=absorbed)
    return jax.jit(fn, donate_argnums=(2,))


CHUNK = 8   # decode steps per device call: the host reads tokens back (and streams them) once per call


def on_device_steps(step, n_max: int):
    """`step(carry, i) -> (carry, out)` (out: a pytree of arrays) -> `run(carry, n) -> (carry, outs)` that runs
    n <= n_max steps in one `lax.fori_loop` on the device (n traced: no recompile per n), stacking the outputs
    as [n_max, ...] (entries past n stay zero). A host round trip per step would cost about as much as a small
    model's whole decode step on CPU."""
    def run(carry, n):
        shapes = jax.eval_shape(lambda c: step(c, 0)[1], carry)
        bufs = jax.tree.map(lambda s: jnp.zeros((n_max,) + s.shape, s.dtype), shapes)

        def body(i, state):
            carry, bufs = state
            carry, out = step(carry, i)
            return carry, jax.tree.map(lambda b, o: b.at[i].set(o), bufs, out)
        return jax.lax.fori_loop(0, n, body, (carry, bufs))
    return run


@functools.lru_cache(maxsize=64)
def jit_decode_steps(cfg: ModelConfig, absorbed: bool = True, n_max: int = CHUNK):
    """jit(up to n_max one-token decode steps + sampling): (params, router_state, cache, tokens [B],
    positions [B], active [B], sampling, step, n) -> (last tokens [B], positions, cache, tokens of each step
    [n_max, B]), cache donated. Step j samples with fold_in(sampling.key, step + j); rows with active False
    keep their position (their tokens are ignored)."""
    def fn(params, router_state, cache, tokens, positions, active, sampling: Sampling, step, n):
        def one(carry, j):
            tokens, positions, cache = carry
            logits, _, cache = decode_step(cfg, params, router_state, cache, tokens[:, None], positions[:, None],
                                           absorbed=absorbed)
            nxt = sample(logits[:, 0], jax.random.fold_in(sampling.key, step + j), sampling.temperature,
                         sampling.top_p)
            return (nxt, positions + active.astype(positions.dtype), cache), nxt
        (tokens, positions, cache), outs = on_device_steps(one, n_max)((tokens, positions, cache), n)
        return tokens, positions, cache, outs
    return jax.jit(fn, donate_argnums=(2,))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def slack(drafts: int = 1) -> int:
    """Slots past prompt + new tokens: a row that finishes inside a device call keeps stepping until the call
    ends (its tokens are dropped), and a speculative step writes up to drafts + 1 slots (plain decoding keeps
    the one-draft slack, so that its cache sizes do not depend on speculation)."""
    k = max(drafts, 1)
    return (k + 1) * CHUNK + k + 2


def layout(prompts: list[list[int]], max_new_tokens: int, max_len: Optional[int] = None,
           drafts: int = 1) -> tuple[int, int]:
    """(prompt pad length, cache slots), bucketed to multiples of 16 so that similar requests share compiled
    steps; max_len (>= every prompt + max_new_tokens) fixes the cache size across requests; drafts: per
    speculative step (`slack`)."""
    n_max = max(len(p) for p in prompts)
    need = max(n_max + max_new_tokens, max_len or 0)
    return round_up(n_max, 16), round_up(need + slack(drafts), 16)


def pad_prompts(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts with token 0 to [B, length]; returns (tokens int32, lengths int32)."""
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)
