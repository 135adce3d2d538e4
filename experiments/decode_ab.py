"""Decode speed of two source trees, measured in alternation on one machine (A B A B ...): for checking that a
change to the model or to dsv3_jax/infer does not slow decoding down.

Each round runs one child process per tree (`PYTHONPATH=<tree>`, so each child imports that tree's dsv3_jax),
the trees alternating. A child measures, after compiling (the first call's seconds are kept as compile time):
  * the small preset (random weights, fp32, batch 1): one absorbed decode step (`jit_decode_step`, on the
    params layout the tree's `generate` decodes from at batch 1: `decode_params(rows=1)` where the tree has it,
    which keeps the stacked params since session 11) at 1024, 2048 and
    4096 cached tokens, the median (and min) over 7 runs of 5 steps;
  * the tiny preset (random weights): `generate` of 128 new tokens, plain and speculative, at batch 1 and 8,
    the median (and max) decode tokens/s (stats['tokens_per_s']) over 5 requests;
  * `--parts queue --run-dir RUN` (a trained run): the serving queue, `generate(..., batch_size=8)` of 32
    validation prompts, 128 new tokens each, plain and speculative alternating, 3 runs after a warm-up: the
    median tokens/s over the whole queue, decode-only tokens/s and prefill seconds, and the prefill calls.
The report gives each tree's median over the rounds and the median of the per-round ratios to the first tree.

`--hlo` compares, instead of timing, the compiled programs (XLA:CPU HLO after optimisation, with instruction
names, metadata and numbering stripped) of the small preset's absorbed decode step at 4096 cached tokens and
of the tiny preset's prefill: the noise-free check that a refactor left the decode step's work unchanged.

    PYTHONPATH=$PWD python experiments/decode_ab.py --tree base=/path/to/main --tree new=. [--rounds 3] [--hlo]
Writes experiments/results/decode_ab.{md,json} (timing only; decode_ab_TAG.* with `--tag TAG`).
"""

from __future__ import annotations

import argparse
import json
import os
import difflib
import inspect
import platform
import re
import statistics
import subprocess
import sys
import time

from results_io import cpu_summary                      # experiments/

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONTEXTS = (1024, 2048, 4096)
BATCHES = (1, 8)
QUEUE_SLOTS = 8
PROMPT = b"The model was trained on a small corpus of text, and "


