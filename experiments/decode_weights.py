"""Decoding from per-layer weights (`decode_params`) against the stacked params, in one process, the two
layouts alternating (A B A B ...), so that a shared machine's load falls on both alike.

With the stacked params the decode step runs the layers as a rolled loop that copies each layer's slice of
every weight out of the [L, ...] stack at every step; with `decode_params` the layers are unrolled over their
own arrays (dsv3_jax/model/transformer.py `Stack`). Parts:
  hlo:      the compiled `jit_decode_steps` (tiny preset, batch 8, from shapes): ops that copy a weight's layer
            slice out of a stack, per layout.
  steps:    on a trained run (or random tiny weights) at batch B: device microseconds per step in calls of
            CHUNK steps, from one prefill of validation-text prompts (random prompts without a run): plain
            steps, the speculative step, and its draft / verify passes alone and both in one step (the
            programs of experiments/spec_cost.py), per layout.
  generate: `plain_generate` / `speculative_generate` of the same prompts at batch B, decode tokens/s
            (stats['tokens_per_s']), per layout; greedy outputs checked equal across layouts.
  long:     the small preset's absorbed decode step (`jit_decode_step`, batch 1, fp32, random weights) at
            1K/2K/4K cached tokens: ms per step, wall and process CPU time, per layout.

    PYTHONPATH=$PWD python experiments/decode_weights.py [--run-dir RUN] [--batch 8] [--parts hlo,steps,...]
Writes experiments/results/decode_weights.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import PRESETS
from dsv3_jax.infer import init_cache, split_variables
from dsv3_jax.infer.decode import CHUNK, Sampling, decode_params, jit_decode_step, jit_decode_steps, round_up
from dsv3_jax.infer.generate import plain_generate
from dsv3_jax.infer.request import GenerationRequest, start_request
from dsv3_jax.infer.speculative import jit_speculative_steps, speculative_generate, start_state
from dsv3_jax.model import Transformer
from dsv3_jax.testing import random_variables
from results_io import write_results
from spec_cost import NEW, PROMPT, one_pass_step, parts_table, step_parts

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYOUTS = ("stacked", "per_layer")
PASSES = ("draft pass", "verify pass", "both passes")
CONTEXTS = (1024, 2048, 4096)


def layouts(cfg, params) -> dict:
    return {"stacked": params, "per_layer": decode_params(cfg, params)}


def weight_slice_copies(cfg, batch: int = 8, slots: int = 208) -> dict:
    """Per layout, the ops of the compiled `jit_decode_steps` whose result has the shape of one layer of a
    stacked weight (with or without the leading 1) and which slice or copy: the per-step weight copies."""
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    params, rs = split_variables(shapes)
    layer_shapes = {tuple(x.shape[1:]) for name in ("dense_layers", "moe_layers") if name in params
                    for x in jax.tree.leaves(params[name]) if x.ndim >= 3}
    cache = jax.eval_shape(lambda: init_cache(cfg, batch, slots, mtp=False))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    sampling = Sampling(jax.eval_shape(lambda: jax.random.PRNGKey(0)), f32, f32)
    out = {}
    for name in LAYOUTS:
        p = params if name == "stacked" else jax.eval_shape(lambda q: decode_params(cfg, q), params)
        hlo = jit_decode_steps.__wrapped__(cfg, True, CHUNK).lower(
            p, rs, cache, i32(batch), i32(batch), jax.ShapeDtypeStruct((batch,), bool), sampling, i32(), i32()
        ).compile().as_text()
        copies = []
        for line in hlo.splitlines():
            m = re.match(r"\s*(?:ROOT )?%(\S+) = f32\[([0-9,]*)\]\S* (\S+)\(", line)
            if m and ("slice" in m.group(1) or m.group(3) in ("copy", "dynamic-slice", "slice")):
                shape = tuple(int(s) for s in m.group(2).split(",") if s)
                if shape in layer_shapes or (shape[:1] == (1,) and shape[1:] in layer_shapes):
                    copies.append(f"{m.group(1)} f32[{m.group(2)}]")
        out[name] = copies
    return out


def step_programs(cfg, params_by_layout: dict, rs, prompts: list) -> dict:
    """{(layout, kind): run()} for kind plain / speculative / each of PASSES: run() makes one device call of
    CHUNK steps from the same prefilled state, the cache donated and kept."""
    batch = len(prompts)
    req = GenerationRequest(prompts, NEW, max_len=max(len(p) for p in prompts) + NEW)
    active = jnp.ones((batch,), bool)
    progs = {}
    for name, params in params_by_layout.items():
        plain, spec = start_request(cfg, params, rs, req, mtp=False), start_request(cfg, params, rs, req, mtp=True)
        rows = np.arange(batch)
        state = start_state(spec.lengths, spec.tokens, spec.tok, spec.prefill.h_tail, 1)
        builds = {"plain": lambda: jit_decode_steps.__wrapped__(cfg, True, CHUNK),
                  "speculative": lambda: jit_speculative_steps.__wrapped__(cfg, CHUNK),
                  **{p: lambda p=p: jit_speculative_steps.__wrapped__(cfg, CHUNK, one_pass_step(p)) for p in PASSES}}
        for kind, build in builds.items():
            if kind == "plain":
                start, make = plain, (lambda c, params=params, plain=plain: (
                    params, rs, c, plain.tok, jnp.asarray(plain.lengths), active, plain.sampling, 1, CHUNK))
            else:
                start, make = spec, (lambda c, params=params, spec=spec, state=state: (
                    params, rs, c, state, active, spec.sampling, 1, CHUNK))
            # A jitted function, called as `generate` calls its steps (a `Compiled` object's own __call__ adds
            # a host overhead per call that would pass for step time: spec_cost.py, session 12's reading).
            fn = build()
            box = {"cache": jax.tree.map(jnp.copy, start.cache)}

            def run(fn=fn, box=box, make=make):
                out = fn(*make(box["cache"]))
                box["cache"] = out[-2]
                jax.block_until_ready(out[-1])
            run()                                      # compiles
            run.hlo = lambda fn=fn, box=box, make=make: fn.lower(*make(box["cache"])).compile().as_text()
            progs[(name, kind)] = run
    return progs


def time_steps(progs: dict, repeats: int, calls: int = 5) -> dict:
    """Median microseconds per step (wall and process CPU) of each program, all alternating over `repeats`;
    and the medians of the per-repeat ratios that the report needs."""
    for run in progs.values():
        run()
    wall = {k: [] for k in progs}
    cpu = {k: [] for k in progs}
    for _ in range(repeats):
        for k, run in progs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                run()
            wall[k].append((time.perf_counter() - t0) / (calls * CHUNK) * 1e6)
            cpu[k].append((time.process_time() - c0) / (calls * CHUNK) * 1e6)
    ratio = lambda a, b, t=wall: statistics.median(x / y for x, y in zip(t[a], t[b]))
    out = {}
    for name in LAYOUTS:
        row = {kind: round(statistics.median(wall[(name, kind)]), 1) for kind in ("plain", "speculative", *PASSES)}
        row["plain_cpu"] = round(statistics.median(cpu[(name, "plain")]), 1)
        row["spec_over_plain"] = round(ratio((name, "speculative"), (name, "plain")), 3)
        row["both_over_plain"] = round(ratio((name, "both passes"), (name, "plain")), 3)
        row["apart_over_plain"] = round(statistics.median(
            (d + v) / p for d, v, p in zip(wall[(name, "draft pass")], wall[(name, "verify pass")],
                                           wall[(name, "plain")])), 3)
        out[name] = row
    for kind in ("plain", "speculative"):
        out[f"{kind}_per_layer_over_stacked"] = round(ratio(("per_layer", kind), ("stacked", kind)), 3)
        out[f"{kind}_per_layer_over_stacked_cpu"] = round(ratio(("per_layer", kind), ("stacked", kind), cpu), 3)
    return out


def time_generate(cfg, params_by_layout: dict, rs, prompts: list, repeats: int) -> dict:
    """Decode tokens/s of plain and speculative greedy generation per layout, alternating; outputs compared."""
    req = GenerationRequest(prompts, NEW, max_len=max(len(p) for p in prompts) + NEW)
    fns = {"plain": plain_generate, "speculative": speculative_generate}
    runs = {(name, kind): (lambda f=f, p=p: f(cfg, p, rs, req)) for name, p in params_by_layout.items()
            for kind, f in fns.items()}
    outs = {k: run()[0] for k, run in runs.items()}                          # warm-up (compiles)
    if not all(o == outs[("stacked", "plain")] for o in outs.values()):
        raise AssertionError("greedy outputs differ between layouts or between plain and speculative")
    rates = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            rates[k].append(run()[1]["tokens_per_s"])
    out = {f"{name}_{kind}_tok_s": round(statistics.median(rates[(name, kind)]), 1) for name, kind in runs}
    for kind in fns:
        out[f"{kind}_per_layer_over_stacked"] = round(statistics.median(
            b / a for a, b in zip(rates[("stacked", kind)], rates[("per_layer", kind)])), 3)
    return out


def time_long(repeats: int, steps: int = 5) -> dict:
    """The small preset's absorbed decode step at CONTEXTS cached tokens (batch 1, random weights), ms per
    step per layout (median over repeats of `steps` steps; wall and process CPU), alternating."""
    cfg = PRESETS["small"].replace(dtype="float32", max_position_embeddings=max(CONTEXTS) + 64)
    params, rs = split_variables(random_variables(cfg, 0))
    by_layout = layouts(cfg, params)
    step = jit_decode_step(cfg, True)
    rng = np.random.default_rng(0)
    out = {}
    for ctx in CONTEXTS:
        fill = lambda a: jnp.asarray(np.where(np.arange(a.shape[2])[None, None, :, None] < ctx,
                                              rng.standard_normal(a.shape), 0.0), a.dtype)
        caches = {name: jax.tree.map(fill, init_cache(cfg, 1, round_up(ctx + 1, 16), mtp=False)) for name in LAYOUTS}
        tok, pos = jnp.array([[1]], jnp.int32), jnp.array([[ctx]], jnp.int32)        # rewrites slot ctx
        for name in LAYOUTS:                                                          # compile
            logits, _, caches[name] = step(by_layout[name], rs, caches[name], tok, pos)
            jax.block_until_ready(logits)
        wall = {n: [] for n in LAYOUTS}
        cpu = {n: [] for n in LAYOUTS}
        for _ in range(repeats):
            for name in LAYOUTS:
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    logits, _, caches[name] = step(by_layout[name], rs, caches[name], tok, pos)
                jax.block_until_ready((logits, caches[name]))
                wall[name].append((time.perf_counter() - t0) / steps * 1e3)
                cpu[name].append((time.process_time() - c0) / steps * 1e3)
        out[ctx] = {**{f"{n}_ms": round(statistics.median(wall[n]), 2) for n in LAYOUTS},
                    **{f"{n}_cpu_ms": round(statistics.median(cpu[n]), 2) for n in LAYOUTS},
                    "per_layer_over_stacked": round(statistics.median(
                        b / a for a, b in zip(wall["stacked"], wall["per_layer"])), 3)}
        del caches
    return out


def report(args, data: dict) -> list[str]:
    lines = ["# Decoding from per-layer weights (decode_params) against the stacked params", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), jax {jax.__version__}, 1-min load "
             f"{os.getloadavg()[0]:.1f} at the end. The two layouts alternate in one process; ratios are medians of "
             "per-repeat ratios. Command: `python experiments/decode_weights.py "
             f"{' '.join(args.argv)}`.", ""]
    if "hlo" in data:
        lines += ["Weight-slice copies in the compiled `jit_decode_steps` (tiny preset, batch 8): ops whose result "
                  "is one layer of a stacked weight.", "", "| layout | ops | examples |", "|---|---|---|"]
        for name, ops in data["hlo"].items():
            lines.append(f"| {name} | {len(ops)} | {', '.join(ops[:3])} |")
        lines.append("")
    if "steps" in data:
        s = data["steps"]
        lines += [f"Steps at batch {args.batch} ({data['model']}): device microseconds per step in calls of {CHUNK} "
                  f"steps (median of {args.repeats} alternating repeats of 5 calls). apart = (draft + verify) / plain, "
                  "together = both passes in one step / plain.", "",
                  "| layout | plain step | plain CPU | draft pass | verify pass | both passes | speculative step | "
                  "apart / plain | together / plain | speculative / plain |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in LAYOUTS:
            r = s[name]
            lines.append(f"| {name} | {r['plain']:.0f} | {r['plain_cpu']:.0f} | {r['draft pass']:.0f} | "
                         f"{r['verify pass']:.0f} | {r['both passes']:.0f} | {r['speculative']:.0f} | "
                         f"{r['apart_over_plain']:.2f} | {r['both_over_plain']:.2f} | {r['spec_over_plain']:.2f} |")
        lines += ["", f"per_layer / stacked: plain step {s['plain_per_layer_over_stacked']:.3f} (CPU "
                  f"{s['plain_per_layer_over_stacked_cpu']:.3f}), speculative step "
                  f"{s['speculative_per_layer_over_stacked']:.3f} (CPU {s['speculative_per_layer_over_stacked_cpu']:.3f}).", ""]
    if "generate" in data:
        g = data["generate"]
        lines += [f"Generation at batch {args.batch}, {NEW} new tokens, decode tokens/s (median of {args.repeats} "
                  "alternating repeats; greedy outputs equal across layouts and modes):", "",
                  "| layout | plain tok/s | speculative tok/s |", "|---|---|---|"]
        for name in LAYOUTS:
            lines.append(f"| {name} | {g[f'{name}_plain_tok_s']:.0f} | {g[f'{name}_speculative_tok_s']:.0f} |")
        lines += ["", f"per_layer / stacked: plain {g['plain_per_layer_over_stacked']:.3f}, speculative "
                  f"{g['speculative_per_layer_over_stacked']:.3f}.", ""]
    if "parts" in data:
        cols = list(data["parts"])
        plain = {name: sum(data["parts"][f"plain {name}"].values()) for name in LAYOUTS}
        lines += [f"What a step's time is made of at batch {args.batch}: microseconds per step, each XLA op's "
                  "exclusive time in a jax.profiler trace (experiments/spec_cost.py `step_parts`; the profiler "
                  "inflates every op, so read the shares: in brackets, as a fraction of the same layout's plain "
                  "step).", ""]
        lines += parts_table(data["parts"], cols, {c: plain[c.split(" ", 1)[1]] for c in cols}, cols[0]) + [""]
    if "long" in data:
        lines += ["Small preset, absorbed decode step (`jit_decode_step`, batch 1, fp32), ms per step (median of "
                  f"{args.repeats} alternating repeats of 5 steps):", "",
                  "| cached tokens | stacked ms | per_layer ms | stacked CPU ms | per_layer CPU ms | per_layer / stacked |",
                  "|---|---|---|---|---|---|"]
        for ctx, r in data["long"].items():
            lines.append(f"| {ctx} | {r['stacked_ms']:.2f} | {r['per_layer_ms']:.2f} | {r['stacked_cpu_ms']:.2f} | "
                         f"{r['per_layer_cpu_ms']:.2f} | {r['per_layer_over_stacked']:.3f} |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="training run directory (default: random tiny weights, random prompts)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--parts", default="hlo,steps,generate,long")
    ap.add_argument("--profile", action="store_true",
                    help="with steps: a jax.profiler trace of the plain and speculative steps split into parts")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    parts = args.parts.split(",")
    data: dict = {}
    if "hlo" in parts:
        data["hlo"] = weight_slice_copies(PRESETS["tiny"])
        print({k: len(v) for k, v in data["hlo"].items()}, flush=True)
    if "steps" in parts or "generate" in parts:
        if args.run_dir:
            from bench_decode import load_run, validation_prompts
            cfg, variables, label, rc, tokenizer = load_run(args.run_dir)
            prompts = validation_prompts(rc, tokenizer, args.batch, PROMPT)
        else:
            cfg, label = PRESETS["tiny"], "random tiny"
            variables = random_variables(cfg, 0)
            rng = np.random.default_rng(0)
            prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, PROMPT)] for _ in range(args.batch)]
        data["model"] = label
        params, rs = split_variables(variables)
        by_layout = layouts(cfg, params)
        if "steps" in parts:
            progs = step_programs(cfg, by_layout, rs, prompts)
            data["steps"] = time_steps(progs, args.repeats)
            print(data["steps"], flush=True)
            if args.profile:
                parts = step_parts({(kind, name): progs[(name, kind)] for name in LAYOUTS
                                    for kind in ("plain", "speculative")})
                data["parts"] = {f"{kind} {name}": {k: round(v, 1) for k, v in d.items()}
                                 for (kind, name), d in parts.items()}
                print(data["parts"], flush=True)
            del progs
        if "generate" in parts:
            data["generate"] = time_generate(cfg, by_layout, rs, prompts, args.repeats)
            print(data["generate"], flush=True)
    if "long" in parts:
        data["long"] = time_long(args.repeats)
        print(data["long"], flush=True)
    write_results(args.out, "decode_weights", report(args, data), data)
    return data


if __name__ == "__main__":
    main()
