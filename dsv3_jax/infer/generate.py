"""Text generation with the latent KV cache: batched prefill (expanded MLA), then jitted, cache-donating calls
that each run up to CHUNK decode steps in the absorbed form on the device (tokens are streamed as each call
returns), or self-speculative decoding with MTP module 1 as the draft (speculative.py).

    tokens, stats = generate(cfg, variables, [[1, 2, 3], [4, 5]], max_new_tokens=32)

Prompts of different lengths are right-padded; every row's positions start at 0 at its first token, and each
row decodes at its own offset (see cache.py), so a batch gives the same tokens as each prompt alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from ..code_maps import ensure_map_headroom
from ..config import ModelConfig
from ..errors import InputError
from .decode import CHUNK, decode_params, jit_decode_steps, split_variables
from .request import (BatchShrinker, DecodeClock, GenerationRequest, StreamCallback, replicated_on_mesh_of,
                      start_request)
from .queue import check_batch_size, queue_generate
from .speculative import check_drafts, speculative_generate


def validate_sampling(max_new_tokens, temperature, top_p) -> None:
    """Check the request's numbers, which need no model: the CLI calls this before it loads any weights."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")


def validate_request(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_p,
                     max_len: Optional[int] = None,
                     prompt_names: Optional[Sequence[str]] = None) -> list[list[int]]:
    """Check a generation request at the edge (InputError, a ValueError, naming the problem); returns the
    prompts as lists of Python ints. Errors call prompt i "prompt i", or prompt_names[i] when given (the CLI
    adds the line of a --prompts-file)."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise InputError("prompts must be a non-empty list of token-id lists")
    validate_sampling(max_new_tokens, temperature, top_p)
    limit = cfg.max_position_embeddings if max_len is None else min(max_len, cfg.max_position_embeddings)
    out = []
    for i, p in enumerate(prompts):
        name = f"prompt {i}" if prompt_names is None else prompt_names[i]
        if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)):
            raise InputError(f"{name} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise InputError(f"{name} is empty: give at least one token id")
        ids = []
        for j, t in enumerate(p):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise InputError(f"{name} token {j} is {t!r}, not an integer token id")
            if not 0 <= int(t) < cfg.vocab_size:
                raise InputError(f"{name} token {j} is {int(t)}, outside the vocabulary [0, {cfg.vocab_size})")
            ids.append(int(t))
        if len(ids) + int(max_new_tokens) > limit:
            which = "max_position_embeddings" if limit == cfg.max_position_embeddings else "the cache (max_len)"
            raise InputError(f"{name} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(ids) + int(max_new_tokens)} positions, more than {which} = {limit}: "
                             "shorten the prompt or lower max_new_tokens")
        out.append(ids)
    return out


def generate(cfg: ModelConfig, variables, prompts: list[list[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, speculative: bool = False,
             stream_callback: Optional[StreamCallback] = None, *, eos_id: Optional[int] = None,
             cache_dtype=None, max_len: Optional[int] = None,
             batch_size: Optional[int] = None, drafts: int = 1,
             shrink_batch: Optional[bool] = None) -> tuple[list[list[int]], dict]:
    """Generate up to `max_new_tokens` tokens after each prompt.

    Greedy when temperature == 0, else sampling from softmax(logits / temperature) restricted to the top-p
    nucleus. speculative=True drafts tokens with MTP module 1 and verifies them with the main model
    (greedy output identical to plain greedy; sampling keeps the model's distribution). drafts: tokens drafted
    per speculative step, 1 to 3, the module chained on its own output past the first (speculative.py). One
    is the default: on CPU a second or third draft costs more than the tokens it adds
    (experiments/results/spec_drafts.md); where verifying more tokens is nearly free (an accelerator's decode
    step, bound by reading weights) chained drafts may pay.
    stream_callback(new_tokens): called after each step with one list per prompt of the token ids emitted
    in that step (empty for rows that emitted nothing). eos_id: a row stops after emitting it (kept in the
    output). cache_dtype: storage dtype of the latent cache (default cfg.dtype). max_len: the cache's size in
    positions (prompt + new tokens must fit, InputError otherwise, as for cfg.max_position_embeddings); fixing
    it lets requests of different lengths share compiled steps (default: just enough, in buckets of 16).

    batch_size: run the prompts through that many batch slots (a serving queue, queue.py): a row whose
    request is done takes the next prompt at once, for plain and speculative decoding; greedy output per
    prompt is unchanged. Default None: all prompts in one batch, until the slowest row is done. The stats
    then differ (queue.py's `queue_generate`).

    shrink_batch (one batch, batch_size None): once at most half of the rows are still decoding (the others
    stopped at eos, or accepted more drafts), the batch shrinks to those rows (request.py's `BatchShrinker`),
    so the slowest rows do not pay for the finished ones' compute. None (default): only to a batch size whose
    step program already ran in this process (no new compilation); True: whenever it can (compiling the
    smaller batch's program once: for serving loops and benchmarks); False: never. Outputs are unchanged
    (greedy: the same tokens; sampling: the same distribution).

    Decode steps run CHUNK at a time on the device (one host round trip per call); tokens are streamed per
    step as each call returns. Each new shape (batch size, cache length) compiles its programs, which hold
    memory mappings until dropped: past 3/4 of Linux's limit on them, `generate` first drops every compiled
    JAX program, with a warning (code_maps.py), rather than let the process abort.

    Returns (new token ids per prompt, stats) with stats: new_tokens, prefill_s, decode_s, first_step_s (the
    first device call, which compiles on a new shape), tokens_per_s (after that call; see DecodeClock),
    main_forwards (decode steps of the main model that some row needed, batched), tokens_per_forward (tokens
    a row emits per main forward), batch_sizes (the decode batch's size, then each size it shrank to), and
    for speculative decoding draft_tokens (drafts per step), drafts
    (drafted tokens), accepted, acceptance_rate (accepted / drafts), acceptance_per_prompt (the same per prompt:
    one prompt whose drafts keep failing holds a whole batch back).
    """
    prompts = validate_request(cfg, prompts, max_new_tokens, temperature, top_p, max_len)
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise InputError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if batch_size is not None:
        batch_size = check_batch_size(batch_size)
    if shrink_batch is not None and not isinstance(shrink_batch, bool):
        raise InputError(f"shrink_batch must be None, True or False, got {shrink_batch!r}")
    if ensure_map_headroom():          # compiled programs near the process's mapping limit were dropped
        BatchShrinker.forget_compiled()
    params, router_state = split_variables(variables)
    # per-layer weights where a batch decodes faster from them (decode.py)
    params = decode_params(cfg, params, rows=batch_size or len(prompts))
    req = GenerationRequest(prompts, int(max_new_tokens), float(temperature), float(top_p), seed, stream_callback,
                            eos_id, cache_dtype, max_len, shrink_batch)
    drafts = check_drafts(drafts)
    if batch_size is not None:
        return queue_generate(cfg, params, router_state, req, batch_size, speculative=speculative, drafts=drafts)
    if speculative:
        return speculative_generate(cfg, params, router_state, req, drafts)
    return plain_generate(cfg, params, router_state, req)



def plain_generate(cfg: ModelConfig, params: dict, router_state: dict, req: GenerationRequest, *,
                   absorbed: bool = True) -> tuple[list[list[int]], dict]:
    """A validated request -> (tokens, stats): one decode step per new token (absorbed MLA), CHUNK per call."""
    run = start_request(cfg, params, router_state, req, mtp=False)
    tok, cache, col = run.tok, run.cache, run.col
    step = jit_decode_steps(cfg, absorbed)
    pos = replicated_on_mesh_of(run.lengths, run.tok)     # position of each row's pending token
    clock = DecodeClock(col, run.t1)
    shrink = BatchShrinker(step, cache, req.shrink_batch)
    forwards = 0
    while col.active.any():
        cache, (tok, pos) = shrink(col, cache, (tok, pos))     # rows done (eos) leave the batch
        active = col.live_rows
        n = min(CHUNK, col.most_left())                 # every step of the call is needed by some row
        tok, pos, cache, outs = step(params, router_state, cache, tok, pos, jnp.asarray(active), run.sampling,
                                     forwards + 1, n)
        shrink.ran(len(active))
        for row, live in col.live_steps(np.asarray(outs), n):
            forwards += 1
            col.add_rows([[t] if a else [] for t, a in zip(row, live)])
        clock.step_done()
    return col.out, dict(clock.stats(), prefill_s=run.t1 - run.t0, main_forwards=forwards, tokens_per_forward=1.0,
                         batch_sizes=shrink.sizes, speculative=False)