def child(parts: list[str], run_dir: str | None = None) -> dict:
    """The measurements of the tree this subprocess imports (its PYTHONPATH names it)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsv3_jax.config import PRESETS
    from dsv3_jax.infer import generate, init_cache, split_variables
    from dsv3_jax.infer.decode import jit_decode_step, round_up
    try:
        from dsv3_jax.testing import random_variables
    except ImportError:                                    # trees before dsv3_jax/testing.py (main at c81abdb)
        from dsv3_jax.infer.decode import random_variables
    try:
        from dsv3_jax.infer.decode import decode_params     # the params layout the tree's generate decodes from
    except ImportError:                                    # trees before it decode from the stacked params
        decode_params = lambda cfg, params, rows=None: params
    if "rows" in inspect.signature(decode_params).parameters:   # generate splits only where it pays
        layout = lambda cfg, params, rows: decode_params(cfg, params, rows=rows)     # noqa: E731
    else:                                                  # trees before `rows`: generate always split
        layout = lambda cfg, params, rows: decode_params(cfg, params)                # noqa: E731

    out: dict = {}
    if "small" in parts:
        cfg = PRESETS["small"].replace(dtype="float32", max_position_embeddings=max(CONTEXTS) + 64)
        params, rs = split_variables(random_variables(cfg, 0))
        params = layout(cfg, params, 1)                     # batch 1: what generate decodes this step from
        step = jit_decode_step(cfg, True)
        rng = np.random.default_rng(0)
        for ctx in CONTEXTS:
            cache = init_cache(cfg, 1, round_up(ctx + 1, 16), mtp=False)
            fill = lambda a: jnp.asarray(np.where(np.arange(a.shape[2])[None, None, :, None] < ctx,
                                                  rng.standard_normal(a.shape), 0.0), a.dtype)
            cache = jax.tree_util.tree_map(fill, cache)
            tok, pos = jnp.array([[1]], jnp.int32), jnp.array([[ctx]], jnp.int32)   # rewrites slot ctx
            t0 = time.perf_counter()
            logits, _, cache = step(params, rs, cache, tok, pos)
            jax.block_until_ready(logits)
            out[f"small_first_call_s_{ctx}"] = time.perf_counter() - t0
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(5):
                    logits, _, cache = step(params, rs, cache, tok, pos)
                jax.block_until_ready((logits, cache))
                times.append((time.perf_counter() - t0) / 5 * 1e3)
            out[f"small_absorbed_ms_{ctx}"] = statistics.median(times)
            out[f"small_absorbed_min_ms_{ctx}"] = min(times)        # the least disturbed run (shared machine)
            del cache
        del params, rs
    if "tiny" in parts:
        cfg = PRESETS["tiny"]
        variables = random_variables(cfg, 0)
        for batch in BATCHES:
            prompts = [list(PROMPT)[i:] for i in range(batch)]
            for spec in (False, True):
                name = f"tiny_{'spec' if spec else 'plain'}_b{batch}"
                run = lambda: generate(cfg, variables, prompts, 128, speculative=spec, max_len=256)[1]
                t0 = time.perf_counter()
                run()
                out[f"{name}_first_s"] = time.perf_counter() - t0
                rates = [run()["tokens_per_s"] for _ in range(5)]
                out[f"{name}_tok_s"] = statistics.median(rates)
                out[f"{name}_max_tok_s"] = max(rates)
    if "queue" in parts:
        from bench_decode import load_run, validation_prompts     # beside this script (its tree, not the measured one)
        cfg, variables, _, rc, tokenizer = load_run(run_dir)
        prompts = validation_prompts(rc, tokenizer, 4 * QUEUE_SLOTS, 48)
        run = lambda spec: generate(cfg, variables, prompts, 128, speculative=spec, batch_size=QUEUE_SLOTS,
                                    max_len=48 + 128)[1]
        run(False), run(True)                                                       # warm-up: compiles
        stats = {False: [], True: []}
        for _ in range(3):
            for spec in (False, True):
                stats[spec].append(run(spec))
        for spec in (False, True):
            name = f"queue_{'spec' if spec else 'plain'}_b{QUEUE_SLOTS}"
            for k in ("tokens_per_s", "decode_tokens_per_s", "prefill_s"):
                out[f"{name}_{k.replace('tokens_per_s', 'tok_s')}"] = statistics.median(st[k] for st in stats[spec])
            out[f"{name}_prefill_calls"] = stats[spec][0]["prefill_calls"]
    return out


def normalised_hlo(text: str) -> list[str]:
    """Compiled HLO without names, numbering and metadata: equal lists mean the same program."""
    body = text[text.index("\n\n"):] if "\n\n" in text else text
    out = []
    for line in body.splitlines():
        line = re.sub(r", metadata=\{[^}]*\}", "", line)
        line = re.sub(r"%[A-Za-z0-9_.-]+", "%x", line)
        line = re.sub(r"(region|param)_[0-9]+(\.[0-9]+)?", r"\1", line)
        line = re.sub(r"\b[A-Za-z_][\w-]*\.[0-9]+:", "n:", line)           # named computation parameters
        if line.strip() and not re.match(r"^\d+ ", line) and "file_name_id" not in line:
            out.append(line)
    return out


def child_hlo() -> dict:
    """Normalised compiled HLO of the small preset's absorbed decode step (4096 cached tokens, batch 1) and of
    the tiny preset's prefill with MTP (batch 8, 64 prompt tokens), from shapes only (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.config import PRESETS
    from dsv3_jax.infer import init_cache, split_variables
    from dsv3_jax.infer.decode import jit_decode_step, jit_prefill, round_up
    from dsv3_jax.model import Transformer

    def abstract(cfg, batch, slots):
        shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
        params, rs = split_variables(shapes)
        return params, rs, jax.eval_shape(lambda: init_cache(cfg, batch, slots))

    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    small = PRESETS["small"].replace(dtype="float32", max_position_embeddings=max(CONTEXTS) + 64)
    params, rs, cache = abstract(small, 1, round_up(max(CONTEXTS) + 1, 16))
    step = jit_decode_step(small, True).lower(params, rs, cache, i32(1, 1), i32(1, 1))
    tiny = PRESETS["tiny"]
    params, rs, cache = abstract(tiny, 8, 256)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    prefill = jit_prefill(tiny, True).lower(params, rs, cache, i32(8, 64), i32(8), key, f32, f32)
    return {name: normalised_hlo(low.compile().as_text()) for name, low in
            (("small_decode_step_4096", step), ("tiny_prefill_b8", prefill))}


