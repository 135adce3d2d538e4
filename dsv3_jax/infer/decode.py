"""Prefill and cached decoding over the latent KV cache (SPEC section 2), as pure functions of the param
dicts, reusing the model's own Linen modules (`MLA`, `RMSNorm`, `MLP`) through `module.apply` on sliced params
and `dsv3_jax.model.moe.route` / `dispatch.routed_experts` for the experts.

Layer stacks run under `jax.lax.scan` over the stacked params (`params['dense_layers']['layers']`,
`params['moe_layers']['layers']`) together with the stacked cache, so compile time does not grow with depth.

Positions and masking: slot == position (see cache.py). A forward over new tokens at `positions` [B,T]
(contiguous per row, starting at `positions[:, 0]`, which may differ between rows) attends to
  * the cached context: slots `< positions[b, 0]` of row b (everything before the first new token), and
  * the new tokens themselves, causally by position (`pos_q >= pos_k`), restricted to `key_valid`,
and writes the new tokens' `c_KV` / `RoPE(k_pe)` at slots `positions` (invalid keys are not written).
So a decode step can take several tokens at once (speculative verification), rows can have different
lengths (right-padded batches), and entries past a row's length (padding, rejected drafts) are never seen.

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
from ..model.layers import MLP, RMSNorm
from ..model.mla import MLA
from ..model.moe import MoE
from ..model.rope import rope_angles
from ..model.transformer import output_logits
from .cache import KVCache, LayerCache


# Variables -------------------------------------------------------------------------------------------------

def split_variables(variables: Any) -> tuple[dict, dict]:
    """`Transformer.init`/checkpoint variables -> (params, router_state), unboxed (no logical-axis boxes)."""
    if not isinstance(variables, dict) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection (as Transformer.init returns)")
    v = nn.meta.unbox(variables)
    return v["params"], v.get("router_state", {})


# One block, one stack ----------------------------------------------------------------------------------------

def _norm(cfg: ModelConfig, p: dict, x: jax.Array) -> jax.Array:
    return RMSNorm(cfg).apply({"params": p}, x)


def _moe(cfg: ModelConfig, p: dict, router_bias: jax.Array, z: jax.Array) -> jax.Array:
    """The model's own MoE on z [B,T,D] (its statistics dropped); few tokens take the gather dispatch."""
    return MoE(cfg).apply({"params": p, "router_state": {"router_bias": router_bias}}, z)[0]


def block_step(cfg: ModelConfig, moe: bool, p: dict, rs: Optional[dict], h: jax.Array, cos, sin,
               context: Optional[tuple], new_mask: jax.Array, absorbed: bool, cache_dtype):
    """`DecoderBlock` over new tokens h [B,T,D] with a cached context.

    context: None or (c_kv [B,S,C], k_pe [B,S,R], mask [B,T,S]). Returns (h, c_kv [B,T,C], k_pe [B,T,R]) with
    the new latents in the cache dtype (the new tokens attend to their own rounded latents, exactly as later
    tokens will see them in the cache, so results do not depend on how tokens are grouped into steps)."""
    mla = MLA(cfg)
    x = _norm(cfg, p["attn_norm"], h)
    q_nope, q_pe, c_kv, k_pe = mla.apply({"params": p["attn"]}, x, cos, sin, method=MLA.project)
    c_kv, k_pe = c_kv.astype(cache_dtype), k_pe.astype(cache_dtype)
    blocks = ([context] if context is not None else []) + [(c_kv, k_pe, new_mask)]
    h = h + mla.apply({"params": p["attn"]}, q_nope, q_pe, blocks, absorbed, method=MLA.cached_attention)
    z = _norm(cfg, p["mlp_norm"], h)
    if moe:
        y = _moe(cfg, p["moe"], rs["moe"]["router_bias"], z)
    else:
        y = MLP(cfg, cfg.intermediate_size).apply({"params": p["mlp"]}, z)
    return h + y, c_kv, k_pe


def _run_stack(cfg, moe, p_stack, rs_stack, h, cos, sin, layers: LayerCache, read_cache: bool,
               ctx_mask, new_mask, absorbed):
    """Scan block_step over a stack: returns (h, new c_kv [L,B,T,C], new k_pe [L,B,T,R])."""
    cache_dtype = layers.c_kv.dtype

    def body(h, xs):
        p, rs, cc, cp = xs
        ctx = (cc, cp, ctx_mask) if read_cache else None
        h, c_kv, k_pe = block_step(cfg, moe, p, rs, h, cos, sin, ctx, new_mask, absorbed, cache_dtype)
        return h, (c_kv, k_pe)

    xs = (p_stack, rs_stack, layers.c_kv if read_cache else None, layers.k_pe if read_cache else None)
    h, (c_new, pe_new) = jax.lax.scan(body, h, xs, unroll=min(cfg.scan_unroll, _stack_depth(p_stack)))
    return h, c_new, pe_new


