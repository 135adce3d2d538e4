"""Decode attention over a window of the cache (`MLA.attend_in_place`, `decode_windows`): a step reads only
the first W slots, W the smallest static window covering the step's largest position + 1, and must give the
outputs of attending over the whole cache.

The whole-cache form is the same code with one window (`mla.DECODE_WINDOW_MIN` above the cache size), so each
test compares the two through freshly jitted steps (the window sizes are read when a step is traced).
Tolerance 1e-6 on logits of size ~0.1-1: the slots a window leaves out are masked for every row, so their
softmax weights are exactly zero and only the summation order over the kept slots may differ (the runs here
agree bit for bit); a missing slot shifts the logits by ~1e-4 or more (test_window_one_slot_short_fails).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import PRESETS
from dsv3_jax.infer import generate, init_cache, split_variables
from dsv3_jax.infer.decode import decode_step, mtp_forward, prefill
from dsv3_jax.model import mla
from dsv3_jax.testing import random_variables

VOCAB = 64
CFG = PRESETS["tiny"].replace(hidden_size=64, vocab_size=VOCAB, num_hidden_layers=3, first_k_dense_replace=1,
                              intermediate_size=128, moe_intermediate_size=32, max_position_embeddings=1024,
                              num_nextn_predict_layers=1, moe_impl="dense")
MAX_LEN = 512            # windows 64, 128, 256, 512
PROMPT_PAD = 320
WINDOW_MIN = mla.DECODE_WINDOW_MIN      # the shipped smallest window
WHOLE = 1 << 30                         # a DECODE_WINDOW_MIN that leaves one window: the whole cache
TOL = 1e-6


@functools.lru_cache(maxsize=None)
def weights():
    return split_variables(random_variables(CFG, 0))


jitted_prefill = jax.jit(lambda w, c, t, n: prefill(CFG, *w, c, t, n, mtp=True))


@functools.lru_cache(maxsize=None)
def prefilled(lengths: tuple):
    """The cache after a prefill of random prompts of `lengths` (rows of different lengths, right-padded)."""
    toks = np.random.default_rng(1).integers(0, VOCAB, size=(len(lengths), PROMPT_PAD)).astype(np.int32)
    return jitted_prefill(weights(), init_cache(CFG, len(lengths), MAX_LEN), toks, np.array(lengths, np.int32))


@functools.lru_cache(maxsize=None)
def jitted_step(window_min: int, t: int):
    """A decode step jitted for one window minimum (the sizes are read when it is traced: first call)."""
    del window_min, t                                   # the cache keys
    return jax.jit(lambda w, c, x, p: decode_step(CFG, *w, c, x, p)[0])


@functools.lru_cache(maxsize=None)
def jitted_draft(window_min: int):
    """The speculative draft's MTP pass (outputs for the last position only), jitted per window minimum."""
    del window_min
    return jax.jit(lambda w, c, h, x, p: mtp_forward(CFG, *w, c, h, x, p, key_valid=p >= 0, outputs_from=1)[0])


def step_logits(lengths, t: int, window_min: int, monkeypatch, step=None) -> np.ndarray:
    """Logits of a T=t decode step at positions lengths[b] + 0..t-1, traced with the given window minimum."""
    monkeypatch.setattr(mla, "DECODE_WINDOW_MIN", window_min)
    pos = (np.array(lengths)[:, None] + np.arange(t)[None]).astype(np.int32)
    toks = np.random.default_rng(2).integers(0, VOCAB, size=pos.shape).astype(np.int32)
    step = step or jitted_step(window_min, t)
    return np.asarray(step(weights(), prefilled(tuple(lengths)).cache, toks, pos))


# Largest context 10 / 100 / 200 / 300 (windows 64 / 128 / 256 / 512), each batch with a 3-token row.
CONTEXTS = [(3, 10, 7, 1), (3, 100, 40, 64), (200, 3, 130, 70), (3, 300, 255, 128)]


@pytest.mark.parametrize("t", [1, 2], ids=["plain", "verify"])
@pytest.mark.parametrize("lengths", CONTEXTS, ids=[f"ctx{max(c)}" for c in CONTEXTS])
def test_window_equals_whole_cache(lengths, t, monkeypatch):
    windowed = step_logits(lengths, t, WINDOW_MIN, monkeypatch)
    whole = step_logits(lengths, t, WHOLE, monkeypatch)
    assert np.abs(whole).max() > 1e-2                                   # not trivially zero
    np.testing.assert_allclose(windowed, whole, atol=TOL, rtol=0)


def test_window_one_slot_short_fails(monkeypatch):
    """The check can fail: a window end one slot short (so a step at position 128 picks the 128-slot window
    and misses its own new key in slot 128) changes the logits well beyond the tolerance."""
    lengths = (3, 128, 40, 64)
    whole = step_logits(lengths, 1, WHOLE, monkeypatch)
    end = mla.window_end
    monkeypatch.setattr(mla, "window_end", lambda positions, max_len: end(positions, max_len) - 1)
    fresh = jax.jit(lambda w, c, x, p: decode_step(CFG, *w, c, x, p)[0])     # traced with the short end
    short = step_logits(lengths, 1, WINDOW_MIN, monkeypatch, fresh)
    assert np.abs(short - whole)[1].max() > 100 * TOL
    np.testing.assert_allclose(short[[0, 2, 3]], whole[[0, 2, 3]], atol=TOL, rtol=0)   # other rows unaffected


@pytest.mark.parametrize("lengths", CONTEXTS[1:3], ids=["ctx100", "ctx200"])
def test_mtp_draft_window_equals_whole_cache(lengths, monkeypatch):
    """The speculative draft's MTP pass (two positions, outputs for the last one only: outputs_from=1)."""
    n = np.array(lengths, np.int32)
    pos = np.stack([n - 2, n - 1], 1).astype(np.int32)
    rng = np.random.default_rng(3)
    h = rng.standard_normal((len(n), 2, CFG.hidden_size)).astype(np.float32)
    nxt = rng.integers(0, VOCAB, size=pos.shape).astype(np.int32)
    out = {}
    for window_min in (WINDOW_MIN, WHOLE):
        monkeypatch.setattr(mla, "DECODE_WINDOW_MIN", window_min)
        out[window_min] = np.asarray(jitted_draft(window_min)(weights(), prefilled(tuple(lengths)).cache, h,
                                                              nxt, pos))
    assert out[WHOLE].shape[1] == 1
    np.testing.assert_allclose(out[WINDOW_MIN], out[WHOLE], atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_generate_large_max_len_same_tokens(speculative):
    """Greedy generate in a cache far larger than the context (windows 64..1024 of 1024 slots) gives the
    tokens of a cache just large enough."""
    v = random_variables(CFG, 0)
    rng = np.random.default_rng(4)
    prompts = [list(map(int, rng.integers(0, VOCAB, size=k))) for k in (5, 60, 17)]
    small, _ = generate(CFG, v, prompts, 40, speculative=speculative)
    large, _ = generate(CFG, v, prompts, 40, speculative=speculative, max_len=1000)
    assert large == small
