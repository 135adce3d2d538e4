"""Inference: latent cache, absorbed-MLA decoding, generation, MTP self-speculative decoding.

Tiny random models (hidden 64, 3 layers: 1 dense + 2 MoE, vocab 64, MTP depth 1), in two variants:
q_lora_rank set without YaRN, and q_lora_rank None with YaRN. Shapes are kept identical across tests (batch
1 or 20, prompts under 16 tokens, a cache of MAX_LEN positions) so that each jitted step compiles once:
compilation dominates the run time on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import PRESETS, RopeScaling
from dsv3_jax.infer import (accept_drafts, accept_or_resample, bytes_per_token_per_layer, cache_bytes, generate,
                            init_cache, split_variables)
from dsv3_jax.infer.decode import jit_decode_step, jit_prefill, mtp_forward
from dsv3_jax.model import Transformer
from dsv3_jax.testing import random_variables

VOCAB = 64
BASE = PRESETS["tiny"].replace(hidden_size=64, vocab_size=VOCAB, num_hidden_layers=3, first_k_dense_replace=1,
                               intermediate_size=128, moe_intermediate_size=32, max_position_embeddings=256,
                               num_nextn_predict_layers=1, moe_impl="dense")
CFG_A = BASE                                                                         # q_lora set, plain RoPE
MAX_LEN = 80
CFG_B = BASE.replace(q_lora_rank=None, rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32))


@functools.lru_cache(maxsize=None)
def variables(cfg, seed=0):
    return random_variables(cfg, seed)


@functools.lru_cache(maxsize=None)
def full_forward(cfg):
    return jax.jit(lambda v, t: Transformer(cfg).apply(v, t))


def prompts_20():
    rng = np.random.default_rng(1)
    lengths = [1, 2, 13, 5, 8] + list(rng.integers(1, 14, size=15))
    return [list(map(int, rng.integers(0, VOCAB, size=n))) for n in lengths]


# 1. Absorbed decode == expanded full forward ---------------------------------------------------------------

@pytest.mark.parametrize("cfg", [CFG_A, CFG_B], ids=["q_lora", "no_q_lora_yarn"])
def test_absorbed_decode_matches_full_forward(cfg):
    v = variables(cfg)
    params, rs = split_variables(v)
    rng = np.random.default_rng(0)
    seq = rng.integers(0, VOCAB, size=(2, 32)).astype(np.int32)
    full = full_forward(cfg)(v, jnp.asarray(seq))
    n = np.array([5, 9], np.int32)                       # rows of different prompt lengths (right-padded)
    prompt = np.where(np.arange(16)[None] < n[:, None], seq[:, :16], 0).astype(np.int32)
    cache = init_cache(cfg, 2, 32)
    _, out = jit_prefill(cfg, True)(params, rs, cache, jnp.asarray(prompt), jnp.asarray(n), jax.random.PRNGKey(0))
    np.testing.assert_allclose(out.logits, full.logits[np.arange(2), n - 1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.h_last, full.hidden[np.arange(2), n - 1], atol=1e-4, rtol=0)
    cache = out.cache

    if cfg is CFG_A:
        # The MTP module over its own cache (filled by the prefill) matches the full forward's MTP logits.
        pos = np.stack([n - 2, n - 1], 1).astype(np.int32)
        rows = np.arange(2)[:, None]
        mtp = jax.jit(lambda c, h, t, p: mtp_forward(cfg, params, rs, c, h, t, p, key_valid=p >= 0)[0])
        mtp_logits = mtp(cache, full.hidden[rows, pos], jnp.asarray(seq[rows, pos + 1]), jnp.asarray(pos))
        np.testing.assert_allclose(mtp_logits, full.mtp_logits[0][rows, pos], atol=1e-4, rtol=0)

    step = jit_decode_step(cfg, absorbed=True)
    expanded = jit_decode_step(cfg, absorbed=False) if cfg is CFG_A else None
    pos = n.copy()
    worst, steps = 0.0, 0
    while (pos + 3 <= 32).all():
        t = 3 if steps == 4 else 1                       # one multi-token step (speculative verification)
        idx = pos[:, None] + np.arange(t)[None]
        toks = jnp.asarray(seq[np.arange(2)[:, None], idx])
        if expanded is not None and t == 1:
            # The baseline that re-expands the cached latent gives the same logits; it must not change the
            # cache's content, so run it on a copy.
            e_logits, _, _ = expanded(params, rs, jax.tree_util.tree_map(jnp.copy, cache), toks, jnp.asarray(idx))
        logits, _, cache = step(params, rs, cache, toks, jnp.asarray(idx, np.int32))
        ref = full.logits[np.arange(2)[:, None], idx]
        worst = max(worst, float(np.abs(logits - ref).max()))
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
        if expanded is not None and t == 1:
            np.testing.assert_allclose(e_logits, ref, atol=1e-4, rtol=0)
        pos = pos + t
        steps += 1
    assert steps >= 15 and worst < 1e-4


# 2. Cached greedy generation == argmax of repeated full forward passes ---------------------------------------

def test_cached_greedy_matches_repeated_full_forward():
    cfg = CFG_A
    v = variables(cfg)
    prompt = [3, 17, 42, 8, 1, 60, 33]
    streamed = []
    out, stats = generate(cfg, v, [prompt], max_new_tokens=64, stream_callback=streamed.append, max_len=MAX_LEN)
    assert len(out[0]) == 64 and stats["new_tokens"] == 64
    assert [t for step in streamed for t in step[0]] == out[0]       # streaming delivers every token once
    fwd = full_forward(cfg)
    buf = np.zeros((1, len(prompt) + 64), np.int32)
    buf[0, :len(prompt)] = prompt
    ref = []
    for i in range(64):
        cur = len(prompt) + i
        logits = fwd(v, jnp.asarray(buf)).logits              # causal: the zeros after `cur` change nothing
        nxt = int(jnp.argmax(logits[0, cur - 1]))
        ref.append(nxt)
        buf[0, cur] = nxt
    assert out[0] == ref


# 3./4. Batches, speculative decoding ---------------------------------------------------------------------------

# A reference's top-two logit gap below which another batch shape's rounding may pick the other token. The
# random models' logits have a spread of about 0.05 and are O(0.1), so fp32 rounding moves them by ~1e-6 at
# most; 1e-4 leaves two orders of magnitude, and 6 of the 1280 positions of plain_greedy_20's first ten rows
# fall under it (the smallest gap is 5e-6).
NEAR_TIE = 1e-4


def next_logits(cfg, v, rows: list) -> np.ndarray:
    """[len(rows), X]: the logits after each token list's last token (one full forward, right-padded to
    MAX_LEN so that every call shares one compiled shape)."""
    tokens = np.zeros((len(rows), MAX_LEN), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    logits = np.asarray(full_forward(cfg)(v, jnp.asarray(tokens)).logits)
    return logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]


def check_same_greedy(out, ref, prompts, cfg=CFG_A, v=None):
    """out == ref, token for token (greedy outputs of two ways of decoding the same prompts). On a mismatch the
    failure names each row's first differing token and the reference's top-two logit gap there (a full
    forward). On CPU any difference fails: XLA:CPU has given every row the same bits at every batch shape these
    tests use. Elsewhere (a GPU's GEMMs may round by shape) rows that leave the reference only at near-ties
    (gap < NEAR_TIE) xfail, visibly, and any other difference fails."""
    if out == ref:
        return
    v = variables(cfg) if v is None else v
    where = []
    for i, (o, r, p) in enumerate(zip(out, ref, prompts)):
        if o == r:
            continue
        j = next((j for j, (a, b) in enumerate(zip(o, r)) if a != b), None)
        if j is None:
            pytest.fail(f"row {i}: {len(o)} tokens against the reference's {len(r)}")
        top2 = np.sort(next_logits(cfg, v, [p + r[:j]])[0])[-2:]
        where.append((i, j, float(top2[1] - top2[0])))
    msg = f"greedy outputs differ; (row, first differing token, reference's top-2 logit gap there): {where}"
    if len(out) == len(ref) and jax.default_backend() != "cpu" and all(g < NEAR_TIE for *_, g in where):
        pytest.xfail(f"near-ties only, on a backend that rounds by batch shape: {msg}")
    pytest.fail(msg)


@functools.lru_cache(maxsize=None)
def plain_greedy_20():
    return generate(CFG_A, variables(CFG_A), prompts_20(), max_new_tokens=64, max_len=MAX_LEN)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_check_same_greedy_fails_unless_a_near_tie(backend, monkeypatch):
    """The comparison itself: a token changed where the reference has a clear winner fails on any backend; one
    changed at the reference's nearest tie among the first ten rows fails on CPU and xfails elsewhere."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    full, _ = plain_greedy_20()
    prompts = prompts_20()
    tokens = np.zeros((10, MAX_LEN), np.int32)
    for i in range(10):
        tokens[i, :len(prompts[i]) + 64] = prompts[i] + full[i]
    logits = np.asarray(full_forward(CFG_A)(variables(CFG_A), jnp.asarray(tokens)).logits)
    gaps = []                                       # (gap, row, token) at every new token of rows 0..9
    for i in range(10):
        top2 = np.sort(logits[i, len(prompts[i]) - 1:len(prompts[i]) + 63], axis=-1)[:, -2:]
        gaps += [(float(g), i, j) for j, g in enumerate(top2[:, 1] - top2[:, 0])]
    assert min(gaps)[0] < NEAR_TIE < max(gaps)[0]
    for gap, i, j in (min(gaps), max(gaps)):
        changed = [list(o) for o in full[:10]]
        changed[i][j] = (changed[i][j] + 1) % VOCAB
        with pytest.raises(pytest.fail.Exception, match=rf"\({i}, {j}, ") as raised:
            check_same_greedy(changed, full[:10], prompts[:10])
        xfailed = gap < NEAR_TIE and backend != "cpu"     # XFailed subclasses Failed: check the type itself
        assert raised.type is (pytest.xfail.Exception if xfailed else pytest.fail.Exception)


def test_batched_prompts_match_each_alone():
    prompts = prompts_20()
    batched, _ = plain_greedy_20()
    for i in (0, 1, 2, 3):                                # lengths 1, 2, 13, 5
        alone, _ = generate(CFG_A, variables(CFG_A), [prompts[i]], max_new_tokens=64, max_len=MAX_LEN)
        check_same_greedy(alone, batched[i:i + 1], prompts[i:i + 1])


def test_speculative_greedy_equals_plain_greedy():
    plain, _ = plain_greedy_20()
    spec, stats = generate(CFG_A, variables(CFG_A), prompts_20(), max_new_tokens=64, speculative=True,
                           max_len=MAX_LEN)
    check_same_greedy(spec, plain, prompts_20())
    assert stats["drafts"] > 0 and 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["tokens_per_forward"] == pytest.approx(1.0 + stats["acceptance_rate"])


def test_speculative_greedy_equals_plain_greedy_batch_8():
    """Batch 8, where plain steps (8 tokens), verify steps (16) and MTP drafts (8) all choose most of the 8
    experts and so take capacity_local (dsv3_jax/model/dispatch.py): the same tokens as plain greedy."""
    prompts = prompts_20()[5:13]
    plain, _ = generate(CFG_A, variables(CFG_A), prompts, max_new_tokens=32, max_len=MAX_LEN)
    spec, stats = generate(CFG_A, variables(CFG_A), prompts, max_new_tokens=32, speculative=True, max_len=MAX_LEN)
    check_same_greedy(spec, plain, prompts)
    assert stats["drafts"] > 0


def agreeing_variables(cfg):
    """A model whose MTP draft agrees with the main model on half of the tokens.

    Embeddings are one-hot and every block's output is tiny (random init, std 0.006), so h^0_i ~ e_{t_i} and
    the main model predicts sigma(t_i) through lm_head = permutation sigma. The MTP module's eh_proj passes
    enorm(Emb(t_{i+1})) through a permutation Q (identity on even ids, odd pairs swapped) and drops h^0, so it
    drafts sigma(Q(t_{i+1})): right exactly when t_{i+1} is even."""
    v = jax.tree_util.tree_map(np.array, random_variables(cfg, seed=3))
    d = cfg.hidden_size
    assert d == cfg.vocab_size
    rng = np.random.default_rng(0)
    sigma = rng.permutation(d)
    p = v["params"]
    p["embedding"] = np.eye(d, dtype=np.float32)
    head = np.zeros((d, d), np.float32)
    head[np.arange(d), sigma] = 1.0                                 # logits[sigma(t)] = h[t]
    p["lm_head"] = head
    q = np.arange(d)
    odd = q[1::2]
    q[1::2] = np.stack([odd[1::2], odd[0::2]], 1).reshape(-1)       # swap 1<->3, 5<->7, ...
    eh = np.zeros((2 * d, d), np.float32)
    eh[np.arange(d), q] = 1.0                                       # embedding half: e_t -> e_{Q(t)}
    p["mtp_0"]["eh_proj"] = eh
    return jax.tree_util.tree_map(jnp.asarray, v)


@pytest.fixture(scope="module")
def agreeing_plain():
    """The agreeing model, its plain greedy output on the 20 prompts, and one-draft speculative stats."""
    v = agreeing_variables(CFG_A)
    plain, _ = generate(CFG_A, v, prompts_20(), max_new_tokens=64, max_len=MAX_LEN)
    spec, one = generate(CFG_A, v, prompts_20(), max_new_tokens=64, speculative=True, max_len=MAX_LEN)
    assert spec == plain
    return v, plain, one


def test_speculative_accepts_agreeing_drafts(agreeing_plain):
    _, _, stats = agreeing_plain                               # its greedy output equals plain greedy's
    assert 0.2 < stats["acceptance_rate"] < 0.9, stats       # both the accept and the reject paths run
    assert stats["tokens_per_forward"] > 1.2
    assert stats["main_forwards"] < 63                        # fewer main-model steps than plain decoding


def test_acceptance_per_prompt(agreeing_plain):
    """stats['acceptance_per_prompt'] (request.py's DraftCounts): in a batch of 20 each prompt's acceptance is
    what that prompt gives alone (greedy rows are independent), the same through the serving queue, and the
    prompts differ (the agreeing model drafts right only after an even token)."""
    v, _, one = agreeing_plain
    per = one["acceptance_per_prompt"]
    assert len(per) == 20 and len({round(a, 6) for a in per}) > 3, per
    for i in (0, 2, 3):                                        # lengths 1, 13, 5
        _, alone = generate(CFG_A, v, [prompts_20()[i]], max_new_tokens=64, speculative=True, max_len=MAX_LEN)
        assert alone["acceptance_per_prompt"] == [pytest.approx(alone["acceptance_rate"], abs=1e-12)]
        assert per[i] == pytest.approx(alone["acceptance_rate"], abs=1e-12), i
    _, queued = generate(CFG_A, v, prompts_20()[:10], max_new_tokens=64, speculative=True, max_len=MAX_LEN,
                         batch_size=8)
    assert queued["acceptance_per_prompt"] == pytest.approx(per[:10], abs=1e-12)


@pytest.mark.parametrize("drafts", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_chained_drafts_greedy_equals_plain_greedy(drafts, agreeing_plain):
    """K drafts per step (MTP module 1 chained on its own output, speculative.py) on the agreeing model, 20
    prompts in one batch (lengths 1 and 2 put the first draft pass's extra positions below 0): the same tokens
    as plain greedy, and more tokens per main forward than one draft gives (its drafts 2..K are right when
    draft 1 was and is even, so rows accept every count from 0 to K). The queue path gives them too."""
    v, plain, one = agreeing_plain
    spec, stats = generate(CFG_A, v, prompts_20(), max_new_tokens=64, speculative=True, drafts=drafts,
                           max_len=MAX_LEN)
    assert spec == plain
    assert stats["draft_tokens"] == drafts and stats["drafts"] > 0
    assert stats["tokens_per_forward"] > one["tokens_per_forward"] + 0.1, (stats, one)
    out, stats = generate(CFG_A, v, prompts_20()[:10], max_new_tokens=64, speculative=True, drafts=drafts,
                          max_len=MAX_LEN, batch_size=8)
    assert out == plain[:10] and stats["refills"] == 2 and stats["draft_tokens"] == drafts


def test_eos_stops_rows_inside_a_device_call():
    """Decoding runs CHUNK steps per device call; rows that emit eos part-way through a call stop there: the
    output is the eos-free greedy output cut after its first eos, for plain and speculative decoding, and
    the stream carries exactly the output tokens, in order."""
    from dsv3_jax.infer.decode import CHUNK
    prompts = prompts_20()[:4]
    full, _ = plain_greedy_20()
    full = full[:4]
    eos = full[0][CHUNK + 3]                                   # emitted in the middle of the second call
    expect = [o[:o.index(eos) + 1] if eos in o else o for o in full]
    assert any(len(e) < 64 for e in expect) and any(len(e) > len(expect[0]) for e in expect)
    for spec in (False, True):
        streamed = [[] for _ in prompts]

        def collect(new):
            for row, toks in zip(streamed, new):
                row.extend(toks)
        out, _ = generate(CFG_A, variables(CFG_A), prompts, max_new_tokens=64, eos_id=int(eos),
                          speculative=spec, stream_callback=collect, max_len=MAX_LEN)
        assert out == expect, f"speculative={spec}"
        assert streamed == expect, f"speculative={spec}"


def test_queue_speculative_equals_plain_greedy():
    """Speculative decoding on the queue path (generate(..., batch_size=8), dsv3_jax/infer/queue.py): 10
    prompts through 8 slots; rows accept different numbers of drafts, so slots free up at different steps and
    the last two prompts start beside running rows: each prompt's tokens are its plain greedy output alone.
    Those two are prefilled together, ahead of the rows that take them (two prefill calls in all), though
    their rows free at different steps."""
    full, _ = plain_greedy_20()
    out, stats = generate(CFG_A, variables(CFG_A), prompts_20()[:10], max_new_tokens=64, speculative=True,
                          max_len=MAX_LEN, batch_size=8)
    check_same_greedy(out, full[:10], prompts_20()[:10])
    assert stats["refills"] == 2 and stats["drafts"] > 0 and stats["prefill_calls"] == 2


@pytest.mark.slow
def test_queue_outputs_equal_each_prompt_alone():
    """The serving queue (generate(..., batch_size=8), dsv3_jax/infer/queue.py): 20 prompts through 8 slots,
    rows stopping at an eos at different steps (so slots are refilled in the middle of others' decoding),
    for plain and speculative decoding: each prompt's tokens and stream are exactly its plain greedy output
    alone (cut after its first eos), and 12 refills ran."""
    from dsv3_jax.infer.decode import CHUNK
    full, _ = plain_greedy_20()
    eos = full[0][CHUNK + 3]
    expect = [o[:o.index(eos) + 1] if eos in o else o for o in full]
    assert len({len(e) for e in expect}) > 3
    for spec in (False, True):
        streamed = [[] for _ in expect]

        def collect(new):
            assert len(new) == len(expect)
            for row, toks in zip(streamed, new):
                row.extend(toks)
        out, stats = generate(CFG_A, variables(CFG_A), prompts_20(), max_new_tokens=64, eos_id=int(eos),
                              speculative=spec, stream_callback=collect, max_len=MAX_LEN, batch_size=8)
        assert out == expect, f"speculative={spec}"
        assert streamed == expect, f"speculative={spec}"
        assert stats["refills"] == 12 and stats["new_tokens"] == sum(map(len, expect))
        assert stats["prefill_calls"] == 3                      # 8 + 8 + 4 prompts, each group staged at once
        assert stats["queue_s"] >= stats["prefill_s"] > 0


def test_queue_one_new_token_and_more_slots_than_prompts():
    """max_new_tokens=1: every request is done by its own prefill (the queue refills straight on); a
    batch_size above the number of prompts uses one slot per prompt."""
    full, _ = plain_greedy_20()
    out, stats = generate(CFG_A, variables(CFG_A), prompts_20()[:9], max_new_tokens=1, max_len=MAX_LEN, batch_size=8)
    assert out == [o[:1] for o in full[:9]] and stats["main_forwards"] == 0 and stats["refills"] == 1
    out, stats = generate(CFG_A, variables(CFG_A), prompts_20()[:8], max_new_tokens=5, max_len=MAX_LEN, batch_size=50)
    assert out == [o[:5] for o in full[:8]] and stats["batch_size"] == 8


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "8"])
def test_queue_bad_batch_size(batch_size):
    from dsv3_jax.errors import InputError
    with pytest.raises(InputError, match="batch_size must be an integer >= 1"):
        generate(CFG_A, variables(CFG_A), [[1, 2]], max_new_tokens=4, batch_size=batch_size)


