"""Drafts per speculative step: one MTP draft against two and three (the module chained on its own output,
dsv3_jax/infer/speculative.py), on trained runs, by batch.

For each run and batch B (the first B of 16 validation-text prompts of 48 tokens, as bench_decode's part 3):
  steps:    device microseconds per step in calls of CHUNK steps from one prefill (per-layer weights where
            `generate` uses them), plain and with K drafts, alternating; the K-draft step in plain steps;
  generate: greedy `generate` of 128 new tokens per row, plain and with K drafts, alternating rounds after a
            warm-up (outputs checked equal to plain greedy): decode tokens/s, tokens per main forward, and the
            median per-round ratio to plain.
bound = tokens per forward / (K-draft step / plain step): what the step's cost leaves of the speed-up. A
second table splits the gap between the bound and the measured ratio: the rows that wait for the batch's
slowest one (one request per batch), and the step's cost inside `generate` (longer contexts, the host loop).

    PYTHONPATH=$PWD python experiments/spec_drafts.py --runs RUN[,RUN2] [--batches 1,4,8,16] [--drafts 1,2,3]
Writes experiments/results/spec_drafts.{md,json,png}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from bench_decode import load_run, model_shape, shape_text, validation_prompts
from dsv3_jax.infer import generate, split_variables
from dsv3_jax.infer.decode import CHUNK, decode_params, jit_decode_steps
from dsv3_jax.infer.request import GenerationRequest, start_request
from dsv3_jax.infer.speculative import jit_speculative_steps, start_state
from results_io import write_results

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT, NEW, POOL = 48, 128, 16          # --prompt-tokens, --new-tokens defaults; prompts in the pool


def step_costs(cfg, params, rs, prompts, drafts: list, repeats: int, new: int = NEW, calls: int = 4) -> dict:
    """{K: microseconds per step} (K = 0: plain) and {K: median per-repeat ratio to plain}."""
    b = len(prompts)
    params = decode_params(cfg, params, rows=b)
    req = GenerationRequest(prompts, new, max_len=max(map(len, prompts)) + new)
    active = jnp.ones((b,), bool)
    progs = {}
    for k in [0] + drafts:
        run = start_request(cfg, params, rs, req, mtp=k > 0, drafts=max(k, 1))
        # The jitted functions `generate` calls (a `Compiled` object's own __call__ adds a host overhead per
        # call that would pass for step time).
        if k == 0:
            fn = jit_decode_steps(cfg, True)
            make = lambda c, r=run: (params, rs, c, r.tok, jnp.asarray(r.lengths), active, r.sampling, 1, CHUNK)
        else:
            st = start_state(run.lengths, run.tokens, run.tok, run.prefill.h_tail, k)
            fn = jit_speculative_steps(cfg, greedy_only=True)
            make = lambda c, r=run, st=st: (params, rs, c, st, active, r.sampling, 1, CHUNK)
        box = {"cache": run.cache}

        def go(fn=fn, box=box, make=make):
            out = fn(*make(box["cache"]))
            box["cache"] = out[-2]
            jax.block_until_ready(out[-1])
        progs[k] = go
    for go in progs.values():
        go()
    times = {k: [] for k in progs}
    for _ in range(repeats):
        for k, go in progs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                go()
            times[k].append((time.perf_counter() - t0) / (calls * CHUNK) * 1e6)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: statistics.median(a / p for a, p in zip(times[k], times[0])) for k in drafts})


def generate_rates(cfg, variables, prompts, drafts: list, repeats: int, new: int = NEW) -> dict:
    """Per K (0: plain): decode tokens/s (median), main forwards, and for K > 0 the ratio to plain, tokens per
    forward (the rows' mean), acceptance per prompt, tokens per step (plain's forwards / K's: the batch steps
    until its slowest row is done) and the step's cost inside `generate` (decode seconds per main forward, over
    plain's; median of the per-round ratios). speed-up = tokens per step / generate's step ratio, up to the
    rounds' spread."""
    run = lambda k: generate(cfg, variables, prompts, new, speculative=k > 0, drafts=max(k, 1),
                             max_len=max(map(len, prompts)) + new)
    plain, first = run(0)
    stats = {0: first}
    for k in drafts:
        out, stats[k] = run(k)
        assert out == plain, f"{k} drafts: speculative greedy output differs from plain greedy"
    rates, per_step = {k: [] for k in [0] + drafts}, {k: [] for k in [0] + drafts}
    for _ in range(repeats):
        for k in rates:
            out, st = run(k)
            rates[k].append(sum(len(o) - 1 for o in out) / st["decode_s"])
            per_step[k].append(st["decode_s"] / st["main_forwards"])
    ratio = lambda xs, k: statistics.median(a / p for a, p in zip(xs[k], xs[0]))
    return {k: {"tokens_per_s": statistics.median(r), "main_forwards": stats[k]["main_forwards"],
                **({"speedup": ratio(rates, k),
                    "tokens_per_forward": stats[k]["tokens_per_forward"],
                    "tokens_per_step": stats[0]["main_forwards"] / stats[k]["main_forwards"],
                    "acceptance_per_prompt": stats[k]["acceptance_per_prompt"],
                    "generate_step_over_plain": ratio(per_step, k),
                    "acceptance_rate": stats[k]["acceptance_rate"]} if k else {})} for k, r in rates.items()}


