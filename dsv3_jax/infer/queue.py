"""A request queue through a fixed number of batch slots (continuous batching), for plain and speculative
decoding: `generate(..., batch_size=B)` runs any number of prompts through B cache rows, and as soon as a
row's request is done the next prompt takes that row and decodes beside the others.

Why: one request per batch runs until its slowest row is done, and rows that finish early (eos, or in
speculative decoding fewer rejected drafts) idle meanwhile; a serving queue gives their slot to the next
request.

Refills are staged: when a row frees and no prefilled request is waiting, the next B prompts (fewer at the
queue's end) are prefilled in one call (`jit_prefill_rows`: expanded MLA, as `prefill`, into a cache of
their own only as wide as the padded prompts), and each row that frees takes the next of them
(`take_rows`: a copy of its cache window and decode state). Why: a prefill call reads every weight
whatever its row count, so prefilling rows one or two at a time as they free (speculative decoding frees them
at scattered steps) cost about twice plain decoding's refill time (experiments/results/spec_cost.md, session
14, and decode_ab_queue.md). slot == position (cache.py), so a taken row's positions restart at 0 and the previous
request's entries past the new prompt are masked until overwritten. Every row decodes at its own offset,
so greedy output per prompt is what the prompt gives alone. Sampling (temperature > 0) keeps the model's
distribution, but a request's draws depend on its slot and steps, not only on the seed.

Device calls run at most CHUNK steps; while prompts wait, a call stops once the active row nearest its end
can be done (so its slot is refilled without idling), and the last rows run as `generate` runs a batch.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..errors import InputError
from ..model.layers import dtype_of
from .cache import init_cache
from .decode import CHUNK, Sampling, jit_decode_steps, layout, pad_prompts, prefill, sample
from .request import DraftCounts, GenerationRequest, replicated_on_mesh_of
from .speculative import (SpecState, check_draft_module, check_drafts, emitted_tokens, jit_speculative_steps,
                          start_state)


def check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1 (the number of batch slots), got {batch_size!r}")
    return int(batch_size)


class Engine(NamedTuple):
    """What differs between plain and speculative decoding on the queue path."""
    mtp: bool                        # the prefill fills MTP module 1's cache too
    tokens_per_step: int             # the most tokens a step emits per row
    init: Callable                   # (batch, cfg) -> the per-row decode state, all rows empty
    rows_state: Callable             # (first tokens [k], prompt lengths [k], prompts [k,T], Prefill of k rows)
                                     #  -> the decode state of those k rows
    steps: Callable                  # (cfg, greedy_only) -> jitted (params, rs, cache, state, active, sampling,
                                     #  step, n) -> ...
    emitted: Callable                # one step's host outputs -> per-row token lists (for every row)


def _plain_steps(cfg, greedy_only: bool):      # greedy_only: jit_decode_steps keeps its run-time cond
    fn = jit_decode_steps(cfg)

    def run(params, rs, cache, state, active, sampling, step, n):
        tok, pos, cache, outs = fn(params, rs, cache, state[0], state[1], active, sampling, step, n)
        return (tok, pos), cache, outs
    return run


PLAIN = Engine(
    mtp=False, tokens_per_step=1,
    init=lambda b, cfg: (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32)),   # (pending token, position)
    rows_state=lambda tok, n, prompts, pre: (tok, n),
    steps=_plain_steps,
    emitted=lambda out: [[int(t)] for t in out])


def speculative_engine(drafts: int) -> Engine:
    """The queue's speculative decoding with `drafts` tokens drafted per step (speculative.py)."""
    return Engine(
        mtp=True, tokens_per_step=drafts + 1,
        init=lambda b, cfg: SpecState(jnp.zeros((b,), jnp.int32), jnp.zeros((b, drafts + 1), jnp.int32),
                                      jnp.zeros((b, drafts + 1, cfg.hidden_size), dtype_of(cfg.dtype))),
        rows_state=lambda tok, n, prompts, pre: start_state(n, prompts, tok, pre.h_tail, drafts),
        steps=lambda cfg, greedy_only: jit_speculative_steps(cfg, greedy_only=greedy_only),
        emitted=lambda out: emitted_tokens(*out, np.ones(len(out[1]), bool)))


def engine(name: str, drafts: int = 1) -> Engine:
    return PLAIN if name == "plain" else speculative_engine(drafts)


