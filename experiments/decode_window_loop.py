"""The alternative to the static windows that shipped (experiments/decode_window.py): flash-decoding's loop,
a `lax.fori_loop` with a run-time trip count over blocks of BLOCK cache slots below the step's window end,
each block's scores folded into an online softmax (running max, sum and output). Not in the package: this
script swaps it in for `MLA.attend_in_place` while it traces, so the three forms (whole cache, the shipped
windows, the loop) are timed alternating in one process, decode steps of random-weight presets as in
decode_window.py's part 1 (the machine is shared: only the ratios mean anything).

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python experiments/decode_window_loop.py
Writes experiments/results/decode_window_loop.{md,json}.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dsv3_jax.infer import split_variables
from dsv3_jax.infer.decode import round_up
from dsv3_jax.model import mla
from dsv3_jax.model.layers import dtype_of
from dsv3_jax.testing import random_variables
from decode_window import RESULTS, WHOLE, preset_cfg, table, time_step          # experiments/
from results_io import write_results

BLOCK = 64
SHIPPED = mla.MLA.attend_in_place
WINDOW_MIN = mla.DECODE_WINDOW_MIN
# (preset, batch, max_len, context): short contexts in big caches, the benchmark's 208-slot cache, a full cache.
CASES = [("tiny", 1, 1024, 100), ("tiny", 8, 1024, 100), ("tiny", 8, 4096, 100), ("tiny", 8, 208, 150),
         ("small", 1, round_up(4097, 16), 4096)]


def loop_attend(self, q_nope, q_pe, c_kv, k_pe, positions, kv_mask, cache):
    """`MLA.attend_in_place` (absorbed form only) with the attention as a `fori_loop` over the blocks of BLOCK
    slots below `window_end`, each read straight from the stacked cache, under an online softmax."""
    b, s = positions.shape[0], cache.c_kv.shape[2]
    c_all, k_all, slots, valid = mla.write_in_place(c_kv, k_pe, positions, kv_mask, cache)
    q = cache.outputs_from
    c = self.cfg
    dt = dtype_of(c.dtype)
    nope = c.qk_nope_head_dim
    kv_b = self.kv_b_proj.astype(dt)
    w_uk, w_uv = kv_b[..., :nope], kv_b[..., nope:]
    qn, qp = q_nope[:, q:], q_pe[:, q:]
    q_abs = jnp.einsum("BTHK,CHK->BTHC", qn.astype(dt), w_uk)                     # [B,T,H,C]
    h, tq = q_abs.shape[2], qn.shape[1]
    end = mla.window_end(positions, s)
    nblk = (end + BLOCK - 1) // BLOCK

    def body(j, st):
        m, l, acc = st
        start = jnp.minimum(j * BLOCK, s - BLOCK)      # the last block may overlap the one before: masked below
        z = jnp.zeros((), start.dtype)
        lat = jax.lax.dynamic_slice(c_all, (cache.layer, z, start, z), (1, b, BLOCK, c_all.shape[3]))[0]  # [B,BLOCK,C]
        rope = jax.lax.dynamic_slice(k_all, (cache.layer, z, start, z), (1, b, BLOCK, k_all.shape[3]))[0]
        key = start + jnp.arange(BLOCK, dtype=positions.dtype)
        written = ((slots[:, :, None] == key) & valid[:, :, None]).any(1)
        mask = ((key[None, None, :] < positions[:, :1, None])
                | (written[:, None, :] & (key[None, None, :] <= positions[:, :, None])))[:, q:]
        mask = mask & (key >= j * BLOCK)[None, None, :]
        sc = jnp.einsum("BTHC,BSC->BHTS", q_abs, lat.astype(dt), preferred_element_type=jnp.float32)
        sc = sc + jnp.einsum("BTHR,BSR->BHTS", qp, rope.astype(qp.dtype), preferred_element_type=jnp.float32)
        # sc [B,H,T,BLOCK]
        sc = jnp.where(mask[:, None], sc * c.softmax_scale, mla.NEG_INF)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("BHTS,BSC->BHTC", p.astype(dt), lat.astype(dt))
        return m_new, l, acc

    init = (jnp.full((b, h, tq), -jnp.inf, jnp.float32), jnp.zeros((b, h, tq), jnp.float32),
            jnp.zeros((b, h, tq, c.kv_lora_rank), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, nblk, body, init)                  # [B,H,T], [B,H,T], [B,H,T,C]
    o = (acc / l[..., None]).astype(dt)
    o = jnp.einsum("BHTC,CHV->BTHV", o, w_uv)
    return self.output(o), cache.replace(c_kv=c_all, k_pe=k_all, layer=cache.layer + 1)


FORMS = {"whole": (SHIPPED, WHOLE), "window": (SHIPPED, WINDOW_MIN), "loop": (loop_attend, WINDOW_MIN)}


def use(form: str) -> None:
    mla.MLA.attend_in_place, mla.DECODE_WINDOW_MIN = FORMS[form]


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    try:
        for preset, batch, max_len, context in CASES:
            cfg = preset_cfg(preset)
            params, rs = split_variables(random_variables(cfg, 0))
            rows.append({"preset": preset, **time_step(cfg, params, rs, batch, max_len, context, list(FORMS),
                                                       args.steps, args.repeats, use=use, name=str)})
            print(rows[-1], flush=True)
    finally:
        use("window")
    lines = ["# Decode attention: static windows against a loop over key blocks", "",
             f"ms per absorbed decode step (median of {args.repeats} alternating runs of {args.steps} steps), "
             f"ratios = median of the per-run ratios to the whole cache; loop: blocks of {BLOCK} slots; diff = "
             "max |logits - whole's logits|. Machine shared with other jobs: only the ratios mean anything.", ""]
    lines += table(rows, ["preset", "batch", "max_len", "context", "whole_ms", "window_ms", "loop_ms",
                          "window_over_whole", "loop_over_whole", "window_max_abs_diff", "loop_max_abs_diff"])
    write_results(args.out, "decode_window_loop", lines, rows, keep_from="## Reading")
    return rows


if __name__ == "__main__":
    main()
