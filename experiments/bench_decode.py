"""Decode speed: absorbed vs expanded MLA decoding against context length, and speculative (MTP draft) vs plain
decoding.

Part 1 (`--preset small` by default, random weights, batch 1, fp32 on CPU): tokens/s of one decode step at a
context of 128 .. 4096 cached tokens, for
  absorbed  `q_abs = q_nope W_UK` meets the cached latent directly (what generate() uses), and
  expanded  the cached latent is re-expanded to per-head keys/values with kv_b_proj at every step.
The cache is filled with random latents (its content does not change the work); one jitted step per
(context, form), warmed up, then the median over `--repeats` runs of `--steps` steps, with block_until_ready.

Part 2: greedy generate() with speculative=True vs False on one byte prompt (batch 1), median decode tokens/s of
`--repeats` runs after a warm-up run. Variables come from `--run-dir` (a training run directory: config.json +
orbax checkpoints/) if it exists, else `--variables-npz` (+ `--spec-preset`), else random weights of
`--spec-preset` (tiny); a random model's MTP drafts are almost never accepted, so the script also measures a
constructed model whose draft agrees with the main model on about `--agree` of the tokens (the paper reports
85-90% acceptance) to show what acceptance buys on this machine.

Part 3 (`--batch 1,4,8,16`): plain and speculative greedy generate() of the same model as part 2 on the same
lcm(batches) validation prompts at every batch size, in groups of one batch each (one request per group; rows
that accept different numbers of drafts stay in one batch), alternating rounds; decode tokens/s summed over
the rows, acceptance, and the median per-round ratio. Speculative decoding runs with the batch shrinking to the
rows still decoding (`shrink_batch=True`) and, for comparison, with the batch kept whole until its slowest row
is done.

Part 4 (`--queue Q`, 0 for none): the serving queue (`generate(..., batch_size=B)`, dsv3_jax/infer/queue.py):
for each B of `--queue-batch` (default: the part-3 batches), Q*B validation prompts through B slots, a slot
refilled with the next prompt as soon as its request is done, plain and speculative alternating rounds
(outputs checked equal); tokens/s over the whole queue (the refills' prefills included) and decode-only (the
prefills' time left out). Part 3 keeps measuring one request per batch, which waits for its slowest row.

`--batch-runs RUN2[,RUN3]` adds parts 3 and 4 for more trained runs, e.g. ones whose weights do not fit in the
CPU's caches (the bench preset's 16 experts per layer): there a decode step is bound by reading weights, as
serving a large model is, rather than by arithmetic, as the tiny preset's 19 MiB are (spec_cost.md, session 11).

Writes experiments/results/bench_decode.{md,png,json}; the last printed line is JSON with `tokens_per_forward`
and `speculative_speedup` (of the checkpoint, or of the random model when there is none).

    python experiments/bench_decode.py [--run-dir RUN] [--batch 1,4,8,16] [--batch-runs RUN2] [--queue 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import PRESETS, ModelConfig
from dsv3_jax.infer import generate, init_cache, split_variables
from dsv3_jax.infer.decode import jit_decode_step, round_up
from dsv3_jax.testing import random_variables
from bench_decode_plot import by_model, plot            # experiments/
from results_io import cpu_summary                      # experiments/

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPT = b"The model was trained on a small corpus of text, and "


# Part 1: absorbed vs expanded ----------------------------------------------------------------------------------

def filled_cache(cfg: ModelConfig, context: int, seed: int = 0):
    """A batch-1 cache of context + 16 slots whose first `context` slots hold random latents."""
    cache = init_cache(cfg, 1, round_up(context + 1, 16), mtp=False)
    rng = np.random.default_rng(seed)

    def fill(a):
        x = np.zeros(a.shape, np.float32)
        x[:, :, :context] = rng.standard_normal(x[:, :, :context].shape)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map(fill, cache)


def time_decode_steps(states: dict, params, rs, tok, pos, steps: int, repeats: int, before=None) -> None:
    """Append to each state's "times" the mean seconds of one decode step over `steps` calls, the states
    alternating over `repeats` rounds (the machine is shared and noisy). A state holds a jitted decode "step"
    (`jit_decode_step`'s signature) and its "cache" (donated, replaced by the new one); before(key), if given,
    runs before each state's calls."""
    for _ in range(repeats):
        for key, s in states.items():
            if before is not None:
                before(key)
            t0 = time.perf_counter()
            for _ in range(steps):
                logits, _, s["cache"] = s["step"](params, rs, s["cache"], tok, pos)
            jax.block_until_ready((logits, s["cache"]))
            s["times"].append((time.perf_counter() - t0) / steps)


def time_pair(cfg, params, rs, context: int, steps: int, repeats: int) -> list[dict]:
    """Absorbed and expanded steps at one context, timed alternately (A B A B: the machine is shared and noisy);
    per form the median over repeats of the mean step time, plus the median of the per-repeat ratios."""
    tok = jnp.array([[1]], jnp.int32)
    pos = jnp.array([[context]], jnp.int32)        # every step rewrites slot `context`: the context stays fixed
    forms = {}
    for absorbed in (True, False):
        step = jit_decode_step(cfg, absorbed)
        cache = filled_cache(cfg, context)
        t0 = time.perf_counter()
        logits, _, cache = step(params, rs, cache, tok, pos)
        jax.block_until_ready((logits, cache))
        forms[absorbed] = {"step": step, "cache": cache, "first_call_s": time.perf_counter() - t0, "times": []}
    time_decode_steps(forms, params, rs, tok, pos, steps, repeats)
    ratios = [e / a for a, e in zip(forms[True]["times"], forms[False]["times"])]
    out = []
    for absorbed in (True, False):
        med = statistics.median(forms[absorbed]["times"])
        out.append({"context": context, "form": "absorbed" if absorbed else "expanded", "step_ms": med * 1e3,
                    "min_step_ms": min(forms[absorbed]["times"]) * 1e3, "tokens_per_s": 1.0 / med,
                    "first_call_s": forms[absorbed]["first_call_s"], "expanded_over_absorbed": statistics.median(ratios)})
    return out


# Part 2: speculative vs plain ----------------------------------------------------------------------------------

def unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = jnp.asarray(value)
    return out


def load_run(run_dir: str):
    """(ModelConfig, variables, label, run config, tokenizer) from a training run directory, through the
    library's loader (checksummed restore of the newest good checkpoint)."""
    from dsv3_jax.infer.cli import load_run as load
    from dsv3_jax.train.checkpoint import load_run_config
    cfg, variables, tokenizer = load(run_dir)
    return cfg, variables, run_dir, load_run_config(run_dir), tokenizer


def validation_prompts(rc, tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, evenly spaced over the run's held-out validation tokens (the split
    its training loop evaluates on), so acceptance is measured on text the model did not train on."""
    from dsv3_jax.train.loop import run_split
    _, val = run_split(rc, tokenizer)
    starts = np.linspace(0, len(val) - length - 1, count).astype(int)
    return [[int(t) for t in val[s:s + length]] for s in starts]


def agreeing_variables(cfg: ModelConfig, variables: dict, agree: float, seed: int = 0) -> dict:
    """Variables whose MTP draft agrees with the main model on a fraction `agree` of the token ids.

    The first n = min(vocab, hidden) ids get one-hot embeddings, and the random blocks are small (std 0.006),
    so h^0_i ~ e_{t_i}; the head maps e_t to sigma(t) (a random permutation of those n ids), so the main model
    predicts sigma(t_i) and never leaves them. eh_proj feeds the MTP block e_{Q(t_{i+1})}, with Q the identity
    on a random `agree` fraction of the ids and a cyclic shift among the rest: the draft sigma(Q(t_{i+1})) is
    right exactly when Q fixes t_{i+1}."""
    d, x = cfg.hidden_size, cfg.vocab_size
    n = min(d, x)
    v = jax.tree_util.tree_map(np.array, variables)
    rng = np.random.default_rng(seed)
    sigma = rng.permutation(n)
    p = v["params"]
    emb = np.zeros((x, d), np.float32)
    emb[np.arange(n), np.arange(n)] = 1.0
    p["embedding"] = emb
    head = np.zeros((d, x), np.float32)
    head[np.arange(n), sigma] = 1.0
    p["lm_head"] = head
    q = np.arange(n)
    moved = rng.permutation(n)[:int(round((1 - agree) * n))]
    q[moved] = np.roll(moved, 1)
    eh = np.zeros((2 * d, d), np.float32)
    eh[np.arange(n), q] = 1.0
    p["mtp_0"]["eh_proj"] = eh
    return jax.tree_util.tree_map(jnp.asarray, v)


def model_shape(cfg: ModelConfig, variables) -> dict:
    """What decides whether a decode step is bound by weight reads: layers, routed experts, weight MiB."""
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(variables["params"]))
    return {"layers": cfg.num_hidden_layers, "routed_experts": cfg.n_routed_experts,
            "weights_mib": round(nbytes / 2 ** 20, 1)}


def shape_text(r: dict) -> str:
    return f"{r['layers']} layers, {r['routed_experts']} routed experts, {r['weights_mib']:.0f} MiB of fp32 weights"


def print_row(r: dict) -> None:
    print(f"  {r['model']}: plain {r['plain_tokens_per_s']:.1f} tok/s, speculative {r['spec_tokens_per_s']:.1f} "
          f"tok/s, acceptance {r['acceptance_rate']:.2f}, tokens/forward {r['tokens_per_forward']:.2f}, "
          f"speedup {r['speedup']:.2f}x", flush=True)


def compare(cfg, variables, prompts, new_tokens, repeats, label) -> dict:
    """Plain and speculative greedy generation of every prompt (batch 1 each, one cache size so that all
    share compiled steps), warmed up, then `repeats` alternating rounds. Decode tokens/s of a round = decoded
    tokens over decode seconds summed over the prompts; speedup = median of the per-round ratios."""
    max_len = max(len(p) for p in prompts) + new_tokens
    run = lambda p, spec: generate(cfg, variables, [p], new_tokens, speculative=spec, max_len=max_len)

    def round_(spec):
        outs, stats = zip(*[run(p, spec) for p in prompts])
        rate = sum(s["new_tokens"] - 1 for s in stats) / sum(s["decode_s"] for s in stats)
        return [o[0] for o in outs], stats, rate

    run(prompts[0], False), run(prompts[0], True)                                 # warm-up: compiles
    plain_rates, spec_rates = [], []
    for _ in range(repeats):
        plain_out, plain_stats, r = round_(False)
        plain_rates.append(r)
        spec_out, spec_stats, r = round_(True)
        spec_rates.append(r)
        assert spec_out == plain_out, "speculative greedy output differs from plain greedy"
    drafts = sum(s["drafts"] for s in spec_stats)
    accepted = sum(s["accepted"] for s in spec_stats)
    return {"model": label, "prompts": len(prompts), "plain_tokens_per_s": statistics.median(plain_rates),
            "spec_tokens_per_s": statistics.median(spec_rates), "acceptance_rate": accepted / drafts,
            "tokens_per_forward": 1 + accepted / drafts,
            "plain_forwards": sum(s["main_forwards"] for s in plain_stats),
            "spec_forwards": sum(s["main_forwards"] for s in spec_stats),
            "acceptance_per_prompt": [round(s["acceptance_rate"], 3) for s in spec_stats],
            "speedup": statistics.median(b / a for a, b in zip(plain_rates, spec_rates)),
            "prompt": prompts[0], "output": plain_out[0]}


# Part 3's three ways to decode a batch: (speculative, shrink_batch).
BATCH_MODES = {"plain": (False, True), "spec": (True, True), "spec_kept": (True, False)}


def compare_batches(cfg, variables, prompts, batches, new_tokens, repeats) -> list[dict]:
    """Plain and speculative greedy generation of all the prompts in groups of b, each group ONE batch (one
    request), for each b in `batches` (len(prompts) a multiple of each b): warmed up, then `repeats` rounds
    with the modes alternating (outputs checked equal). Every batch size decodes the same prompts, so the
    rows compare the same text; one prompt's acceptance moves a single batch's ratio by several percent.
    Speculative decoding runs twice: with the batch shrinking to the rows still decoding
    (`shrink_batch=True`, which the warm-up compiles for), and with the batch kept whole until its slowest
    row is done; plain decoding's rows all finish together, so shrinking changes nothing there. Decode
    tokens/s of a round = tokens emitted after the prefills, over all groups, / their decode seconds."""
    max_len = max(len(p) for p in prompts) + new_tokens
    rows = []
    for b in batches:
        assert len(prompts) % b == 0, (len(prompts), b)
        groups = [prompts[i:i + b] for i in range(0, len(prompts), b)]
        run = lambda group, mode: generate(cfg, variables, group, new_tokens, speculative=BATCH_MODES[mode][0],
                                           shrink_batch=BATCH_MODES[mode][1], max_len=max_len)
        plain_out = [run(g, "plain")[0] for g in groups]                          # warm-up: compiles
        for mode in ("spec", "spec_kept"):
            assert [run(g, mode)[0] for g in groups] == plain_out, "speculative greedy output differs from plain"
        rates, stats = {m: [] for m in BATCH_MODES}, {}
        for _ in range(repeats):
            for mode in BATCH_MODES:
                outs, stats[mode] = zip(*[run(g, mode) for g in groups])
                rates[mode].append(sum(len(o) - 1 for out in outs for o in out)
                                   / sum(st["decode_s"] for st in stats[mode]))
                assert list(outs) == plain_out, f"{mode}: greedy output differs from plain greedy"
        ratio = lambda m: statistics.median(t / p for p, t in zip(rates["plain"], rates[m]))
        spec = stats["spec"]
        drafts, accepted = sum(st["drafts"] for st in spec), sum(st["accepted"] for st in spec)
        rows.append({"batch": b, "groups": len(groups), "plain_tokens_per_s": statistics.median(rates["plain"]),
                     "spec_tokens_per_s": statistics.median(rates["spec"]),
                     "spec_kept_tokens_per_s": statistics.median(rates["spec_kept"]),
                     "acceptance_rate": accepted / drafts, "tokens_per_forward": 1 + accepted / drafts,
                     "spec_forwards": sum(st["main_forwards"] for st in spec),
                     "batch_sizes": spec[0]["batch_sizes"],
                     "group_batch_sizes": [st["batch_sizes"] for st in spec],
                     "speedup": ratio("spec"), "speedup_kept": ratio("spec_kept")})
        r = rows[-1]
        print(f"  batch {b:3d} ({len(groups)} groups): plain {r['plain_tokens_per_s']:.1f} tok/s, speculative "
              f"{r['spec_tokens_per_s']:.1f} tok/s (batch {sizes_text(r)}), acceptance {r['acceptance_rate']:.2f}, "
              f"speedup {r['speedup']:.2f}x (batch kept: {r['speedup_kept']:.2f}x)", flush=True)
    return rows


def sizes_text(r: dict) -> str:
    """The batch sizes speculative decoding ran at: per group, the distinct sequences ('8->1, 8->2')."""
    seqs = r.get("group_batch_sizes", [r.get("batch_sizes", [r["batch"]])])
    return ", ".join(dict.fromkeys("->".join(map(str, q)) for q in seqs))


def compare_queue(cfg, variables, prompts, batches, per_slot, new_tokens, repeats) -> list[dict]:
    """Plain and speculative greedy generation of per_slot * b prompts through b slots (the serving queue), for
    each b in `batches`: warmed up, then `repeats` rounds with plain and speculative alternating (outputs
    checked equal). Tokens/s of a run: all new tokens / the queue's seconds (prefills included), and / its
    decode seconds (prefills left out)."""
    max_len = max(len(p) for p in prompts) + new_tokens
    rows = []
    for b in batches:
        queue = [prompts[i % len(prompts)] for i in range(per_slot * b)]
        run = lambda spec: generate(cfg, variables, queue, new_tokens, speculative=spec, max_len=max_len, batch_size=b)
        run(False), run(True)                                                      # warm-up: compiles
        rates = {(spec, k): [] for spec in (False, True) for k in ("tokens_per_s", "decode_tokens_per_s")}
        for _ in range(repeats):
            for spec in (False, True):
                out, stats = run(spec)
                for k in ("tokens_per_s", "decode_tokens_per_s"):
                    rates[(spec, k)].append(stats[k])
                if spec:
                    assert out == plain_out, "speculative greedy output differs from plain greedy (queue)"
                    spec_stats = stats
                else:
                    plain_out, plain_stats = out, stats
        ratio = lambda k: statistics.median(t / p for p, t in zip(rates[(False, k)], rates[(True, k)]))
        rows.append({"batch": b, "requests": len(queue),
                     "plain_tokens_per_s": statistics.median(rates[(False, "tokens_per_s")]),
                     "spec_tokens_per_s": statistics.median(rates[(True, "tokens_per_s")]),
                     "plain_decode_tokens_per_s": statistics.median(rates[(False, "decode_tokens_per_s")]),
                     "spec_decode_tokens_per_s": statistics.median(rates[(True, "decode_tokens_per_s")]),
                     "acceptance_rate": spec_stats["acceptance_rate"],
                     "tokens_per_forward": spec_stats["tokens_per_forward"],
                     "plain_forwards": plain_stats["main_forwards"], "spec_forwards": spec_stats["main_forwards"],
                     "plain_prefill_calls": plain_stats["prefill_calls"],
                     "spec_prefill_calls": spec_stats["prefill_calls"],
                     "speedup": ratio("tokens_per_s"), "decode_speedup": ratio("decode_tokens_per_s")})
        r = rows[-1]
        print(f"  queue, batch {b:3d} ({len(queue)} requests): plain {r['plain_tokens_per_s']:.1f} tok/s, "
              f"speculative {r['spec_tokens_per_s']:.1f} tok/s, speedup {r['speedup']:.2f}x (decode only "
              f"{r['decode_speedup']:.2f}x), acceptance {r['acceptance_rate']:.2f}", flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small", help="config for part 1 (default small)")
    ap.add_argument("--contexts", default="128,256,512,1024,2048,4096")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--run-dir", help="training run directory (config.json + checkpoints/) for part 2")
    ap.add_argument("--variables-npz", help="npz of variables, keys like params/embedding (part 2)")
    ap.add_argument("--spec-preset", default="tiny", help="config for part 2 without --run-dir (default tiny)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8, help="validation-text prompts with --run-dir")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--agree", type=float, default=0.85, help="draft agreement of the constructed models")
    ap.add_argument("--agree-presets", default="tiny,small",
                    help="presets of the constructed agreeing-draft models ('' for none)")
    ap.add_argument("--batch", default="1,4,8,16", help="batch sizes of the part-3 table ('' for none)")
    ap.add_argument("--batch-runs", default="",
                    help="more training run directories, each with its own part-3 and part-4 tables (comma-separated)")
    ap.add_argument("--queue", type=int, default=0,
                    help="part 4: this many requests per slot through the serving queue (0: no part 4)")
    ap.add_argument("--queue-batch", default=None, help="slots of the part-4 queues (default: --batch)")
    ap.add_argument("--quick", action="store_true", help="contexts 128,1024 and fewer repeats (smoke test)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from bench_decode.json")
    args = ap.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "bench_decode.json")) as f:
            saved = json.load(f)
        contexts = sorted({r["context"] for r in saved["decode"]})
        plot(args.out, saved["summary"]["preset"], contexts, saved["decode"], saved["speculative"],
             saved.get("batches", ()), saved.get("queue", ()))
        return saved["summary"]
    if args.quick:
        args.contexts, args.steps, args.repeats, args.new_tokens = "128,1024", 2, 2, 32
        args.agree_presets = "tiny"
        args.batch = ",".join(args.batch.split(",")[:2])
    contexts = [int(c) for c in args.contexts.split(",")]
    for run in [r for r in args.batch_runs.split(",") if r]:
        if not os.path.exists(os.path.join(run, "config.json")):
            raise SystemExit(f"--batch-runs: {run} is not a training run directory (no config.json)")
    os.makedirs(args.out, exist_ok=True)

    # Part 1.
    cfg = PRESETS[args.preset]
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, max(contexts) + 64), dtype="float32")
    t0 = time.perf_counter()
    params, rs = split_variables(random_variables(cfg, 0))
    print(f"part 1: preset {args.preset} ({sum(a.size for a in jax.tree_util.tree_leaves(params)) / 1e6:.0f}M "
          f"params, random) ready in {time.perf_counter() - t0:.1f}s", flush=True)
    rows = []
    for c in contexts:
        pair = time_pair(cfg, params, rs, c, args.steps, args.repeats)
        rows += pair
        a, e = pair
        print(f"  context {c:5d}: absorbed {a['step_ms']:8.2f} ms/step ({a['tokens_per_s']:6.1f} tok/s), expanded "
              f"{e['step_ms']:8.2f} ms/step ({e['tokens_per_s']:6.1f} tok/s), expanded/absorbed "
              f"{a['expanded_over_absorbed']:.2f}x", flush=True)
    del params, rs

    # Part 2.
    note = ""
    prompts = [list(PROMPT)]      # bytes < 128: valid ids for the byte vocabulary and the constructed models
    if args.run_dir and os.path.exists(args.run_dir):
        scfg, variables, label, run_cfg, tokenizer = load_run(args.run_dir)
        prompts = validation_prompts(run_cfg, tokenizer, args.prompts, args.prompt_tokens)
    elif args.variables_npz:
        scfg = PRESETS[args.spec_preset]
        variables = unflatten(dict(np.load(args.variables_npz)))
        label = args.variables_npz
    else:
        scfg = PRESETS[args.spec_preset]
        variables = random_variables(scfg, 0)
        label = f"random {args.spec_preset}"
        note = ("no checkpoint given (--run-dir / --variables-npz): random weights, whose MTP drafts are almost "
                "never accepted")
        if args.run_dir:
            note += f"; --run-dir {args.run_dir} does not exist"
    print(f"part 2: {label}", flush=True)
    spec_rows = [compare(scfg, variables, prompts, args.new_tokens, args.repeats, label)]
    print_row(spec_rows[-1])
    for name in [n for n in args.agree_presets.split(",") if n]:
        acfg = PRESETS[name].replace(dtype="float32")
        agree_vars = agreeing_variables(acfg, random_variables(acfg, 1), args.agree)
        spec_rows.append(compare(acfg, agree_vars, [list(PROMPT)], args.new_tokens, args.repeats,
                                 f"constructed {name}, draft agrees on {args.agree:.0%} of ids"))
        print_row(spec_rows[-1])
        del agree_vars

    # Parts 3 and 4, for the run of part 2 and each of --batch-runs.
    batches = [int(b) for b in args.batch.split(",") if b]
    qbatches = [int(b) for b in (args.batch if args.queue_batch is None else args.queue_batch).split(",") if b]
    queue_batches = qbatches if args.queue > 0 else []
    main_source = (run_cfg, tokenizer) if args.run_dir and os.path.exists(args.run_dir) else None
    more_runs = [r for r in args.batch_runs.split(",") if r] if batches or queue_batches else []
    batch_rows, queue_rows = [], []
    for run in [None] + more_runs:                                  # None: part 2's; the others loaded in turn
        if run is None:
            bcfg, bvars, blabel, source = scfg, variables, label, main_source
        else:
            bcfg, bvars, blabel, rc, tok = load_run(run)
            source = (rc, tok)
        # validation text spread over the split (trained runs), the same prompts at every batch size
        texts = lambda n: validation_prompts(*source, n, args.prompt_tokens) if source else prompts
        at = lambda ps, n: [ps[i % len(ps)] for i in range(n)]
        if batches:
            count = math.lcm(*batches)                                          # a multiple of every batch
            print(f"part 3: batches {batches}, {count} prompts, {blabel}", flush=True)
            more = compare_batches(bcfg, bvars, at(texts(count), count), batches, args.new_tokens, args.repeats)
            batch_rows += [dict(r, model=blabel, **model_shape(bcfg, bvars)) for r in more]
        if queue_batches:
            count = args.queue * max(queue_batches)
            print(f"part 4: queues of {args.queue} requests per slot, slots {queue_batches}, {blabel}", flush=True)
            more = compare_queue(bcfg, bvars, at(texts(count), count), queue_batches, args.queue, args.new_tokens,
                                 args.repeats)
            queue_rows += [dict(r, model=blabel, **model_shape(bcfg, bvars)) for r in more]
        del bvars

    # Report.
    cpu = cpu_summary() if jax.default_backend() == "cpu" else None     # decode rates move with the CPU
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f", {cpu}" if cpu else "") + " (shared: 1-min "
               f"load average {os.getloadavg()[0]:.1f} at the end), jax {jax.__version__} ({jax.default_backend()})")
    lines = ["# Decode benchmark", "", f"Machine: {machine}. fp32, greedy; batch 1 unless a table says otherwise.", "",
             f"## Absorbed vs expanded MLA decode ({args.preset} preset, {cfg.num_hidden_layers} layers, "
             f"{cfg.num_attention_heads} heads, kv_lora_rank {cfg.kv_lora_rank}, random weights)", "",
             "One jitted decode step (all layers, MoE and head included) at a given number of cached tokens; "
             f"after a warm-up, {args.repeats} runs of {args.steps} steps per form, the two forms alternating; "
             "median step time (min in brackets) and the median of the per-run ratios.", "",
             "| context | absorbed ms/step | absorbed tok/s | expanded ms/step | expanded tok/s | absorbed speedup |",
             "|---|---|---|---|---|---|"]
    by = {(r["context"], r["form"]): r for r in rows}
    for c in contexts:
        a, e = by[(c, "absorbed")], by[(c, "expanded")]
        lines.append(f"| {c} | {a['step_ms']:.1f} ({a['min_step_ms']:.1f}) | {a['tokens_per_s']:.1f} | "
                     f"{e['step_ms']:.1f} ({e['min_step_ms']:.1f}) | {e['tokens_per_s']:.1f} | "
                     f"{a['expanded_over_absorbed']:.2f}x |")
    lines += ["", f"## Speculative (MTP module 1 as draft) vs plain greedy decoding ({args.new_tokens} new tokens, "
              f"batch 1, each prompt alone; after a warm-up, {args.repeats} rounds over all prompts, plain and "
              "speculative alternating; median decode tokens/s and the median of the per-round ratios; identical "
              "outputs checked). A trained run is prompted with text from its held-out validation split.", "",
              "| model | prompts | plain tok/s | speculative tok/s | acceptance | tokens per main forward | main forwards "
              "(plain / spec) | speedup |", "|---|---|---|---|---|---|---|---|"]
    for r in spec_rows:
        lines.append(f"| {r['model']} | {r['prompts']} | {r['plain_tokens_per_s']:.1f} | {r['spec_tokens_per_s']:.1f} | "
                     f"{r['acceptance_rate']:.2f} | {r['tokens_per_forward']:.2f} | {r['plain_forwards']} / "
                     f"{r['spec_forwards']} | {r['speedup']:.2f}x |")
    for model, group in by_model(batch_rows).items():
        count = group[0]["batch"] * group[0].get("groups", 1)
        lines += ["", f"## Plain and speculative greedy decoding by batch ({model}: {shape_text(group[0])}; "
                  f"{args.new_tokens} new tokens per row; the same {count} validation-text prompts at every batch "
                  f"size, in groups of one batch each, one request per group; after a warm-up, {args.repeats} "
                  "rounds, the three modes alternating; decode tokens/s over all groups' rows, medians, and the "
                  "median of the per-round ratios; identical outputs checked). Speculative: the batch shrinks to "
                  "the rows still decoding (`shrink_batch=True`; the sizes it ran at are listed); batch kept: "
                  "the whole batch steps until its slowest row is done.", "",
                  "| batch | plain tok/s | speculative tok/s | batch sizes | acceptance | tokens per main forward | "
                  "speculative / plain | batch kept: tok/s | batch kept / plain |", "|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            kept = (f"{r['spec_kept_tokens_per_s']:.1f} | {r['speedup_kept']:.2f}x" if "speedup_kept" in r
                    else "- | -")
            lines.append(f"| {r['batch']} | {r['plain_tokens_per_s']:.1f} | {r['spec_tokens_per_s']:.1f} | "
                         f"{sizes_text(r)} | {r['acceptance_rate']:.2f} | {r['tokens_per_forward']:.2f} | "
                         f"**{r['speedup']:.2f}x** | {kept} |")
    for model, group in by_model(queue_rows).items():
        lines += ["", f"## Serving queue: plain and speculative greedy decoding with slots refilled ({model}: "
                  f"{shape_text(group[0])}; {group[0]['requests'] // group[0]['batch']} requests per slot, "
                  f"{args.new_tokens} new tokens per request, validation-text prompts; `generate(..., "
                  "batch_size=B)`: a slot takes the next request as soon as its own is done, the waiting prompts "
                  "prefilled a batch at a time; after a warm-up, "
                  f"{args.repeats} rounds, plain and speculative alternating; median tokens/s over the whole queue "
                  "(all new tokens / the queue's wall time, every prefill included) and decode-only (prefill time "
                  "left out), and the medians of the per-round ratios; identical outputs checked). This is the "
                  "serving case; the table above is one request per batch, which waits for its slowest row.", "",
                  "| slots (batch) | requests | plain tok/s | speculative tok/s | speculative / plain | "
                  "plain decode-only tok/s | speculative decode-only tok/s | decode-only speculative / plain | "
                  "acceptance | main forwards (plain / spec) | prefill calls (plain / spec) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            lines.append(f"| {r['batch']} | {r['requests']} | {r['plain_tokens_per_s']:.1f} | "
                         f"{r['spec_tokens_per_s']:.1f} | **{r['speedup']:.2f}x** | "
                         f"{r['plain_decode_tokens_per_s']:.1f} | {r['spec_decode_tokens_per_s']:.1f} | "
                         f"{r['decode_speedup']:.2f}x | {r['acceptance_rate']:.2f} | {r['plain_forwards']} / "
                         f"{r['spec_forwards']} | {r.get('plain_prefill_calls', '-')} / "
                         f"{r.get('spec_prefill_calls', '-')} |")
    if note:
        lines += ["", f"Note: {note}."]
    if label != f"random {args.spec_preset}" and scfg.vocab_size == 256:
        as_text = lambda ids: bytes(t for t in ids if t < 256).decode("utf-8", "replace")
        lines += ["", f"Greedy continuation of {as_text(spec_rows[0]['prompt'])!r} by {label}: "
                  f"{as_text(spec_rows[0]['output'])!r}", "",
                  f"Acceptance per prompt: {spec_rows[0]['acceptance_per_prompt']}"]
    with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    plot(args.out, args.preset, contexts, rows, spec_rows, batch_rows, queue_rows)

    main_row = spec_rows[0]
    summary = {
        "preset": args.preset,
        **({"cpu": cpu} if cpu else {}),
        "absorbed_tokens_per_s": {str(c): round(by[(c, "absorbed")]["tokens_per_s"], 2) for c in contexts},
        "expanded_tokens_per_s": {str(c): round(by[(c, "expanded")]["tokens_per_s"], 2) for c in contexts},
        "absorbed_speedup_at_max_context": round(by[(contexts[-1], "absorbed")]["expanded_over_absorbed"], 2),
        "speculative_model": main_row["model"],
        "acceptance_rate": round(main_row["acceptance_rate"], 3),
        "tokens_per_forward": round(main_row["tokens_per_forward"], 3),
        "speculative_speedup": round(main_row["speedup"], 3),
    }
    summary["constructed"] = {r["model"].split(",")[0]: {
        "acceptance_rate": round(r["acceptance_rate"], 3), "tokens_per_forward": round(r["tokens_per_forward"], 3),
        "speculative_speedup": round(r["speedup"], 3)} for r in spec_rows[1:]}
    summary["batches"] = {model: {str(r["batch"]): {k: round(r[k], 3) for k in (
        "plain_tokens_per_s", "spec_tokens_per_s", "acceptance_rate", "speedup")} for r in group}
        for model, group in by_model(batch_rows).items()}
    summary["queue"] = {model: {str(r["batch"]): {k: round(r[k], 3) for k in (
        "plain_tokens_per_s", "spec_tokens_per_s", "speedup", "decode_speedup", "acceptance_rate")} for r in group}
        for model, group in by_model(queue_rows).items()}
    if note:
        summary["note"] = note
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump({"summary": summary, "decode": rows, "speculative": spec_rows, "batches": batch_rows,
                   "queue": queue_rows}, f,
                  indent=2)
    print("\n".join(lines))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