# 5. Speculative sampling keeps the target distribution --------------------------------------------------------

def test_acceptance_rule_output_is_distributed_as_p():
    p = jnp.array([0.5, 0.2, 0.2, 0.1, 0.0])
    q = jnp.array([0.1, 0.1, 0.3, 0.3, 0.2])
    n = 200_000
    key_d, key_a = jax.random.split(jax.random.PRNGKey(0))
    draft = jax.random.categorical(key_d, jnp.log(q), shape=(n,)).astype(jnp.int32)
    accepted, tok = jax.jit(accept_or_resample)(jnp.broadcast_to(p, (n, 5)), jnp.broadcast_to(q, (n, 5)), draft,
                                                key_a)
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    np.testing.assert_allclose(freq, p, atol=0.005)
    # Acceptance probability sum_x min(p, q) = 0.1 + 0.1 + 0.2 + 0.1 + 0 = 0.5.
    assert abs(float(accepted.mean()) - 0.5) < 0.005


def test_chained_acceptance_rule_emits_each_token_as_its_p():
    """accept_drafts with two drafts, on fixed distributions (a target that ignores the prefix, so the emitted
    tokens should be independent draws): the first emitted token is distributed as p0, the second (emitted
    once draft 1 is accepted) as p1, the third (after both) as p2; draft j is accepted with probability
    sum_x min(p_{j-1}, q_j). 200000 rows: the frequencies' standard error is under 0.0012, so 0.006 is 5 of them."""
    p = jnp.array([[0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.4, 0.1, 0.1, 0.3], [0.3, 0.3, 0.2, 0.1, 0.1]])
    q = jnp.array([[0.1, 0.1, 0.3, 0.3, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]])
    n = 200_000
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    drafts = jnp.stack([jax.random.categorical(keys[j], jnp.log(q[j]), shape=(n,)) for j in range(2)], 1)
    got_n, tok = jax.jit(accept_drafts)(jnp.broadcast_to(p, (n, 3, 5)), jnp.broadcast_to(q, (n, 2, 5)),
                                        drafts.astype(jnp.int32), keys[2:])
    got_n, tok, drafts = np.asarray(got_n), np.asarray(tok), np.asarray(drafts)
    emitted = [np.where(got_n >= 1, drafts[:, 0], tok), np.where(got_n >= 2, drafts[:, 1], tok), tok]
    for j in range(3):
        rows = got_n >= j
        np.testing.assert_allclose(np.bincount(emitted[j][rows], minlength=5) / rows.sum(), p[j], atol=0.006)
    assert abs((got_n >= 1).mean() - 0.5) < 0.006                          # sum min(p0, q1) = 0.5
    assert abs((got_n >= 2).sum() / (got_n >= 1).sum() - 0.7) < 0.006     # sum min(p1, q2) = 0.7


