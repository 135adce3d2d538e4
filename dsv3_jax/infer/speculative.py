"""Self-speculative decoding with MTP module 1 (`mtp_0`) as the draft model (arXiv 2412.19437, section 2.2,
"MTP in Inference"; acceptance and speed-up in section 5.4.3), drafting K tokens per step (K = `drafts`, 1 to
MAX_DRAFTS): the module chained on its own output for drafts 2..K (as session 9's study proposed:
experiments/results/spec_cost_chain.md).

MTP module 1 at position i reads (h^0_i, Emb(t_{i+1})) and predicts t_{i+2}. State of a row before a step
(L = number of tokens in the main cache, positions 0..L-1):
  toks = t_{L-K} .. t_L        the last one pending (emitted, not yet run through the main model)
  hs   = h^0_{L-K-1} .. h^0_{L-1}   (main-model outputs before the final norm)
  the MTP cache holds valid entries for positions < L-K-1.
One step:
  1. Draft 1. The MTP module runs on positions L-K-1 .. L-1 with inputs (hs[j], Emb(toks[j])), attending over
     its own cache; the last output predicts t_{L+1}: d_1. The positions before L-1 only write their latents
     (attention, FFN and head run for L-1 alone): they rewrite the entries that may be stale, the ones a
     previous step's chained drafts wrote, and the one a rejected draft's position left. K+1 positions keep the
     shapes static; positions below 0 are dummies, masked and not written.
  2. Drafts 2..K. The module runs at position L+j-2 on (h^1_{L+j-3}, Emb(d_{j-1})): its own output h^1
     standing in for the main model's h^0, which predicts the same token. It writes a stand-in entry at that
     position, which step 1 of a later step rewrites from the true h^0.
  3. Verify. The main model runs [t_L, d_1, ..., d_K] at positions L .. L+K in one absorbed decode step, causal
     among them: logits at L+j give the target p_j for t_{L+j+1}.
  4. Accept. Greedy: n = the number of leading drafts equal to the main model's argmax; emit d_1..d_n and the
     argmax after them (the correction, or after all K the bonus token), L += n + 1. Sampling: draft j is
     accepted with probability min(1, p_{j-1}(d_j) / q_j(d_j)) (q_j: its draft distribution) while all
     before it were; at the first rejection a token is drawn from normalise(max(p_{j-1} - q_j, 0)) (Leviathan
     et al. 2023), and after K acceptances the bonus from p_K. Main cache entries written for rejected drafts
     lie past the row's length: masked, later overwritten, so both caches stay consistent with no rollback.
Greedy output is therefore exactly plain greedy decoding (every emitted token is the main model's argmax given
the previous tokens); sampling output has exactly the main model's (tempered, top-p) distribution.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..errors import InputError
from .decode import (CHUNK, MAX_DRAFTS, Sampling, forward, greedy, main_logits, mtp_forward, on_device_steps,
                     sample, sample_from, sampling_probs)
from .request import (BatchShrinker, DecodeClock, DraftCounts, GenerationRequest, replicated_on_mesh_of,
                      start_request)


class SpecState(NamedTuple):
    length: jax.Array      # [B] int32, L: tokens in the main cache
    toks: jax.Array        # [B,K+1] int32, t_{L-K} .. t_L (t_L pending)
    hs: jax.Array          # [B,K+1,D] h^0_{L-K-1} .. h^0_{L-1}


def start_state(lengths, prompt_tokens, first, h_tail, drafts: int) -> SpecState:
    """The state after a prefill: lengths [B] prompt lengths (L), prompt_tokens [B,T] right-padded prompts,
    first [B] the first new token (t_L), h_tail [B,W,D] the prefill's h^0 at positions L-W .. L-1 (W > drafts).
    Positions below 0 get token 0 and zeros (dummies the draft pass masks). numpy or jax arrays (queue.py
    calls it inside a jitted refill)."""
    xp = jnp if isinstance(prompt_tokens, jax.Array) else np
    rows = xp.arange(prompt_tokens.shape[0])[:, None]
    pos = lengths[:, None] + xp.arange(-drafts, 0)                                   # [B,K]: L-K .. L-1
    before = xp.where(pos >= 0, prompt_tokens[rows, xp.maximum(pos, 0)], 0)
    toks = jnp.concatenate([jnp.asarray(before, jnp.int32), jnp.asarray(first, jnp.int32)[:, None]], axis=1)
    return SpecState(jnp.asarray(lengths, jnp.int32), toks, h_tail[:, -(drafts + 1):])


def accept_or_resample(p: jax.Array, q: jax.Array, draft: jax.Array, key: jax.Array):
    """Speculative-sampling rule for one draft per row. p, q [B,X] target and draft distributions, draft [B]
    drawn from q. Returns (accepted [B] bool, token [B]): the draft if accepted, else a draw from
    normalise(max(p - q, 0)). The token is distributed exactly as p."""
    k_u, k_r = jax.random.split(key)
    rows = jnp.arange(draft.shape[0])
    pd, qd = p[rows, draft], q[rows, draft]
    u = jax.random.uniform(k_u, draft.shape)
    accepted = u * qd < pd                                  # u < p/q without dividing (q(d) > 0 as d ~ q)
    resid = jnp.maximum(p - q, 0.0)
    total = resid.sum(-1, keepdims=True)
    resid = jnp.where(total > 0, resid, p)                  # p == q: never rejected; guard anyway
    alt = jax.random.categorical(k_r, jnp.log(resid), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(accepted, draft, alt)


def accept_drafts(p: jax.Array, q: jax.Array, drafts: jax.Array, keys) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling for K chained drafts per row. p [B,K+1,X] target distributions at the K+1 verified
    positions, q [B,K,X] the draft distributions each draft was drawn from, drafts [B,K], keys: K + 1 keys.
    Returns (n [B], token [B]): draft j is accepted with probability min(1, p_{j-1}(d_j) / q_j(d_j)) while all
    before it were (`accept_or_resample`); n counts the accepted; token is the draw from the residual of the
    first rejected one, or after all K a draw from p_K. Each emitted token is distributed as its p."""
    k = drafts.shape[1]
    ok, toks = zip(*[accept_or_resample(p[:, j], q[:, j], drafts[:, j], keys[j]) for j in range(k)])
    n = jnp.cumprod(jnp.stack(ok, axis=1), axis=1).sum(1)
    resampled = jnp.stack(toks, axis=1)[jnp.arange(drafts.shape[0]), jnp.minimum(n, k - 1)]
    return n, jnp.where(n == k, sample_from(p[:, k], keys[k]), resampled)


