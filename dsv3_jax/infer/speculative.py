"""Self-speculative decoding with MTP module 1 (`mtp_0`) as the draft model (arXiv 2412.19437, section 2.2,
"MTP in Inference"; acceptance and speed-up in section 5.4.3).

State of a row before a step (L = number of tokens in the main cache, positions 0..L-1):
  tok_pend = t_L        the newest token (emitted, not yet run through the main model)
  tok_prev = t_{L-1}    h_last = h^0_{L-1}, h_prev = h^0_{L-2} (main-model outputs before the final norm)
  the MTP cache holds valid entries for positions < L-2.
One step:
  1. Draft. The MTP module runs on the pair of positions (L-2, L-1) with inputs
     (h^0_{L-2}, Emb(t_{L-1})) and (h^0_{L-1}, Emb(t_L)), attending over its own cache; the second output
     predicts t_{L+1}: the draft d. (Position L-2 is recomputed when the previous draft was rejected: same
     inputs, same entry; it is new when the previous draft was accepted. Always two positions keeps the shapes
     static. When L-2 < 0 the first member is a dummy: masked and not written. Position L-2 only writes its
     latent: attention, FFN and head run for L-1 alone.)
  2. Verify. The main model runs [t_L, d] at positions (L, L+1) in one absorbed decode step of two tokens,
     causal between them: logits at L give the target p1 for t_{L+1}, logits at L+1 give p2 for t_{L+2}.
  3. Accept or reject. Greedy: accept iff argmax p1 == d; sampling: accept with probability min(1, p1(d)/q(d))
     (q: the draft distribution), else draw t_{L+1} from normalise(max(p1 - q, 0)) (Leviathan et al. 2023).
     Accepted: emit d and a bonus token t_{L+2} ~ p2 (greedy: argmax), L += 2.
     Rejected: emit t_{L+1}, L += 1; the main cache entry written for d at slot L+1 is past the row's length,
     so it is masked and later overwritten: both caches stay consistent with no rollback.
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
from .decode import (CHUNK, Sampling, forward, greedy, main_logits, mtp_forward, on_device_steps, sample,
                     sample_from, sampling_probs)
from .request import DecodeClock, GenerationRequest, replicated_on_mesh_of, start_request


class SpecState(NamedTuple):
    length: jax.Array      # [B] int32, L: tokens in the main cache
    tok_prev: jax.Array    # [B] int32, t_{L-1}
    tok_pend: jax.Array    # [B] int32, t_L
    h_prev: jax.Array      # [B,D] h^0_{L-2}
    h_last: jax.Array      # [B,D] h^0_{L-1}


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


def speculative_step(cfg: ModelConfig, params, router_state, cache, st: SpecState, active, sampling: Sampling,
                     step, greedy_only: bool = False):
    """One draft-verify-accept step for every row (rows with active False keep their state); its randomness
    is fold_in(sampling.key, step).

    Greedy (temperature == 0) is the same rule on one-hot distributions, written directly: the draft is
    accepted exactly when it is the main model's argmax, and otherwise that argmax is emitted. By default
    the rule is chosen at run time (lax.cond on the traced temperature); greedy_only (static, for a request
    known to be greedy) compiles the greedy rule alone, without the two conditionals, which cost a step
    measurably at batch 1 (experiments/results/spec_cost.md, session 9)."""
    b = st.length.shape[0]
    temperature, top_p = sampling.temperature, sampling.top_p
    k_draft, k_acc, k_bonus = jax.random.split(jax.random.fold_in(sampling.key, step), 3)
    # 1. Draft with MTP module 1 on positions (L-2, L-1).
    pair_pos = jnp.stack([st.length - 2, st.length - 1], axis=1)
    q_logits, _, cache = mtp_forward(cfg, params, router_state, cache,
                                     jnp.stack([st.h_prev, st.h_last], axis=1),
                                     jnp.stack([st.tok_prev, st.tok_pend], axis=1),
                                     pair_pos, k=0, key_valid=pair_pos >= 0, outputs_from=1)
    q_logits = q_logits[:, 0].astype(jnp.float32)                                      # position L-1 only
    draft = greedy(q_logits) if greedy_only else sample(q_logits, k_draft, temperature, top_p)
    # 2. Verify [t_L, draft] at (L, L+1) in one main forward of two tokens.
    ver_pos = jnp.stack([st.length, st.length + 1], axis=1)
    h0, cache = forward(cfg, params, router_state, cache, jnp.stack([st.tok_pend, draft], axis=1), ver_pos)
    logits = main_logits(cfg, params, h0)                                               # [B,2,X]

    # 3. Accept / reject, and the bonus token after an accepted draft.
    def greedy_rule(logits):
        first = greedy(logits[:, 0])
        return first == draft, first, greedy(logits[:, 1])

    def sampling_rule(logits):
        p = sampling_probs(logits, temperature, top_p)                                   # [B,2,X]
        q = sampling_probs(q_logits, temperature, top_p)
        accepted, first = accept_or_resample(p[:, 0], q, draft, k_acc)
        return accepted, first, sample_from(p[:, 1], k_bonus)

    if greedy_only:
        accepted, first, bonus = greedy_rule(logits)
    else:
        accepted, first, bonus = jax.lax.cond(temperature > 0, sampling_rule, greedy_rule, logits)
    acc2 = accepted[:, None]
    new = SpecState(
        length=st.length + jnp.where(accepted, 2, 1),
        tok_prev=jnp.where(accepted, draft, st.tok_pend),
        tok_pend=jnp.where(accepted, bonus, first),
        h_prev=jnp.where(acc2, h0[:, 0], st.h_last),
        h_last=jnp.where(acc2, h0[:, 1], h0[:, 0]),
    )
    keep = lambda n, o: jnp.where(active.reshape((b,) + (1,) * (n.ndim - 1)), n, o)
    new = SpecState(*[keep(n, o) for n, o in zip(new, st)])
    return new, cache, (first, bonus, accepted & active)


@functools.lru_cache(maxsize=32)
def jit_speculative_steps(cfg: ModelConfig, n_max: int = CHUNK, step_fn=speculative_step, greedy_only: bool = False):
    """jit(up to n_max speculative steps on the device): (params, router_state, cache, state, active,
    sampling, step, n) -> (state, cache, (first, bonus, accepted) each [n_max, B]), cache donated;
    step j's randomness is fold_in(sampling.key, step + j). step_fn: `speculative_step` or a stand-in with
    its signature (experiments/spec_cost.py times the step's passes alone that way). greedy_only: compiled
    for temperature 0 only (`speculative_step`'s greedy_only; sampling arguments are then ignored)."""
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


def speculative_generate(cfg: ModelConfig, params: dict, router_state: dict,
                         req: GenerationRequest) -> tuple[list[list[int]], dict]:
    """A validated request -> (tokens, stats); see the module docstring and `generate`."""
    check_draft_module(cfg, params)
    run = start_request(cfg, params, router_state, req, mtp=True)
    col, cache = run.col, run.cache
    rows = np.arange(len(req.prompts))
    st = SpecState(replicated_on_mesh_of(run.lengths, run.tok),
                   replicated_on_mesh_of(run.tokens[rows, run.lengths - 1], run.tok),
                   run.tok, run.prefill.h_prev, run.prefill.h_last)

    step = jit_speculative_steps(cfg, greedy_only=req.temperature == 0)
    clock = DecodeClock(col, run.t1)
    forwards = drafts = accepted_total = 0
    while col.active.any():
        active = col.active
        n = min(CHUNK, -(-col.most_left() // 2))         # a step emits at most two tokens per row
        st, cache, outs = step(params, router_state, cache, st, jnp.asarray(active), run.sampling, forwards + 1, n)
        for (first, bonus, acc), live in col.live_steps(jax.device_get(outs), n):
            forwards += 1
            drafts += int(live.sum())
            accepted_total += int((acc & live).sum())
            col.add([([int(f), int(b)] if a else [int(f)]) if on else []
                     for f, b, a, on in zip(first, bonus, acc, live)])
        clock.step_done()
    rate = accepted_total / drafts if drafts else 0.0
    return col.out, dict(clock.stats(), prefill_s=run.t1 - run.t0, main_forwards=forwards, drafts=drafts,
                         accepted=accepted_total, acceptance_rate=rate, tokens_per_forward=1.0 + rate,
                         speculative=True)
