"""Decode attention over a window of the cache (`MLA.attend_in_place`: the smallest of the static windows
`decode_windows(max_len)` that covers the step's largest position + 1) against attention over the whole cache.

Both forms run in one process, alternating (the machine is shared: only ratios within one run mean anything).
The whole-cache form is the same code with one window, `mla.DECODE_WINDOW_MIN` set above the cache size; the
window sizes are read when a step is traced, so each form gets its own jitted functions and is traced with its
setting (for `generate`, whose jitted steps are cached per config, the whole-cache form runs a config that
differs only in `attention_causal_block`, a training-only field, so that its compiled steps are its own).

Part 1 (`--presets tiny,small`, random weights, fp32): one decode step (`decode_step`, absorbed) at batch 1 and 8,
every row at `--context` cached tokens (the slots before it hold random latents), in caches of `--max-lens`
slots; per form the median over `--repeats` alternating runs of `--steps` steps, and the median of the
per-run ratios. `--window-mins` adds forms with other smallest windows (the alternatives measured).
Part 2: the small preset at batch 1 with the cache full (4096 cached tokens, 4112 slots): the window is then
the whole cache, so this measures what the window choice itself costs (issue 15 item 2: no slower).
Part 3 (`--run-dir`, a trained run): greedy `generate` at batch `--batch` of 48-token validation prompts, 128
new tokens, plain and speculative, at the default max_len and at `--gen-max-len`: decode tokens/s of each
form (median over `--gen-repeats` alternating rounds, outputs checked equal) and speculative / plain.

    PYTHONPATH=$PWD JAX_PLATFORMS=cpu python experiments/decode_window.py [--run-dir /tmp/spec8/tiny] [--quick]
Writes experiments/results/decode_window.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import PRESETS
from dsv3_jax.infer import generate, init_cache, split_variables
from dsv3_jax.infer.decode import jit_decode_step, round_up
from dsv3_jax.model import mla
from dsv3_jax.testing import random_variables
from bench_decode import time_decode_steps                 # experiments/
from results_io import write_results                    # experiments/ (the script's folder is on the path)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WHOLE = 1 << 30          # a DECODE_WINDOW_MIN above any cache: one window, the whole cache
FULL_CONTEXT = 4096


def form_name(window_min: int) -> str:
    return "whole" if window_min >= WHOLE else f"window{window_min}"


def filled_cache(cfg, batch: int, max_len: int, context: int, seed: int = 0):
    """A cache of max_len slots whose first `context` slots of every row hold random latents."""
    rng = np.random.default_rng(seed)

    def fill(a):
        x = np.zeros(a.shape, np.float32)
        x[:, :, :context] = rng.standard_normal(x[:, :, :context].shape)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map(fill, init_cache(cfg, batch, max_len, mtp=False))


def use_window(window_min: int) -> None:
    mla.DECODE_WINDOW_MIN = window_min


def time_step(cfg, params, rs, batch: int, max_len: int, context: int, forms: list, steps: int,
              repeats: int, use=use_window, name=form_name) -> dict:
    """Decode steps at `context` (every step rewrites slot `context`), the forms alternating, `use(form)` run
    before each form's calls (it selects the form: traced at the first call); per form the median step time
    (ms) and the median per-run ratio to the first form (the whole cache)."""
    tok = jnp.ones((batch, 1), jnp.int32)
    pos = jnp.full((batch, 1), context, jnp.int32)
    state = {}
    for w in forms:
        use(w)
        step = jit_decode_step.__wrapped__(cfg, True)                # a fresh jit, traced with this setting
        cache = filled_cache(cfg, batch, max_len, context)
        t0 = time.perf_counter()
        logits, _, cache = step(params, rs, cache, tok, pos)
        state[w] = {"step": step, "cache": cache, "logits": np.asarray(logits), "times": [],
                    "first_call_s": time.perf_counter() - t0}
    base = forms[0]
    time_decode_steps(state, params, rs, tok, pos, steps, repeats, before=use)
    row = {"batch": batch, "max_len": max_len, "context": context}
    for w in forms:
        s = state[w]
        row[f"{name(w)}_ms"] = statistics.median(s["times"]) * 1e3
        row[f"{name(w)}_max_abs_diff"] = float(np.abs(s["logits"] - state[base]["logits"]).max())
        row[f"{name(w)}_first_call_s"] = s["first_call_s"]
        if w != base:
            row[f"{name(w)}_over_{name(base)}"] = statistics.median(
                a / b for a, b in zip(s["times"], state[base]["times"]))
    return row


def hlo_copies(batch: int, max_lens: list, window_min: int) -> list[dict]:
    """The compiled batch-`batch` plain (`jit_decode_steps`) and speculative (`jit_speculative_steps`, greedy)
    step programs of the tiny preset with the given smallest window: the copies whose elements number at least
    one layer's latent cache (B * S * kv_lora_rank; none means the cache is updated in place), the largest copy
    and the count of conditionals."""
    import re
    from dsv3_jax.infer.decode import Sampling, jit_decode_steps
    from dsv3_jax.infer.speculative import SpecState, jit_speculative_steps
    cfg = PRESETS["tiny"]
    params, rs = split_variables(random_variables(cfg, 0))
    mla.DECODE_WINDOW_MIN = window_min
    z = jnp.zeros((batch,), jnp.int32)
    samp = Sampling(jax.random.PRNGKey(0), jnp.float32(0), jnp.float32(1))
    rows = []
    for max_len in max_lens:
        h = jnp.zeros((batch, 2, cfg.hidden_size), jnp.float32)
        programs = {
            "plain": (jit_decode_steps.__wrapped__(cfg), (init_cache(cfg, batch, max_len, mtp=False), z, z)),
            "speculative": (jit_speculative_steps.__wrapped__(cfg, greedy_only=True),
                            (init_cache(cfg, batch, max_len), SpecState(z, jnp.zeros((batch, 2), jnp.int32), h)))}
        for name, (fn, head) in programs.items():
            text = fn.lower(params, rs, *head, jnp.ones((batch,), bool), samp, 0, 8).compile().as_text()
            sizes = []
            for shape in re.findall(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* copy\(", text):
                sizes.append(int(np.prod([int(d) for d in shape.split(",") if d] or [1])))
            big = [n for n in sizes if n >= batch * max_len * cfg.kv_lora_rank]
            rows.append({"form": form_name(window_min), "program": name, "batch": batch, "max_len": max_len,
                         "copies": len(sizes), "cache_size_copies": len(big), "largest_copy_elements": max(sizes),
                         "conditionals": text.count(" conditional(")})
            print(rows[-1], flush=True)
    return rows


def preset_cfg(name: str):
    cfg = PRESETS[name]
    return cfg.replace(dtype="float32", max_position_embeddings=max(cfg.max_position_embeddings, FULL_CONTEXT + 64))


def part_steps(presets, batches, max_lens, context, forms, steps, repeats) -> list[dict]:
    rows = []
    for name in presets:
        cfg = preset_cfg(name)
        params, rs = split_variables(random_variables(cfg, 0))
        for b in batches:
            for s in max_lens:
                row = {"preset": name, **time_step(cfg, params, rs, b, s, context, forms, steps, repeats)}
                rows.append(row)
                print(row, flush=True)
    return rows


def part_full(forms, steps, repeats) -> dict:
    cfg = preset_cfg("small")
    params, rs = split_variables(random_variables(cfg, 0))
    row = {"preset": "small", **time_step(cfg, params, rs, 1, round_up(FULL_CONTEXT + 1, 16), FULL_CONTEXT,
                                          forms, steps, repeats)}
    print(row, flush=True)
    return row


def part_generate(run_dir: str, batch: int, new_tokens: int, max_lens: list, repeats: int,
                  shipped: int) -> list[dict]:
    from bench_decode import load_run, validation_prompts
    cfg, variables, _, rc, tokenizer = load_run(run_dir)
    prompts = validation_prompts(rc, tokenizer, batch, 48)
    cfgs = {WHOLE: cfg.replace(attention_causal_block=cfg.attention_causal_block + 1), shipped: cfg}
    rows = []
    for max_len in max_lens:
        def run(w, spec):
            mla.DECODE_WINDOW_MIN = w
            return generate(cfgs[w], variables, prompts, new_tokens, speculative=spec, max_len=max_len)

        combos = [(w, spec) for spec in (False, True) for w in cfgs]
        for c in combos:
            run(*c)                                                                  # warm-up: compiles
        rates = {c: [] for c in combos}
        outs = {}
        for _ in range(repeats):
            for c in combos:
                out, stats = run(*c)
                rates[c].append(sum(len(o) - 1 for o in out) / stats["decode_s"])
                outs[c] = out
        assert all(o == outs[combos[0]] for o in outs.values()), "outputs differ between forms or modes"
        row = {"batch": batch, "max_len": max_len or "default", "new_tokens": new_tokens}
        for w, spec in combos:
            row[f"{form_name(w)}_{'spec' if spec else 'plain'}_tok_s"] = statistics.median(rates[(w, spec)])
        for w in cfgs:
            row[f"{form_name(w)}_spec_over_plain"] = statistics.median(
                s / p for p, s in zip(rates[(w, False)], rates[(w, True)]))
        for spec in (False, True):
            key = "spec" if spec else "plain"
            row[f"window_over_whole_{key}"] = statistics.median(
                a / b for a, b in zip(rates[(shipped, spec)], rates[(WHOLE, spec)]))
        rows.append(row)
        print(row, flush=True)
    return rows


def plot(out_dir: str, rows: list[dict], forms: list[int]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    groups = sorted({(r["preset"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, (preset, b) in zip(axes[0], groups):
        sel = [r for r in rows if r["preset"] == preset and r["batch"] == b]
        xs = [r["max_len"] for r in sel]
        for w in forms:
            ax.plot(xs, [r[f"{form_name(w)}_ms"] for r in sel], "o-" if w == WHOLE else "s--", label=form_name(w))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache slots (max_len)")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"{preset}, batch {b}, context {sel[0]['context']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "decode_window.png"), dpi=110)


def fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def table(rows: list[dict], keys: list[str]) -> list[str]:
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
        "| " + " | ".join(fmt(r.get(k, "-")) for k in keys) + " |" for r in rows]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-lens", default="256,1024,4096")
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--window-mins", default=str(mla.DECODE_WINDOW_MIN),
                    help="smallest windows of the windowed forms (the first is the shipped one)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-full", action="store_true", help="skip part 2")
    ap.add_argument("--run-dir", help="trained run for part 3 (none: no part 3)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gen-max-len", type=int, default=1024)
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 256/4096, few repeats (smoke test)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.presets, args.max_lens, args.steps, args.repeats, args.gen_repeats = "tiny", "256,4096", 3, 2, 1
        args.no_full = True
    shipped = mla.DECODE_WINDOW_MIN
    forms = [WHOLE] + [int(w) for w in args.window_mins.split(",")]
    t0 = time.perf_counter()
    steps = part_steps(args.presets.split(","), [int(b) for b in args.batches.split(",")],
                       [int(s) for s in args.max_lens.split(",")], args.context, forms, args.steps, args.repeats)
    hlo = [r for w in (WHOLE, shipped) for r in hlo_copies(8, [208, 4096], w)]
    full = None if args.no_full else part_full(forms, args.steps, args.repeats)
    gen = (part_generate(args.run_dir, args.batch, args.new_tokens, [None, args.gen_max_len], args.gen_repeats,
                         shipped)
           if args.run_dir else [])
    mla.DECODE_WINDOW_MIN = shipped
    names = [form_name(w) for w in forms]
    ratio_keys = [f"{n}_over_whole" for n in names[1:]]
    lines = ["# Decode attention over a window of the cache", "",
             f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
             f"{time.perf_counter() - t0:.0f} s. Machine shared with other jobs: only the ratios, measured "
             "within this one process with the forms alternating, mean anything.", "",
             f"whole: attention over every slot of the cache; windowN: over the smallest of the windows N, 2N, "
             f"4N, ... below max_len and max_len itself that covers the step's largest position + 1 "
             f"(`lax.switch`, dsv3_jax/model/mla.py); window{shipped} ships. ms per absorbed decode step "
             f"(median of {args.repeats} alternating runs of {args.steps} steps); ratio = median of the per-run "
             "ratios (below 1: the window is faster); diff = max |logits - whole's logits|; first_call_s: the "
             "first call, compilation included (each window is one more branch to compile).", "",
             f"## Decode step, random weights, every row at {args.context} cached tokens", ""]
    lines += table(steps, ["preset", "batch", "max_len", "context"] + [f"{n}_ms" for n in names] + ratio_keys
                   + [f"{n}_max_abs_diff" for n in names[1:]] + [f"{n}_first_call_s" for n in names])
    if full:
        lines += ["", f"## Small preset, batch 1, cache full ({FULL_CONTEXT} cached tokens)", ""]
        lines += table([full], ["max_len", "context"] + [f"{n}_ms" for n in names] + ratio_keys)
    if gen:
        lines += ["", f"## Greedy generate, trained run {args.run_dir}", "",
                  f"Batch {args.batch}, 48-token validation prompts, {args.new_tokens} new tokens; decode tokens/s "
                  f"(median of {args.gen_repeats} alternating rounds; outputs equal in every form and mode).", ""]
        pair = ["whole", form_name(shipped)]
        keys = ["max_len"] + [f"{n}_{m}_tok_s" for m in ("plain", "spec") for n in pair]
        keys += ["window_over_whole_plain", "window_over_whole_spec"] + [f"{n}_spec_over_plain" for n in pair]
        lines += table(gen, keys)
    lines += ["", "## Compiled step programs (tiny preset, batch 8): copies", "",
              "cache_size_copies: copies with at least one layer's latent cache of elements (B * S * "
              "kv_lora_rank); 0: the cache is written in place.", ""]
    lines += table(hlo, ["form", "program", "max_len", "copies", "cache_size_copies", "largest_copy_elements",
                         "conditionals"])
    data = {"steps": steps, "full": full, "generate": gen, "hlo": hlo, "shipped_window_min": shipped}
    write_results(args.out, "decode_window", lines, data, keep_from="## Reading")
    plot(args.out, steps, forms)
    return data


if __name__ == "__main__":
    main()