def speculative_step(cfg: ModelConfig, params, router_state, cache, st: SpecState, active, sampling: Sampling,
                     step, greedy_only: bool = False):
    """One draft-verify-accept step for every row (rows with active False keep their state); its randomness
    is fold_in(sampling.key, step). K, the drafts per step, is the state's (toks [B,K+1]).
    Returns (state, cache, (emitted [B,K+1], accepted [B])): a row emits its first accepted + 1 tokens
    (accepted is 0 for inactive rows).

    Greedy (temperature == 0) is the same rule on one-hot distributions, written directly: a draft is accepted
    exactly when it is the main model's argmax, and the argmax after the accepted ones is emitted. By default
    the rule is chosen at run time (lax.cond on the traced temperature); greedy_only (static, for a request
    known to be greedy) compiles the greedy rule alone, without the conditionals, which cost a step
    measurably at batch 1 (experiments/results/spec_cost.md, session 9)."""
    b, width = st.toks.shape
    k = width - 1
    temperature, top_p = sampling.temperature, sampling.top_p
    keys = jax.random.split(jax.random.fold_in(sampling.key, step), 2 * k + 1)   # drafts, acceptances, bonus
    length = st.length
    # 1. Draft 1 from positions L-K-1 .. L-1 (all but the last only write their latents).
    pos = length[:, None] + jnp.arange(-k - 1, 0, dtype=length.dtype)                            # [B,K+1]
    q_logits, h1, cache = mtp_forward(cfg, params, router_state, cache, st.hs, st.toks, pos, k=0,
                                      key_valid=pos >= 0, outputs_from=k)
    drafts, qs = [], []
    for j in range(k):
        if j:   # 2. Draft j+1: the module at position L+j-1 on its own h^1 and draft j.
            q_logits, h1, cache = mtp_forward(cfg, params, router_state, cache, h1, drafts[-1][:, None],
                                              (length + j - 1)[:, None], k=0)
        ql = q_logits[:, 0].astype(jnp.float32)
        qs.append(ql)
        drafts.append(greedy(ql) if greedy_only else sample(ql, keys[j], temperature, top_p))
    d = jnp.stack(drafts, axis=1)                                                                   # [B,K]
    # 3. Verify [t_L, d_1 .. d_K] at L .. L+K in one main forward.
    h0, cache = forward(cfg, params, router_state, cache, jnp.concatenate([st.toks[:, -1:], d], axis=1),
                        length[:, None] + jnp.arange(k + 1, dtype=length.dtype))
    logits = main_logits(cfg, params, h0)                                                         # [B,K+1,X]
    rows = jnp.arange(b)

    # 4. Accept: n leading drafts, then the correction (or bonus) token.
    def greedy_rule(logits):
        target = greedy(logits)                                                                   # [B,K+1]
        n = jnp.cumprod(d == target[:, :k], axis=1).sum(1)
        return n, target[rows, n]

    def sampling_rule(logits):
        q = sampling_probs(jnp.stack(qs, axis=1), temperature, top_p)                               # [B,K,X]
        return accept_drafts(sampling_probs(logits, temperature, top_p), q, d, keys[k:])

    if greedy_only:
        n, last = greedy_rule(logits)
    else:
        n, last = jax.lax.cond(temperature > 0, sampling_rule, greedy_rule, logits)
    n = n.astype(jnp.int32)
    slot = jnp.arange(k + 1)
    emitted = jnp.where(slot < n[:, None], jnp.pad(d, ((0, 0), (0, 1))), last[:, None])           # [B,K+1]
    # The new windows end at L' - 1 = L + n: offset n + 1 into [old window, this step's K+1 entries].
    window = (n + 1)[:, None] + slot                                                               # [B,K+1]
    new = SpecState(
        length=length + n + 1,
        toks=jnp.take_along_axis(jnp.concatenate([st.toks, emitted], axis=1), window, axis=1),
        hs=jnp.take_along_axis(jnp.concatenate([st.hs, h0.astype(st.hs.dtype)], axis=1), window[..., None], axis=1),
    )
    keep = lambda n_, o: jnp.where(active.reshape((b,) + (1,) * (n_.ndim - 1)), n_, o)
    new = SpecState(*[keep(a, o) for a, o in zip(new, st)])
    return new, cache, (emitted, jnp.where(active, n, 0))


