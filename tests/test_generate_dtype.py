"""`generate --dtype bfloat16`: weights, compute and latent cache in bf16 with the router kept in fp32, from a
run's variables (`with_dtype`) and straight from an HF checkpoint (`load_hf`), in process and through the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsv3_jax.errors import InputError
from dsv3_jax.infer.cli import load_hf, with_dtype
from dsv3_jax.model import Transformer

from hf_utils import TINY, cli  # noqa: E402


def _dtypes(variables) -> dict:
    return {k: jnp.dtype(v.dtype) for k, v in traverse_util.flatten_dict(variables).items()}


def _assert_bf16_but_router(variables):
    dtypes = _dtypes(variables)
    routers = {k for k in dtypes if k[-1] in ("router", "router_bias")}
    assert routers, "the tiny model has routed layers, so router leaves must exist"
    assert {dtypes[k] for k in routers} == {jnp.dtype(jnp.float32)}
    assert {d for k, d in dtypes.items() if k not in routers} == {jnp.dtype(jnp.bfloat16)}


def _logits(cfg, variables, tokens):
    fn = jax.jit(lambda v, t: Transformer(cfg).apply(v, t).logits)
    return np.asarray(fn(variables, jnp.asarray(tokens)), np.float32)


def test_with_dtype_casts_all_but_the_router(random_variables):
    v32 = jax.tree.map(jnp.asarray, random_variables(TINY))
    cfg, v16 = with_dtype(TINY, v32, "bfloat16")
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
    _assert_bf16_but_router(v16)
    assert with_dtype(TINY, v32, None) == (TINY, v32)                       # None leaves the run as it is
    with pytest.raises(InputError, match="--dtype 'float16'"):
        with_dtype(TINY, v32, "float16")
    # bf16 keeps 8 bits of mantissa (relative rounding 2**-9 per value); through two layers the logits move by
    # a few 1e-3 of their scale. 5e-2 of the scale catches a wrong cast (e.g. a router in bf16 flipping expert
    # choices, or an unscaled cast) while leaving room for bf16 rounding.
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 12))
    want, got = _logits(TINY, v32, tokens), _logits(cfg, v16, tokens)
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()


def test_load_hf_reads_straight_into_bf16(hf_dir):
    cfg32, v32, _ = load_hf(hf_dir)
    assert set(_dtypes(v32).values()) == {jnp.dtype(jnp.float32)}           # the default is unchanged
    cfg16, v16, _ = load_hf(hf_dir, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16"
    _assert_bf16_but_router(v16)
    for (k, a), b in zip(traverse_util.flatten_dict(v32).items(), traverse_util.flatten_dict(v16).values()):
        np.testing.assert_array_equal(np.asarray(a.astype(b.dtype)), np.asarray(b), err_msg=str(k))


@pytest.mark.slow
def test_generate_cli_in_bf16(hf_dir):
    """The user's path: `python -m dsv3_jax generate --hf-dir D --dtype bfloat16` prints text and reports the
    dtype; an unknown dtype is refused by the parser (exit 2)."""
    r = cli("generate", "--hf-dir", hf_dir, "--prompt", "Hello", "--max-new-tokens", 6, "--dtype", "bfloat16",
            devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert stats["dtype"] == "bfloat16" and stats["new_tokens"] == 6
    assert len(r.stdout.strip()) > 0
    bad = cli("generate", "--hf-dir", hf_dir, "--prompt", "Hello", "--dtype", "float16", devices=1)
    assert bad.returncode == 2 and "--dtype" in bad.stderr
