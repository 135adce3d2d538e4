"""The guard against running out of memory mappings (dsv3_jax/code_maps.py): it clears JAX's compiled
programs past its fraction of vm.max_map_count and not below it, stops when clearing does not help, and
`generate` runs it; on Linux with XLA:CPU, compiling a decode configuration really does take mappings that
the clear gives back (the guard's premise)."""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax import code_maps
from dsv3_jax.config import PRESETS
from dsv3_jax.infer import generate
from dsv3_jax.infer.request import BatchShrinker
from dsv3_jax.testing import random_variables

CFG = PRESETS["tiny"].replace(hidden_size=64, vocab_size=64, num_hidden_layers=2, first_k_dense_replace=1,
                              intermediate_size=128, moe_intermediate_size=32, max_position_embeddings=128,
                              num_nextn_predict_layers=1)
LINUX_CPU = sys.platform.startswith("linux") and jax.default_backend() == "cpu"


@pytest.fixture
def counts(monkeypatch):
    """Patch the guard's readings: set(used, after, limit) makes maps_in_use return `used` then `after`."""
    monkeypatch.setattr(code_maps, "_futile", False)

    def set_counts(used, after, limit):
        readings = iter([used, after])
        monkeypatch.setattr(code_maps, "maps_in_use", lambda: next(readings))
        monkeypatch.setattr(code_maps, "map_limit", lambda: limit)
    return set_counts


def compiled_function():
    f = jax.jit(lambda x: jnp.tanh(x) * 3)
    f(jnp.ones(3)).block_until_ready()
    assert f._cache_size() == 1
    return f


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_readings_are_the_process_maps_and_the_limit():
    lines = sum(1 for _ in open("/proc/self/maps"))
    assert abs(code_maps.maps_in_use() - lines) < 50          # other threads may map between the two reads
    assert code_maps.map_limit() == int(open("/proc/sys/vm/max_map_count").read())


def test_clears_past_the_fraction_and_warns(counts):
    f = compiled_function()
    counts(used=1000, after=100, limit=1200)                 # 1000 > 0.75 * 1200
    with pytest.warns(RuntimeWarning, match=r"held 1000 memory mappings of the 1200.*\(100 mappings now\).*"
                                            r"vm.max_map_count=4800"):
        assert code_maps.ensure_map_headroom()
    assert f._cache_size() == 0                               # the compiled program is gone
    assert not code_maps._futile


def test_below_the_fraction_or_unknown_it_does_nothing(counts, monkeypatch):
    f = compiled_function()
    for used, limit in ((900, 1200), (None, 1200), (1000, None)):
        counts(used=used, after=0, limit=limit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not code_maps.ensure_map_headroom()
        assert f._cache_size() == 1


def test_stops_clearing_when_the_mappings_are_not_programs(counts):
    counts(used=1000, after=950, limit=1200)                 # the clear freed 5%
    with pytest.warns(RuntimeWarning, match="freed only 50: something else holds them"):
        assert code_maps.ensure_map_headroom()
    f = compiled_function()
    counts(used=1000, after=100, limit=1200)
    assert not code_maps.ensure_map_headroom()               # no recompiling at every call from now on
    assert f._cache_size() == 1


def test_generate_runs_the_guard(counts, monkeypatch):
    v = random_variables(CFG, 0)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    ref, _ = generate(CFG, v, prompts, 12)
    cleared = []
    monkeypatch.setattr(jax, "clear_caches", lambda: cleared.append(1))     # the clear itself is tested above
    BatchShrinker._ran.add(("a step program", 1, 16))
    counts(used=1000, after=100, limit=1200)
    with pytest.warns(RuntimeWarning, match="compiled programs were dropped"):
        out, _ = generate(CFG, v, prompts, 12)
    assert cleared == [1] and out == ref
    assert ("a step program", 1, 16) not in BatchShrinker._ran     # shrinking no longer counts on it


@pytest.mark.slow
@pytest.mark.skipif(not LINUX_CPU, reason="the premise is XLA:CPU's JIT linking on Linux")
def test_a_decode_configuration_takes_mappings_that_the_clear_gives_back():
    """Premise: a new decode shape maps hundreds of kernel sections, and jax.clear_caches unmaps them. If an
    XLA release stops mapping per kernel, this fails and the guard's thresholds want a new look."""
    v = random_variables(CFG, 0)
    generate(CFG, v, [[1, 2, 3]], 4)                          # the model's first compilations out of the way
    before = code_maps.maps_in_use()
    generate(CFG, v, [[1, 2, 3]] * 3, 20)                     # a new batch size and cache length
    grown = code_maps.maps_in_use()
    jax.clear_caches()
    after = code_maps.maps_in_use()
    assert grown - before > 100, (before, grown)
    assert grown - after > 0.8 * (grown - before), (before, grown, after)