@pytest.mark.parametrize("drafts", [1, 2])
def test_speculative_sampling_matches_model_distribution(drafts):
    """End to end: the first two sampled tokens (the second one drafted by MTP and accepted or resampled)
    follow the main model's distribution, with one draft per step and with two (the chained one's draw and
    acceptance feed the step too; a third token's marginal is the rule's, tested above). 2000 samples in
    batches of 20 (the compiled batch-20 steps are shared with the greedy tests: temperature is a traced
    argument)."""
    cfg = CFG_A
    v = jax.tree_util.tree_map(np.array, random_variables(cfg, seed=5))
    v["params"]["lm_head"] = v["params"]["lm_head"] * 40.0      # peaked distributions that differ between p, q
    v = jax.tree_util.tree_map(jnp.asarray, v)
    prompt = [11, 5, 40, 2]
    firsts, seconds, acc = [], [], []
    for seed in range(100):
        out, stats = generate(cfg, v, [prompt] * 20, max_new_tokens=2, temperature=1.0, seed=seed,
                              speculative=True, drafts=drafts, max_len=MAX_LEN)
        firsts += [o[0] for o in out]
        seconds += [o[1] for o in out]
        acc.append(stats["acceptance_rate"])
    n = len(seconds)
    # Exact marginals: p(x | prompt) and sum_x p(x | prompt) p(y | prompt + x) (full forwards, causal padding).
    fwd = full_forward(cfg)
    buf = np.zeros((1, 7 + 64), np.int32)
    buf[0, :4] = prompt
    p1 = []
    for x in range(VOCAB):
        buf[0, 4] = x
        logits = fwd(v, jnp.asarray(buf)).logits[0]
        p1.append(np.asarray(jax.nn.softmax(logits[4])))
    p0 = np.asarray(jax.nn.softmax(logits[3]))
    marginal = p0 @ np.stack(p1)
    rate = float(np.mean(acc))
    assert 0.05 < rate < 0.95, rate                              # both branches of the rule are exercised
    tv_first = 0.5 * np.abs(np.bincount(firsts, minlength=VOCAB) / n - p0).sum()
    tv_second = 0.5 * np.abs(np.bincount(seconds, minlength=VOCAB) / n - marginal).sum()
    assert tv_first < 0.07 and tv_second < 0.07, (tv_first, tv_second)


