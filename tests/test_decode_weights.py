"""Decoding from per-layer weights (`decode_params`): the same logits and tokens as the stacked params, no
per-step copy of a layer's weights in the compiled step, and params of another model rejected clearly.

The model is test_infer.py's (hidden 64, 1 dense + 2 MoE layers, MTP depth 1) with its cache size, so the
jitted steps compile as few shapes as possible.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.errors import InputError
from dsv3_jax.infer import decode_params, init_cache, split_variables
from dsv3_jax.infer.decode import CHUNK, Sampling, jit_decode_step, jit_decode_steps, jit_prefill
from dsv3_jax.infer.generate import plain_generate
from dsv3_jax.infer.request import GenerationRequest
from dsv3_jax.infer.speculative import speculative_generate
from dsv3_jax.model import Transformer
from test_infer import CFG_A, MAX_LEN, VOCAB, plain_greedy_20, prompts_20, variables

# Per-layer weights change only how XLA groups the same fp32 sums (the layers unrolled instead of scanned):
# differences are rounding, ~1e-7 on logits of order 1; 1e-5 is far below any change that would flip a
# greedy token yet far above fp32 rounding.
ATOL = 1e-5


def test_decode_params_layout_and_idempotence():
    params, _ = split_variables(variables(CFG_A))
    dp = decode_params(CFG_A, params)
    assert set(dp["moe_layers"]) == {"layer_0", "layer_1"} and set(dp["dense_layers"]) == {"layer_0"}
    stacked = params["moe_layers"]["layers"]["attn"]["o_proj"]
    np.testing.assert_array_equal(dp["moe_layers"]["layer_1"]["attn"]["o_proj"], stacked[1])
    assert dp["embedding"] is params["embedding"] and dp["mtp_0"] is params["mtp_0"]     # shared, not copied
    again = decode_params(CFG_A, dp)
    assert again["moe_layers"] is dp["moe_layers"]
    assert decode_params(CFG_A, params, max_bytes=0) is params        # too big to copy: left stacked


def test_generate_splits_only_where_it_pays():
    """`generate`'s policy (rows=): one row, or stacks under min_bytes, stay stacked (they decode as fast or
    faster from the stack); a batch of a big enough model is split."""
    params, _ = split_variables(variables(CFG_A))
    assert decode_params(CFG_A, params, rows=8) is params                 # test model: far under 64 MiB
    assert decode_params(CFG_A, params, rows=1, min_bytes=0) is params    # one row
    assert "layer_0" in decode_params(CFG_A, params, rows=2, min_bytes=0)["moe_layers"]


def test_per_layer_prefill_and_steps_equal_stacked():
    """The jitted prefill (with the MTP cache) and four decode steps, on rows of different lengths, with
    test_infer.py's shapes (its stacked programs are compiled once for both files): logits and every cache
    entry within ATOL of the stacked path's."""
    params, rs = split_variables(variables(CFG_A))
    rng = np.random.default_rng(0)
    n = jnp.array([5, 9], jnp.int32)
    tokens = jnp.asarray(np.where(np.arange(16)[None] < np.asarray(n)[:, None],
                                  rng.integers(0, VOCAB, size=(2, 16)), 0), jnp.int32)
    outs = {}
    for name, p in (("stacked", params), ("per_layer", decode_params(CFG_A, params))):
        _, out = jit_prefill(CFG_A, True)(p, rs, init_cache(CFG_A, 2, 32), tokens, n, jax.random.PRNGKey(0))
        logits, cache, tok, pos = [out.logits], out.cache, jnp.argmax(out.logits, -1)[:, None], n[:, None]
        for _ in range(4):
            step_logits, _, cache = jit_decode_step(CFG_A, True)(p, rs, cache, tok.astype(jnp.int32), pos)
            logits.append(step_logits[:, 0])
            tok, pos = jnp.argmax(step_logits[:, 0], -1)[:, None], pos + 1
        outs[name] = (logits, cache)
    for a, b in zip(outs["stacked"][0], outs["per_layer"][0]):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)
        assert (np.argmax(a, -1) == np.argmax(b, -1)).all()
    for a, b in zip(jax.tree.leaves(outs["stacked"][1]), jax.tree.leaves(outs["per_layer"][1])):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("speculative", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_generate_tokens_equal_stacked(speculative):
    """Plain and speculative decoding from per-layer params (what `generate` runs for a batch of a big model)
    give the stacked path's greedy tokens (test_infer.py's `generate` of the test model, which stays stacked)
    on 20 prompts of different lengths. (Speculative: slow; the step-level test above covers both layouts.)"""
    params, rs = split_variables(variables(CFG_A))
    req = GenerationRequest(prompts_20(), 64, max_len=MAX_LEN)
    run = speculative_generate if speculative else plain_generate
    assert run(CFG_A, decode_params(CFG_A, params), rs, req)[0] == plain_greedy_20()[0]


def test_per_layer_step_copies_no_weights():
    """The compiled decode steps (from shapes, nothing run): with stacked params the rolled layer loop slices
    each layer's weights out of the stacks (the check can fail); with per-layer params no op yields one
    layer of a stacked weight."""
    shapes = jax.eval_shape(lambda: Transformer(CFG_A).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    params, rs = split_variables(shapes)
    layer_shapes = {",".join(map(str, x.shape[1:])) for x in jax.tree.leaves(params["moe_layers"]) if x.ndim >= 3}
    cache = jax.eval_shape(lambda: init_cache(CFG_A, 2, MAX_LEN, mtp=False))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    sampling = Sampling(jax.eval_shape(lambda: jax.random.PRNGKey(0)), f32, f32)

    def weight_slices(p):
        hlo = jit_decode_steps(CFG_A, True, CHUNK).lower(p, rs, cache, i32(2), i32(2), jax.ShapeDtypeStruct(
            (2,), bool), sampling, i32(), i32()).compile().as_text()
        found = []
        for line in hlo.splitlines():
            m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[(?:1,)?([0-9,]*)\]", line)
            if m and "slice" in line.split("=", 1)[1].split("(", 1)[0] + m.group(1) and m.group(2) in layer_shapes:
                found.append(line.strip()[:120])
        return found

    assert weight_slices(params)
    assert not weight_slices(jax.eval_shape(lambda p: decode_params(CFG_A, p), params))


def test_params_of_another_model_are_rejected():
    params, _ = split_variables(variables(CFG_A))
    deeper = CFG_A.replace(num_hidden_layers=4)                            # 3 MoE layers, the params hold 2
    with pytest.raises(InputError, match=r"params\['moe_layers'\] hold \[2\] layers, the config 3"):
        decode_params(deeper, params)
    with pytest.raises(InputError, match=r"params\['moe_layers'\] hold \[2\] layers, the config 3"):
        decode_params(deeper, decode_params(CFG_A, params))                  # per-layer params too
    all_moe = CFG_A.replace(first_k_dense_replace=0)
    with pytest.raises(InputError, match="'dense_layers' but the config has no such layers"):
        decode_params(all_moe, params)
