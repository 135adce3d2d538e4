"""Text generation with the latent KV cache: batched prefill (expanded MLA), then jitted, cache-donating calls
that each run up to CHUNK decode steps in the absorbed form on the device (tokens are streamed as each call
returns), or self-speculative decoding with MTP module 1 as the draft (speculative.py).

    tokens, stats = generate(cfg, variables, [[1, 2, 3], [4, 5]], max_new_tokens=32)

Prompts of different lengths are right-padded; every row's positions start at 0 at its first token, and each
row decodes at its own offset (see cache.py), so a batch gives the same tokens as each prompt alone.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from .cache import init_cache
from .decode import CHUNK, jit_decode_steps, jit_prefill, layout, pad_prompts, split_variables

StreamCallback = Callable[[list], None]


def validate_request(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_p,
                     max_len: Optional[int] = None) -> list[list[int]]:
    """Check a generation request at the edge; returns the prompts as lists of Python ints."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    limit = cfg.max_position_embeddings if max_len is None else min(max_len, cfg.max_position_embeddings)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token id")
        ids = []
        for j, t in enumerate(p):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"prompt {i} token {j} is {t!r}, not an integer token id")
            if not 0 <= int(t) < cfg.vocab_size:
                raise ValueError(f"prompt {i} token {j} is {int(t)}, outside the vocabulary [0, {cfg.vocab_size})")
            ids.append(int(t))
        if len(ids) + int(max_new_tokens) > limit:
            which = "max_position_embeddings" if limit == cfg.max_position_embeddings else "the cache (max_len)"
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(ids) + int(max_new_tokens)} positions, more than {which} = {limit}: "
                             "shorten the prompt or lower max_new_tokens")
        out.append(ids)
    return out


class _Collector:
    """Per-row output lists with max_new_tokens / eos stopping and streaming."""

    def __init__(self, n_rows: int, max_new: int, eos_id: Optional[int], callback: Optional[StreamCallback]):
        self.out = [[] for _ in range(n_rows)]
        self.max_new, self.eos_id, self.callback = max_new, eos_id, callback
        self.done = np.zeros(n_rows, bool)

    def add(self, new: list[list[int]]) -> None:
        emitted = []
        for i, toks in enumerate(new):
            got = []
            for t in toks:
                if self.done[i]:
                    break
                self.out[i].append(int(t))
                got.append(int(t))
                if len(self.out[i]) >= self.max_new or (self.eos_id is not None and t == self.eos_id):
                    self.done[i] = True
            emitted.append(got)
        if self.callback is not None and any(emitted):
            self.callback(emitted)

    @property
    def active(self) -> np.ndarray:
        return ~self.done

    def most_left(self) -> int:
        """The most tokens any active row may still emit (>= 1 while a row is active)."""
        return max([self.max_new - len(o) for o, d in zip(self.out, self.done) if not d] or [1])

    def live_steps(self, outs, n: int):
        """Walk the first n per-step outputs of a device call (a pytree of [n_max, B, ...] host arrays):
        yields (that step's outputs, the rows still live at it), and stops once every row is done (later
        steps of the call ran for nothing and are dropped)."""
        for i in range(n):
            live = self.active
            if not live.any():
                return
            yield jax.tree.map(lambda o: o[i], outs), live

    @property
    def count(self) -> int:
        return sum(len(o) for o in self.out)


class DecodeClock:
    """Decode timing with the first device call apart: it compiles the steps for a new shape (seconds on CPU),
    which would otherwise swamp tokens/s of short requests. tokens_per_s is over the calls after the first."""

    def __init__(self, col: _Collector, t_start: float):
        self.col, self.t_start, self.t_first, self.n_start, self.n_first = col, t_start, None, col.count, 0

    def step_done(self) -> None:
        if self.t_first is None:
            self.t_first, self.n_first = time.perf_counter(), self.col.count

    def stats(self) -> dict:
        t_end, n_end = time.perf_counter(), self.col.count
        t_first = self.t_first or t_end
        steady_s, steady_n = t_end - t_first, n_end - self.n_first
        if steady_n <= 0 or steady_s <= 0:          # a single step: fall back to the whole decode
            steady_s, steady_n = t_end - self.t_start, n_end - self.n_start
        return {"new_tokens": n_end, "decode_s": t_end - self.t_start, "first_step_s": t_first - self.t_start,
                "tokens_per_s": steady_n / steady_s if steady_s > 0 and steady_n > 0 else 0.0}