# 6. Bad inputs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "non-empty list"),
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, VOCAB]], {}, "outside the vocabulary"),
    ([[-1]], {}, "outside the vocabulary"),
    ([[1, 2.5]], {}, "not an integer"),
    ("hello", {}, "non-empty list"),
    ([[1] * 250], {"max_new_tokens": 10}, "max_position_embeddings"),
    ([[1] * 10], {"max_new_tokens": 10, "max_len": 16}, "cache"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"temperature": -1.0}, "temperature"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"eos_id": VOCAB}, "eos_id"),
    ([[1]], {"shrink_batch": 1}, "shrink_batch must be None, True or False"),
])
def test_bad_inputs_raise_clear_errors(prompts, kw, match):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=match):
        generate(CFG_A, variables(CFG_A), prompts, **kw)


@pytest.mark.parametrize("drafts", [0, 4, True, 1.5])
def test_bad_drafts_raise_clear_errors(drafts):
    from dsv3_jax.errors import InputError
    with pytest.raises(InputError, match="drafts must be an integer from 1 to 3"):
        generate(CFG_A, variables(CFG_A), [[1, 2]], max_new_tokens=4, speculative=True, drafts=drafts)


def test_speculative_needs_mtp():
    cfg = CFG_A.replace(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="MTP"):
        generate(cfg, {"params": {}}, [[1]], 4, speculative=True)