@functools.lru_cache(maxsize=32)
def jit_prefill_rows(cfg: ModelConfig, engine_name: str, drafts: int = 1, cache_dtype=None):
    """jit((params, rs, tokens [k,T], lengths [k], key, temperature, top_p) -> (first tokens [k], cache, state)):
    prefill k right-padded prompts into a k-row cache of T slots (MTP caches included for speculative
    decoding, in cache_dtype) and sample their first tokens; state: those k rows' decode state. drafts: per
    speculative step (the state's shape)."""
    eng = engine(engine_name, drafts)

    def fn(params, rs, tokens, lengths, key, temperature, top_p):
        k, t = tokens.shape
        fresh = init_cache(cfg, k, t, cache_dtype, mtp=eng.mtp)                  # T slots: the prompts' width
        out = prefill(cfg, params, rs, fresh, tokens, lengths, mtp=eng.mtp)
        tok = sample(out.logits, key, temperature, top_p)
        return tok, out.cache, eng.rows_state(tok, lengths, tokens, out)
    return jax.jit(fn)


def _take_rows(cache, state, staged_cache, staged_state, rows, src):
    """(cache, state, staged cache, staged state, rows [m], src [m]) -> (cache, state): batch row rows[j] takes
    staged row src[j]: the first T slots of its cache in every layer and MTP cache (T: the staged cache's
    width) and its decode state. A pair may repeat (padding writes the same values twice)."""
    for j in range(rows.shape[0]):
        cache = jax.tree.map(
            lambda big, new: jax.lax.dynamic_update_slice_in_dim(
                big, jax.lax.dynamic_slice_in_dim(new, src[j], 1, axis=1), rows[j], axis=1),
            cache, staged_cache)
    state = jax.tree.map(lambda a, v: a.at[rows].set(v[src].astype(a.dtype)), state, staged_state)
    return cache, state


take_rows = jax.jit(_take_rows, donate_argnums=(0,))       # the batch cache is updated in place


class Staged(NamedTuple):
    """Prompts prefilled ahead of the rows that will take them (`jit_prefill_rows`'s outputs, on the device)."""
    requests: list[int]              # prompt index of each staged row, in queue order
    first: np.ndarray                # [k] their first new tokens
    cache: Any
    state: Any


class Slots:
    """Which request each batch row serves, the requests' outputs (max_new_tokens / eos stopping), the queue
    of prompts not started yet, and streaming (one list per prompt, as `generate`'s stream_callback)."""

    def __init__(self, req: GenerationRequest, batch: int):
        self.req, self.out = req, [[] for _ in req.prompts]
        self.row_req = np.full(batch, -1)              # request served by each row, -1: none
        self.next = 0                                  # the next prompt to start

    def start(self, row: int) -> int:
        self.row_req[row], self.next = self.next, self.next + 1
        return self.row_req[row]

    def done(self, i: int) -> bool:
        o = self.out[i]
        eos = self.req.eos_id
        return len(o) >= self.req.max_new_tokens or (eos is not None and bool(o) and o[-1] == eos)

    @property
    def active(self) -> np.ndarray:
        return np.array([i >= 0 and not self.done(i) for i in self.row_req])

    @property
    def waiting(self) -> bool:
        return self.next < len(self.req.prompts)

    def free_rows(self) -> list[int]:
        return [r for r, i in enumerate(self.row_req) if i < 0 or self.done(i)] if self.waiting else []

    def add(self, per_row: list[list[int]], live: np.ndarray) -> None:
        """Tokens emitted by each row in one step; rows not live (or whose request is done) emit nothing."""
        emitted = [[] for _ in self.req.prompts]
        for r, toks in enumerate(per_row):
            i = self.row_req[r]
            if not live[r] or i < 0:
                continue
            for t in toks:
                if self.done(i):
                    break
                self.out[i].append(int(t))
                emitted[i].append(int(t))
        if self.req.stream_callback is not None and any(emitted):
            self.req.stream_callback(emitted)

    def left(self) -> list[int]:
        return [self.req.max_new_tokens - len(self.out[i]) for i in self.row_req[self.active]]