@functools.lru_cache(maxsize=32)
def jit_speculative_steps(cfg: ModelConfig, n_max: int = CHUNK, step_fn=speculative_step, greedy_only: bool = False):
    """jit(up to n_max speculative steps on the device): (params, router_state, cache, state, active,
    sampling, step, n) -> (state, cache, (emitted, accepted) each [n_max, B, ...]), cache donated; step j's
    randomness is fold_in(sampling.key, step + j); the drafts per step are the state's. step_fn:
    `speculative_step` or a stand-in with its signature (experiments/spec_cost.py times the step's passes alone
    that way). greedy_only: compiled for temperature 0 only (`speculative_step`'s greedy_only; sampling
    arguments are then ignored)."""
    step_fn = functools.partial(step_fn, greedy_only=True) if greedy_only else step_fn

    def fn(params, router_state, cache, st, active, sampling: Sampling, step, n):
        def one(carry, j):
            st, cache = carry
            st, cache, emitted = step_fn(cfg, params, router_state, cache, st, active, sampling, step + j)
            return (st, cache), emitted
        (st, cache), outs = on_device_steps(one, n_max)((st, cache), n)
        return st, cache, outs
    return jax.jit(fn, donate_argnums=(2,))


def check_draft_module(cfg: ModelConfig, params: dict) -> None:
    """Speculative decoding drafts with MTP module 1: InputError when the model has none."""
    if cfg.num_nextn_predict_layers < 1 or "mtp_0" not in params:
        raise InputError("speculative decoding needs MTP module 1 (num_nextn_predict_layers >= 1 and "
                         "params['mtp_0']); use speculative=False")


def check_drafts(drafts) -> int:
    if isinstance(drafts, bool) or not isinstance(drafts, (int, np.integer)) or not 1 <= drafts <= MAX_DRAFTS:
        raise InputError(f"drafts must be an integer from 1 to {MAX_DRAFTS} (tokens drafted per speculative "
                         f"step), got {drafts!r}")
    return int(drafts)


def emitted_tokens(emitted, accepted, live) -> list[list[int]]:
    """One step's host outputs -> the tokens each row emitted (none for rows not live)."""
    return [[int(t) for t in e[:a + 1]] if on else [] for e, a, on in zip(emitted, accepted, live)]


def speculative_generate(cfg: ModelConfig, params: dict, router_state: dict, req: GenerationRequest,
                         drafts: int = 1) -> tuple[list[list[int]], dict]:
    """A validated request -> (tokens, stats); see the module docstring and `generate`."""
    check_draft_module(cfg, params)
    drafts = check_drafts(drafts)
    run = start_request(cfg, params, router_state, req, mtp=True, drafts=drafts)
    col, cache = run.col, run.cache
    st = replicated_on_mesh_of(start_state(run.lengths, run.tokens, run.tok, run.prefill.h_tail, drafts), run.tok)
    step = jit_speculative_steps(cfg, greedy_only=req.temperature == 0)
    clock = DecodeClock(col, run.t1)
    shrink = BatchShrinker(step, cache, req.shrink_batch)
    forwards, counts = 0, DraftCounts(len(req.prompts), drafts)
    while col.active.any():
        cache, st = shrink(col, cache, st)               # rows whose prompt is done leave the batch
        active = col.live_rows
        n = min(CHUNK, -(-col.most_left() // (drafts + 1)))     # a step emits at most drafts + 1 tokens per row
        st, cache, outs = step(params, router_state, cache, st, jnp.asarray(active), run.sampling, forwards + 1, n)
        shrink.ran(len(active))
        for (emitted, acc), live in col.live_steps(jax.device_get(outs), n):
            forwards += 1
            counts.add(col.rows, live, acc)
            col.add_rows(emitted_tokens(emitted, acc, live))
        clock.step_done()
    return col.out, dict(clock.stats(), prefill_s=run.t1 - run.t0, main_forwards=forwards, **counts.stats(),
                         batch_sizes=shrink.sizes, speculative=True)