# 7. Cache sizes, read from the allocated arrays ----------------------------------------------------------------

def test_cache_bytes_per_token_per_layer():
    cache = init_cache(CFG_A, 2, 48)                                # real arrays, fp32
    assert cache.dense.c_kv.shape == (1, 2, 48, CFG_A.kv_lora_rank)
    assert cache.moe.k_pe.shape == (2, 2, 48, CFG_A.qk_rope_head_dim)
    assert len(cache.mtp) == 1 and cache.mtp[0].c_kv.shape == (1, 2, 48, CFG_A.kv_lora_rank)
    assert bytes_per_token_per_layer(cache) == (CFG_A.kv_lora_rank + CFG_A.qk_rope_head_dim) * 4
    assert cache_bytes(cache) == 3 * 2 * 48 * (64 + 16) * 4
    v3 = PRESETS["v3-671b"]
    shapes = jax.eval_shape(lambda: init_cache(v3, 1, 4096, jnp.bfloat16, mtp=False))   # nothing allocated
    assert bytes_per_token_per_layer(shapes) == 1152
    assert round(65536 / bytes_per_token_per_layer(shapes), 1) == 56.9


# 8. The compiled decode step never copies a whole stacked cache ------------------------------------------------

def test_decode_step_writes_the_cache_in_place():
    """The stacked latent cache rides the layer scan and each layer scatters into it before attending
    (MLA.attend_in_place): the compiled step (from shapes, nothing run) has no copy of a whole stack's cache.
    Reading the cache as a scanned input and writing the latents after the scan made XLA copy every stack
    twice per step."""
    import re
    params, rs = split_variables(jax.eval_shape(lambda: Transformer(CFG_A).init(jax.random.PRNGKey(0),
                                                                                jnp.zeros((1, 1), jnp.int32))))
    cache = jax.eval_shape(lambda: init_cache(CFG_A, 2, MAX_LEN, mtp=False))
    i32 = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    hlo = jit_decode_step(CFG_A, True).lower(params, rs, cache, i32, i32).compile().as_text()
    stacked = {f"f32[{','.join(map(str, a.shape))}]" for layers in cache.main_layers() for a in (layers.c_kv, layers.k_pe)}
    copies = [line.strip() for line in hlo.splitlines()
              if re.search(r"=\s*(f32\[[0-9,]+\])\S*\s+copy\(", line)
              and re.search(r"=\s*(f32\[[0-9,]+\])", line).group(1) in stacked]
    assert not copies, copies[:4]
    assert any("scatter" in line for line in hlo.splitlines())        # the writes are in the program