def plot(out_dir: str, rows: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        mine = [r for r in rows if r["run"] == run]
        for k in sorted({int(k) for r in mine for k in r["drafts"]}):
            ax.plot([r["batch"] for r in mine], [r["drafts"][k]["speedup"] for r in mine], "o-",
                    label=f"{k} draft(s)")
            ax.plot([r["batch"] for r in mine], [r["drafts"][k]["bound"] for r in mine], ":",
                    color=ax.lines[-1].get_color())
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows)")
        ax.set_ylabel("speculative / plain decode tokens/s")
        ax.set_title(f"{os.path.basename(run.rstrip('/'))}: {mine[0]['shape']}", fontsize=8)
        ax.legend(fontsize=8, title="measured (dotted: bound)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "spec_drafts.png"), dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="training run directories, comma-separated")
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--drafts", default="1,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=NEW)
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    argv = argv if argv is not None else __import__("sys").argv[1:]
    drafts = [int(k) for k in args.drafts.split(",")]
    rows = []
    for run_dir in args.runs.split(","):
        cfg, variables, label, rc, tokenizer = load_run(run_dir)
        params, rs = split_variables(variables)
        pool = validation_prompts(rc, tokenizer, POOL, args.prompt_tokens)
        shape = shape_text(model_shape(cfg, variables))
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = [pool[i % POOL] for i in range(b)]
            step_us, step_ratio = step_costs(cfg, params, rs, prompts, drafts, args.repeats + 2, args.new_tokens)
            gen = generate_rates(cfg, variables, prompts, drafts, args.repeats, args.new_tokens)
            for k in drafts:
                gen[k].update(step_us=step_us[k], step_over_plain=step_ratio[k],
                              bound=gen[k]["tokens_per_forward"] / step_ratio[k])
            rows.append({"run": label, "shape": shape, "batch": b, "plain_tokens_per_s": gen[0]["tokens_per_s"],
                         "plain_step_us": step_us[0], "drafts": {k: gen[k] for k in drafts}})
            print(f"{label} batch {b}: plain {gen[0]['tokens_per_s']:.0f} tok/s; " + "; ".join(
                f"K={k}: {gen[k]['speedup']:.2f}x (step {step_ratio[k]:.2f}, tok/fwd "
                f"{gen[k]['tokens_per_forward']:.2f}, bound {gen[k]['bound']:.2f})" for k in drafts), flush=True)
    lines = ["# Drafts per speculative step: one MTP draft, or the module chained for two and three", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} "
             f"({jax.devices()[0].device_kind}). Command: `python experiments/spec_drafts.py {' '.join(argv)}`. "
             f"Greedy, {args.new_tokens} new tokens per row after {args.prompt_tokens}-token validation-text "
             "prompts, one request per batch. Step: device microseconds per step "
             f"(calls of {CHUNK} steps, median of {args.repeats + 2} alternating repeats), K-draft step in plain "
             f"steps. Speed-up: median per-round ratio of decode tokens/s to plain ({args.repeats} alternating "
             "rounds after a warm-up; greedy outputs equal to plain in every case). Bound = tokens per forward / "
             "step ratio.", "",
             "| run | batch | plain tok/s | plain step us | " + " | ".join(
                 f"K={k}: step / plain, tok/fwd, bound, speed-up" for k in drafts) + " |",
             "|---|---|---|---|" + "---|" * len(drafts)]
    for r in rows:
        lines.append(f"| {os.path.basename(r['run'].rstrip('/'))} ({r['shape']}) | {r['batch']} | "
                     f"{r['plain_tokens_per_s']:.0f} | {r['plain_step_us']:.0f} | " + " | ".join(
                         f"{d['step_over_plain']:.2f}, {d['tokens_per_forward']:.2f}, {d['bound']:.2f}x, "
                         f"**{d['speedup']:.2f}x**" for d in (r["drafts"][k] for k in drafts)) + " |")
    k = drafts[0]
    lines += ["", f"Where the bound goes (K={k}). The bound divides the rows' mean tokens per forward by the step "
              f"programs' cost, each call {CHUNK} steps from the prompts' end ({args.prompt_tokens} cached "
              "tokens); `generate` steps until the batch's slowest row is done (tokens per step: plain's main "
              f"forwards / speculative's), at contexts growing to {args.prompt_tokens + args.new_tokens} tokens, "
              "with its host loop. speed-up = tokens per step / generate's step ratio.", "",
              "| run | batch | tok/fwd (rows' mean) | lowest prompt's acceptance | tok/step (the batch) | step / "
              "plain: programs | step / plain: in generate | bound | tok/step / generate's step | speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["drafts"][k]
        lines.append(f"| {os.path.basename(r['run'].rstrip('/'))} | {r['batch']} | {d['tokens_per_forward']:.2f} | "
                     f"{min(d['acceptance_per_prompt']):.2f} | {d['tokens_per_step']:.2f} | "
                     f"{d['step_over_plain']:.2f} | {d['generate_step_over_plain']:.2f} | "
                     f"{d['bound']:.2f}x | {d['tokens_per_step'] / d['generate_step_over_plain']:.2f}x | "
                     f"**{d['speedup']:.2f}x** |")
    write_results(args.out, "spec_drafts", lines, {"argv": argv, "rows": rows}, keep_from="## Reading")
    plot(args.out, rows)
    return {"rows": rows}


if __name__ == "__main__":
    main()