def compare_hlo(trees, out_dir: str) -> None:
    progs = {}
    for name, path in trees:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path), JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--hlo"], env=env,
                              capture_output=True, text=True, cwd=os.path.abspath(path))
        if proc.returncode != 0:
            sys.exit(f"tree {name} failed:\n{proc.stderr[-3000:]}")
        progs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = trees[0][0]
    for name, _ in trees[1:]:
        for prog, lines in progs[base].items():
            other = progs[name][prog]
            diff = [d for d in difflib.unified_diff(lines, other, lineterm="", n=0)
                    if d[:1] in "+-" and not d.startswith(("+++", "---"))]
            print(f"{prog}: {base} {len(lines)} lines, {name} {len(other)} lines, {len(diff)} differ")
            for d in diff[:20]:
                print("   ", d[:160])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree (give two or more)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="small,tiny", help="small, tiny and/or queue (queue needs --run-dir)")
    ap.add_argument("--run-dir", help="a trained run for the queue part")
    ap.add_argument("--tag", default="", help="write decode_ab_TAG.{md,json}")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--hlo", action="store_true", help="compare compiled programs instead of timing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if args.child:
        print(json.dumps(child_hlo() if args.hlo else child(parts, args.run_dir)))
        return {}
    trees = [t.split("=", 1) for t in args.tree]
    if len(trees) < 2 or any(len(t) != 2 for t in trees):
        ap.error("give at least two --tree NAME=PATH")
    if "queue" in parts and not (args.run_dir and os.path.exists(os.path.join(args.run_dir, "config.json"))):
        ap.error("--parts queue needs --run-dir RUN, a training run directory")
    if args.hlo:
        compare_hlo(trees, args.out)
        return {}
    runs: dict = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, path in trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path), JAX_PLATFORMS="cpu")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--parts", args.parts]
                                  + (["--run-dir", os.path.abspath(args.run_dir)] if args.run_dir else []),
                                  env=env, capture_output=True, text=True, cwd=os.path.abspath(path))
            if proc.returncode != 0:
                sys.exit(f"tree {name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    base = trees[0][0]
    keys = [k for k in runs[base][0] if all(k in r for rs in runs.values() for r in rs)]
    lines = ["# Decode speed of two trees, alternating", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {cpu_summary()} (shared), 1-min load average "
             f"{os.getloadavg()[0]:.1f} at the end. {args.rounds} rounds, trees alternating; each tree's median over "
             f"the rounds, and the median of the per-round ratios to `{base}`. `_s` rows are first calls (compile "
             "included); `ms` lower is better, `tok_s` higher is better.", "",
             "| measure | " + " | ".join(n for n, _ in trees) + " | " +
             " | ".join(f"{n} / {base}" for n, _ in trees[1:]) + " |",
             "|---" * (2 * len(trees)) + "|"]
    summary = {}
    for k in keys:
        meds = [statistics.median(r[k] for r in runs[n]) for n, _ in trees]
        ratios = [statistics.median(b[k] / a[k] for a, b in zip(runs[base], runs[n])) for n, _ in trees[1:]]
        summary[k] = {"median": dict(zip([n for n, _ in trees], meds)), "ratio": ratios}
        lines.append(f"| {k} | " + " | ".join(f"{m:.2f}" for m in meds) + " | " +
                     " | ".join(f"{x:.3f}" for x in ratios) + " |")
    os.makedirs(args.out, exist_ok=True)
    stem = "decode_ab" + (f"_{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump({"trees": dict(trees), "summary": summary, "runs": runs}, f, indent=2)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