# 5. Shrinking the batch to the rows still decoding ----------------------------------------------------------

@pytest.mark.slow
def test_shrunk_batch_gives_the_same_tokens(agreeing_plain):
    """shrink_batch=True (request.py's BatchShrinker): rows accept different numbers of drafts, so they finish
    at different steps; once at most half of the batch still decodes it shrinks to those rows (padded to a power
    of two), and again: the tokens are still plain greedy's. shrink_batch=False keeps the batch."""
    v, plain, _ = agreeing_plain
    spec, stats = generate(CFG_A, v, prompts_20(), max_new_tokens=64, speculative=True, max_len=MAX_LEN,
                           shrink_batch=True)
    assert spec == plain
    sizes = stats["batch_sizes"]
    assert sizes[0] == 20 and len(sizes) >= 3, sizes
    assert all(b <= a // 2 and b & (b - 1) == 0 for a, b in zip(sizes, sizes[1:])), sizes
    _, kept = generate(CFG_A, v, prompts_20()[:4], max_new_tokens=64, speculative=True, max_len=MAX_LEN,
                       shrink_batch=False)
    assert kept["batch_sizes"] == [4]


@pytest.mark.slow
def test_shrunk_batch_plain_rows_stopped_at_eos():
    """Plain decoding shrinks when most rows stop at eos: the output is the eos-free output cut after each
    row's first eos, streamed in order, with the batch shrunk."""
    plain, _ = plain_greedy_20()
    eos = max(range(VOCAB), key=lambda t: sum(t in o[:40] for o in plain))   # in 17 of the 20 rows
    expect = [o[:o.index(eos) + 1] if eos in o else o for o in plain]
    assert sum(len(e) <= 40 for e in expect) > 10
    streamed = [[] for _ in expect]

    def collect(new):
        for row, toks in zip(streamed, new):
            row.extend(toks)
    out, stats = generate(CFG_A, variables(CFG_A), prompts_20(), max_new_tokens=64, max_len=MAX_LEN,
                          eos_id=int(eos), stream_callback=collect, shrink_batch=True)
    assert out == expect and streamed == expect
    assert len(stats["batch_sizes"]) >= 2, stats["batch_sizes"]


def test_batch_shrinker_policy():
    """BatchShrinker without a model: it shrinks only once at most half the rows are live, to the next power of
    two, padding with inactive copies of a live row (cache rows on axis 1, state rows on axis 0); by default
    (None) only to a size whose program already ran; never when the policy is False."""
    from dsv3_jax.infer.request import BatchShrinker, Collector
    cache = {"c": jnp.arange(8)[None, :, None, None] * jnp.ones((2, 8, 5, 3))}      # [L, B, S, C]
    state = jnp.arange(8) * 10

    def col_with(done):
        col = Collector(8, 4, None, None)
        col.done[list(done)] = True
        return col
    step = object()
    for policy, ran, expect in [(True, (), [8, 4]), (None, (), [8]), (None, (4,), [8, 4]), (False, (4,), [8])]:
        shrink = BatchShrinker(step, cache, policy)
        for b in ran:
            shrink.ran(b)
        col = col_with([0, 2, 3, 5, 7])                         # rows 1, 4, 6 live: 3 of 8
        c, s = shrink(col, cache, state)
        assert shrink.sizes == expect, (policy, ran)
        if expect == [8, 4]:
            assert list(col.rows) == [1, 4, 6, -1] and list(col.live_rows) == [True, True, True, False]
            assert list(s) == [10, 40, 60, 10] and list(c["c"][0, :, 0, 0]) == [1, 4, 6, 1]
            col.add_rows([[1], [2], [3], [9]])                  # the padding row's token goes nowhere
            assert [o for o in col.out] == [[], [1], [], [], [2], [], [3], []]
        BatchShrinker._ran.discard((step, 4, 5))
    shrink = BatchShrinker(step, cache, True)
    c, s = shrink(col_with([0, 1, 2]), cache, state)              # 5 of 8 live: more than half
    assert shrink.sizes == [8] and s is state