def queue_generate(cfg: ModelConfig, params: dict, router_state: dict, req: GenerationRequest, batch_size: int,
                   *, speculative: bool = False, drafts: int = 1) -> tuple[list[list[int]], dict]:
    """A validated request through min(batch_size, prompts) slots -> (tokens per prompt, stats).

    stats: new_tokens, queue_s (the whole queue: prefills and decode), prefill_s (the first fill and every
    refill: the staging prefills and the rows' takes), decode_s (queue_s - prefill_s), tokens_per_s (new
    tokens / queue_s), decode_tokens_per_s (new tokens / decode_s), refills, main_forwards (device steps run),
    device_calls (decode calls), prefill_calls (staging prefills), batch_size (slots used), and for
    speculative decoding drafts, accepted, acceptance_rate, tokens_per_forward, acceptance_per_prompt."""
    if speculative:
        check_draft_module(cfg, params)
    drafts = check_drafts(drafts) if speculative else 1          # plain: the one-draft cache slack and keys
    name = "speculative" if speculative else "plain"
    eng = engine(name, drafts)
    batch = min(batch_size, len(req.prompts))
    t_pad, n_slots = layout(req.prompts, req.max_new_tokens, req.max_len, drafts)
    sampling = Sampling(jax.random.PRNGKey(req.seed), jnp.float32(req.temperature), jnp.float32(req.top_p))
    first_keys = jax.random.fold_in(sampling.key, 2 ** 31 - 1)      # a staging's first tokens: fold_in(this, i)
    # Placed as the take calls will return them, so the first take compiles what the later ones run.
    cache, state = replicated_on_mesh_of((init_cache(cfg, batch, n_slots, req.cache_dtype, mtp=eng.mtp),
                                          eng.init(batch, cfg)), jax.tree.leaves(params)[0])
    prefill_rows = jit_prefill_rows(cfg, name, drafts, req.cache_dtype)
    steps = eng.steps(cfg, req.temperature == 0)
    slots = Slots(req, batch)
    staged, used = None, 0                  # prompts prefilled ahead; how many of them rows have taken
    # a list padded with its first item to a power of two: few shapes compile
    pad = lambda xs: xs + xs[:1] * (min(batch, 1 << (len(xs) - 1).bit_length()) - len(xs))
    t0 = time.perf_counter()
    prefill_s, refills, forwards, calls, prefills = 0.0, 0, 0, 0, 0
    counts = DraftCounts(len(req.prompts), drafts)
    while True:
        free = slots.free_rows()
        if free:
            t1 = time.perf_counter()
            if staged is None or used == len(staged.requests):       # stage the next B prompts, one call
                ids = list(range(slots.next, min(len(req.prompts), slots.next + batch)))
                tokens, lengths = pad_prompts([req.prompts[i] for i in pad(ids)], t_pad)
                tok, s_cache, s_state = prefill_rows(params, router_state, jnp.asarray(tokens), jnp.asarray(lengths),
                                                     jax.random.fold_in(first_keys, ids[0]), sampling.temperature,
                                                     sampling.top_p)
                staged, used = Staged(ids, np.asarray(tok), s_cache, s_state), 0
                prefills += 1
            rows = free[:len(staged.requests) - used]
            src = list(range(used, used + len(rows)))
            firsts = [[] for _ in range(batch)]
            for r, j in zip(rows, src):
                started = slots.start(r)
                if started != staged.requests[j]:                           # staged in queue order, always
                    raise RuntimeError(f"queue: row {r} started prompt {started}, staged {staged.requests[j]}")
                firsts[r] = [int(staged.first[j])]
            cache, state = take_rows(cache, state, staged.cache, staged.state, jnp.asarray(pad(rows), jnp.int32),
                                     jnp.asarray(pad(src), jnp.int32))
            used += len(rows)
            slots.add(firsts, np.isin(np.arange(batch), rows))
            refills += len(rows)
            prefill_s += time.perf_counter() - t1
            continue                                    # a taken request may already be done (max_new_tokens 1, eos)
        active = slots.active
        if not active.any():
            break
        left = slots.left()
        n = min(CHUNK, -(-(min(left) if slots.waiting else max(left)) // eng.tokens_per_step))
        state, cache, outs = steps(params, router_state, cache, state, jnp.asarray(active), sampling, forwards + 1, n)
        outs = jax.device_get(outs)
        calls += 1
        for j in range(n):
            live = slots.active
            if not live.any():
                break
            step_out = jax.tree.map(lambda o: o[j], outs)
            forwards += 1
            if speculative:
                counts.add(slots.row_req, live, step_out[1])
            slots.add(eng.emitted(step_out), live)
    queue_s = time.perf_counter() - t0
    new = sum(len(o) for o in slots.out)
    stats: dict[str, Any] = dict(new_tokens=new, queue_s=queue_s, prefill_s=prefill_s, decode_s=queue_s - prefill_s,
                                 tokens_per_s=new / queue_s, decode_tokens_per_s=new / max(queue_s - prefill_s, 1e-9),
                                 refills=refills - batch, main_forwards=forwards, batch_size=batch,
                                 device_calls=calls, prefill_calls=prefills,
                                 speculative=speculative, tokens_per_forward=1.0)
    if speculative:
        stats.update(counts.stats())
    return slots.out, stats