def _stack_depth(p_stack) -> int:
    return jax.tree.leaves(p_stack)[0].shape[0]


def _masks(cache_len: int, positions: jax.Array, key_valid: Optional[jax.Array]):
    """Context mask [B,T,S] (slots before the row's first new position) and causal new-token mask [B,T,T]."""
    b, t = positions.shape
    slots = jnp.arange(cache_len, dtype=positions.dtype)
    ctx = jnp.broadcast_to(slots[None, None, :] < positions[:, :1, None], (b, t, cache_len))
    new = positions[:, :, None] >= positions[:, None, :]
    if key_valid is not None:
        new = new & key_valid[:, None, :]
    return ctx, new


def _write_slots(positions, key_valid):
    return positions if key_valid is None else jnp.where(key_valid, positions, -1)


# Whole-model forwards ----------------------------------------------------------------------------------------

def embed(params: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embedding"], tokens, axis=0)


def head(cfg: ModelConfig, params: dict, norm_params: dict, h: jax.Array) -> jax.Array:
    """norm then the shared output head, fp32 logits (as `Transformer.head`)."""
    return output_logits(_norm(cfg, norm_params, h), params["lm_head"])


def forward(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, tokens: jax.Array,
            positions: jax.Array, *, read_cache: bool = True, absorbed: bool = True,
            key_valid: Optional[jax.Array] = None) -> tuple[jax.Array, KVCache]:
    """Main blocks over new tokens [B,T] at `positions` [B,T]: returns (h^0 [B,T,D] before the final norm,
    the cache with the new latents written). read_cache=False ignores the cache's content (prefill)."""
    cos, sin = rope_angles(cfg, positions)
    h = embed(params, tokens)
    ctx_mask, new_mask = _masks(cache.max_len, positions, key_valid)
    slots = _write_slots(positions, key_valid)
    dense, moe = cache.dense, cache.moe
    if cfg.num_dense_layers:
        h, c, pe = _run_stack(cfg, False, params["dense_layers"]["layers"], None, h, cos, sin, dense,
                              read_cache, ctx_mask, new_mask, absorbed)
        dense = dense.write(c, pe, slots)
    if cfg.num_moe_layers:
        h, c, pe = _run_stack(cfg, True, params["moe_layers"]["layers"], router_state["moe_layers"]["layers"],
                              h, cos, sin, moe, read_cache, ctx_mask, new_mask, absorbed)
        moe = moe.write(c, pe, slots)
    return h, cache.replace(dense=dense, moe=moe)


def main_logits(cfg: ModelConfig, params: dict, h0: jax.Array) -> jax.Array:
    return head(cfg, params, params["final_norm"], h0)


def mtp_forward(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, h_prev: jax.Array,
                next_tokens: jax.Array, positions: jax.Array, *, k: int = 0, read_cache: bool = True,
                absorbed: bool = True, key_valid: Optional[jax.Array] = None):
    """MTP module k (0-based) at positions [B,T]: h' = eh_proj([enorm(Emb(next_tokens)); hnorm(h_prev)]),
    its block over its own cache, its norm and the shared head. Returns (logits [B,T,X], h^{k+1}, cache)."""
    p = params[f"mtp_{k}"]
    rs = router_state[f"mtp_{k}"]["block"]
    layer = cache.mtp[k]
    x = jnp.concatenate([_norm(cfg, p["enorm"], embed(params, next_tokens)), _norm(cfg, p["hnorm"], h_prev)], -1)
    h = jnp.dot(x.astype(cfg.dtype), p["eh_proj"].astype(cfg.dtype)).astype(h_prev.dtype)
    cos, sin = rope_angles(cfg, positions)
    ctx_mask, new_mask = _masks(layer.max_len, positions, key_valid)
    ctx = (layer.c_kv[0], layer.k_pe[0], ctx_mask) if read_cache else None
    h, c_kv, k_pe = block_step(cfg, True, p["block"], rs, h, cos, sin, ctx, new_mask, absorbed, layer.c_kv.dtype)
    layer = layer.write(c_kv[None], k_pe[None], _write_slots(positions, key_valid))
    mtp = tuple(layer if i == k else c for i, c in enumerate(cache.mtp))
    return head(cfg, params, p["norm"], h), h, cache.replace(mtp=mtp)


class Prefill(NamedTuple):
    logits: jax.Array      # [B,X] fp32 at each row's last real prompt token (predicts the first new token)
    h_last: jax.Array      # [B,D] h^0 at position n_b - 1
    h_prev: jax.Array      # [B,D] h^0 at position n_b - 2 (zeros when n_b == 1)
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
    h_prev = jnp.where((lengths >= 2)[:, None], h0[rows, jnp.maximum(lengths - 2, 0)], 0)
    if mtp:
        nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        _, _, cache = mtp_forward(cfg, params, router_state, cache, h0, nxt, positions, read_cache=False,
                                  absorbed=False, key_valid=valid)
    return Prefill(main_logits(cfg, params, h_last), h_last, h_prev, cache)


def decode_step(cfg: ModelConfig, params: dict, router_state: dict, cache: KVCache, tokens: jax.Array,
                positions: jax.Array, *, absorbed: bool = True):
    """New tokens [B,T] (T >= 1, causal among themselves) at positions [B,T] after a cached context of
    positions[:, 0] tokens per row. Returns (logits [B,T,X] fp32, h^0 [B,T,D], cache)."""
    h0, cache = forward(cfg, params, router_state, cache, tokens, positions, absorbed=absorbed)
    return main_logits(cfg, params, h0), h0, cache


# Sampling ---------------------------------------------------------------------------------------------------
# temperature and top_p are traced scalars, so one compiled step serves every setting; temperature == 0 is
# greedy, selected at run time with lax.cond (only the taken branch runs: greedy draws no random numbers).

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


def token_probs(logits: jax.Array, temperature, top_p) -> jax.Array:
    """The sampling distribution [..., X]: tempered top-p softmax, or the one-hot of the argmax when
    temperature == 0."""
    z = logits.astype(jnp.float32)
    return jax.lax.cond(
        temperature > 0, lambda z: sampling_probs(z, temperature, top_p),
        lambda z: jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=jnp.float32), z)


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
    as [n_max, ...] (entries past n stay zero). Per-step host round trips cost ~0.5 ms on CPU, comparable to
    a small model's whole decode step."""
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
    positions [B], active [B], key, step, n, temperature, top_p) -> (last tokens [B], positions, cache,
    tokens of each step [n_max, B]), cache donated. Step j samples with fold_in(key, step + j); rows with
    active False keep their position (their tokens are ignored)."""
    def fn(params, router_state, cache, tokens, positions, active, key, step, n, temperature=0.0, top_p=1.0):
        def one(carry, j):
            tokens, positions, cache = carry
            logits, _, cache = decode_step(cfg, params, router_state, cache, tokens[:, None], positions[:, None],
                                           absorbed=absorbed)
            nxt = sample(logits[:, 0], jax.random.fold_in(key, step + j), temperature, top_p)
            return (nxt, positions + active.astype(positions.dtype), cache), nxt
        (tokens, positions, cache), outs = on_device_steps(one, n_max)((tokens, positions, cache), n)
        return tokens, positions, cache, outs
    return jax.jit(fn, donate_argnums=(2,))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# Slots past prompt + new tokens: a row that finishes inside a device call keeps stepping until the call ends
# (its tokens are dropped), and a speculative step writes up to two slots.
SLACK = 2 * CHUNK + 3


def layout(prompts: list[list[int]], max_new_tokens: int, max_len: Optional[int] = None) -> tuple[int, int]:
    """(prompt pad length, cache slots), bucketed to multiples of 16 so that similar requests share compiled
    steps; max_len (>= every prompt + max_new_tokens) fixes the cache size across requests."""
    n_max = max(len(p) for p in prompts)
    need = max(n_max + max_new_tokens, max_len or 0)
    return round_up(n_max, 16), round_up(need + SLACK, 16)


def pad_prompts(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad prompts with token 0 to [B, length]; returns (tokens int32, lengths int32)."""
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.array([len(p) for p in prompts], np.int32)


def random_variables(cfg: ModelConfig, seed: int = 0, bias_scale: float = 0.1) -> dict:
    """Random variables shaped like `Transformer(cfg).init(...)`, unboxed, drawn with numpy (no XLA compile):
    params N(0, initializer_range^2), norms 1, router biases N(0, bias_scale^2) (non-zero, as after training).
    For tests and benchmarks without a checkpoint."""
    from ..model import Transformer
    shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0),
                                          jnp.zeros((1, 1), jnp.int32)))
    rng = np.random.default_rng(seed)

    def make(path, s):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[0] == "router_state":
            return jnp.asarray(rng.normal(0, bias_scale, s.shape).astype(np.float32))
        if names[-1] == "scale":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0, cfg.initializer_range, s.shape).astype(s.dtype))

    return jax.tree_util.tree_map_with_path(make, shapes)