def generate(cfg: ModelConfig, variables, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, speculative: bool = False,
             stream_callback: Optional[StreamCallback] = None, *, eos_id: Optional[int] = None,
             cache_dtype=None, max_len: Optional[int] = None) -> tuple[list[list[int]], dict]:
    """Generate up to `max_new_tokens` tokens after each prompt.

    Greedy when temperature == 0, else sampling from softmax(logits / temperature) restricted to the top-p
    nucleus. speculative=True drafts one token per step with MTP module 1 and verifies it with the main model
    (greedy output identical to plain greedy; sampling keeps the model's distribution).
    stream_callback(new_tokens): called after each step with one list per prompt of the token ids emitted
    in that step (empty for rows that emitted nothing). eos_id: a row stops after emitting it (kept in the
    output). cache_dtype: storage dtype of the latent cache (default cfg.dtype). max_len: the cache's size in
    positions (prompt + new tokens must fit, ValueError otherwise, as for cfg.max_position_embeddings); fixing
    it lets requests of different lengths share compiled steps (default: just enough, in buckets of 16).

    Decode steps run CHUNK at a time on the device (one host round trip per call); tokens are streamed per
    step as each call returns.

    Returns (new token ids per prompt, stats) with stats: new_tokens, prefill_s, decode_s, first_step_s (the
    first device call, which compiles on a new shape), tokens_per_s (after that call; see DecodeClock),
    main_forwards (decode steps of the main model that some row needed, batched), tokens_per_forward, and
    for speculative decoding drafts, accepted, acceptance_rate.
    """
    prompts = validate_request(cfg, prompts, max_new_tokens, temperature, top_p, max_len)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    params, router_state = split_variables(variables)
    temperature, top_p = float(temperature), float(top_p)
    if speculative:
        from .speculative import speculative_generate
        return speculative_generate(cfg, params, router_state, prompts, int(max_new_tokens), temperature, top_p,
                                    seed, stream_callback, eos_id=eos_id, cache_dtype=cache_dtype,
                                    max_len=max_len)
    return plain_generate(cfg, params, router_state, prompts, int(max_new_tokens), temperature, top_p, seed,
                          stream_callback, eos_id=eos_id, cache_dtype=cache_dtype, max_len=max_len)



class Request(NamedTuple):
    tokens: np.ndarray          # [B, T] right-padded prompts
    lengths: np.ndarray         # [B]
    tok: jax.Array              # first new token of each row (from the prefill)
    cache: object
    prefill: object             # the prefill output (h_prev, h_last for speculative decoding)
    col: "_Collector"
    key: jax.Array
    temp: jax.Array
    top_p: jax.Array
    t0: float
    t1: float


def start_request(cfg, params, router_state, prompts, max_new_tokens, temperature, top_p, seed, stream_callback,
                  eos_id, cache_dtype, max_len, mtp: bool) -> Request:
    """The part plain and speculative decoding share: lay out and pad the prompts, allocate the latent cache,
    run the jitted prefill (which samples each row's first new token) and hand that token to the collector."""
    t_pad, slots = layout(prompts, max_new_tokens, max_len)
    tokens, lengths = pad_prompts(prompts, t_pad)
    cache = init_cache(cfg, len(prompts), slots, cache_dtype, mtp=mtp)
    key = jax.random.PRNGKey(seed)
    temp, top_p = jnp.float32(temperature), jnp.float32(top_p)
    col = _Collector(len(prompts), max_new_tokens, eos_id, stream_callback)
    t0 = time.perf_counter()
    tok, out = jit_prefill(cfg, mtp)(params, router_state, cache, jnp.asarray(tokens), jnp.asarray(lengths),
                                     jax.random.fold_in(key, 0), temp, top_p)
    tok_host = np.asarray(tok)
    t1 = time.perf_counter()
    col.add([[t] for t in tok_host])
    return Request(tokens, lengths, tok, out.cache, out, col, key, temp, top_p, t0, t1)


def plain_generate(cfg, params, router_state, prompts, max_new_tokens, temperature, top_p, seed,
                   stream_callback=None, *, eos_id=None, cache_dtype=None, max_len=None, absorbed: bool = True):
    """Validated inputs -> (tokens, stats): one decode step per new token (absorbed MLA), CHUNK per call."""
    req = start_request(cfg, params, router_state, prompts, max_new_tokens, temperature, top_p, seed,
                        stream_callback, eos_id, cache_dtype, max_len, mtp=False)
    tok, cache, col, key, temp, top_p, lengths = req.tok, req.cache, req.col, req.key, req.temp, req.top_p, req.lengths
    t0, t1 = req.t0, req.t1

    step = jit_decode_steps(cfg, absorbed)
    pos = jnp.asarray(lengths)           # position of each row's pending token
    clock = DecodeClock(col, t1)
    forwards = 0
    while col.active.any():
        active = col.active
        n = min(CHUNK, col.most_left())                 # every step of the call is needed by some row
        tok, pos, cache, outs = step(params, router_state, cache, tok, pos, jnp.asarray(active), key,
                                     forwards + 1, n, temp, top_p)
        for row, live in col.live_steps(np.asarray(outs), n):
            forwards += 1
            col.add([[t] if a else [] for t, a in zip(row, live)])
        clock.step_done()
    return col.out, dict(clock.stats(), prefill_s=t1 - t0, main_forwards=forwards, tokens_per_forward=1.0,
                         speculative=False)
