"""Where a speculative decoding step's time goes, and the speed-up it can reach on this machine.

A self-speculative step (dsv3_jax/infer/speculative.py) runs MTP module 1 on two positions (the draft) and the
main model on two tokens (the verification); plain decoding runs the main model on one token. With draft
acceptance a, a step emits 1 + a tokens, so against plain decoding

    speed-up = (1 + a) * c1 / (c2 + cm + overhead)  <=  (1 + a) / (c2/c1 + cm/c1)

where c1 / c2 are the device times of a one- / two-token main-model pass (head included) and cm that of the
MTP draft pass (two positions write their latents, the last one alone runs attention, FFN and head, as
speculative.py drafts). This script measures c1, c2 and cm on the device (N passes inside one `lax.fori_loop`,
one host round trip, `block_until_ready`, after compiling; the passes alternate over several repeats; medians),
at batch 1 and batch 8, and prints the bound at the measured acceptance and at a = 1.

It also times the whole steps as decoding runs them: a device call of CHUNK plain steps (`jit_decode_steps`)
and one of CHUNK speculative steps (`jit_speculative_steps`: draft, verify, accept, state updates), after a
prefill of random prompts, for the few-token expert rule before this session (`few_local`: CAPACITY_ROWS = 0)
and now (`capacity_local`); spec step / plain step is the ratio the tokens per step must beat. The speculative
step is the greedy-only one greedy requests run; it is also timed against the step that picks its rule at
run time (lax.cond on the traced temperature), which every request ran before session 9. With
--profile-batch, a jax.profiler trace of those calls splits each step into parts (each XLA op's exclusive
time, mapped to the model code through the compiled HLO's op_name metadata, as experiments/profile_train.py
does): the table of what a speculative step's time is made of.

Rows of a batch get different tokens (each pass feeds back argmax + a per-row offset), so the routed experts
see a decode step's spread of experts rather than one routing repeated B times.

It also times the matmul kernels alone: a chain of four [256,768] x [768,256] MLP pairs (the tiny preset's
dense-MLP shapes) on 1 and on 2 rows, in XLA and, when torch is installed, in torch. A 2-row product that
costs as much as a 1-row one is what lets speculation pay off; the ratio shows how far this machine's kernels
are from that.

With --chain (a trained --run-dir): whether a second draft per step would pay. MTP module 1 chained on its own
output drafts d2 after d1, and the main model verifies [t_L, d1, d2] in one pass: the acceptance of d2 given d1
on validation text, the three-token verify and the two MTP passes' costs, and the bounds of one and two drafts.

    python experiments/spec_cost.py [--run-dir RUN] [--acceptance A] [--batches 1,8,16] [--profile-batch 8]
    python experiments/spec_cost.py --run-dir RUN --chain [--batches 1,4,8,16]
Writes experiments/results/spec_cost.{md,json} (--chain: spec_cost_chain.{md,json}); the last printed line is
JSON.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import functools
import glob
import gzip
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import PRESETS
from dsv3_jax.infer import init_cache, split_variables
from dsv3_jax.infer.decode import (CHUNK, decode_params, forward, jit_decode_steps, layout, main_logits,
                                   mtp_forward, prefill)
from dsv3_jax.infer.request import GenerationRequest, start_request
from dsv3_jax.infer.speculative import jit_speculative_steps, start_state
from dsv3_jax.model import dispatch
from dsv3_jax.testing import random_variables
from profile_train import op_names
from results_io import write_results

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONTEXT = 176      # cached tokens the passes attend to (a 48-token prompt + 128 new, as in bench_decode)
PROMPT, NEW = 48, 128
SLOTS = layout([[0] * PROMPT], NEW, CONTEXT)[1]        # bench_decode's cache size for those requests
RULES = {"few_local": 0, "capacity_local": dispatch.CAPACITY_ROWS}      # the few-token rule, before / now
CURRENT = "capacity_local"
PASSES = ("draft pass", "verify pass", "both passes", "draft twice", "verify twice")
RUN_TIME_RULE = "run-time rule"    # the speculative step choosing greedy or sampling by lax.cond, as before session 9


def pass_fn(cfg, kind: str, batch: int, tokens: int, n: int):
    """jit(params, rs, cache) -> ids: n passes of `kind` ('main' or 'mtp') over `tokens` new tokens per row,
    each pass feeding its argmax (plus a per-row offset, so rows differ) to the next (so none can be skipped),
    in one fori_loop."""
    offset = (31 * jnp.arange(batch, dtype=jnp.int32)[:, None] + 7 * jnp.arange(tokens, dtype=jnp.int32))

    def fn(params, rs, cache):
        def body(i, carry):
            cache, tok = carry
            tok = (tok + offset) % cfg.vocab_size
            pos = jnp.broadcast_to(CONTEXT + jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
            if kind == "main":
                h0, cache = forward(cfg, params, rs, cache, tok, pos)
                logits = main_logits(cfg, params, h0)
            else:
                h = jnp.broadcast_to(params["embedding"][tok], tok.shape + (cfg.hidden_size,))
                logits, _, cache = mtp_forward(cfg, params, rs, cache, h, tok, pos, k=0, outputs_from=tokens - 1)
                logits = jnp.concatenate([logits] * tokens, axis=1)             # same shape as the main pass
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)
        return jax.lax.fori_loop(0, n, body, (cache, jnp.zeros((batch, tokens), jnp.int32)))[1]
    return jax.jit(fn)


def pass_costs(cfg, params, rs, batch: int, n: int, repeats: int,
               passes=(("main", 1), ("main", 2), ("mtp", 2))) -> dict:
    """Median device microseconds per pass of each (kind, tokens) in `passes` at `batch` rows, keyed
    'main_1', 'mtp_2', ..."""
    cache = init_cache(cfg, batch, SLOTS)
    fns = {f"{kind}_{t}": pass_fn(cfg, kind, batch, t, n) for kind, t in passes}
    for f in fns.values():
        f(params, rs, cache).block_until_ready()                                  # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(params, rs, cache).block_until_ready()
            times[k].append((time.perf_counter() - t0) / n * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def one_pass_step(which: str):
    """A speculative step cut down to its passes, same signature as `speculative_step`: the MTP draft ('draft
    pass'), the two-token main forward and head ('verify pass'), or both ('both passes', the verify taking the
    draft's argmax as its second token): greedy, no acceptance, sampling or state updates. 'draft twice' /
    'verify twice': that pass run twice in one step (the second fed the first's output): whether a step
    doing more of the same work costs in proportion, against 'both passes', which mixes two weight sets."""
    if which.endswith("twice"):
        once = one_pass_step(which.split()[0] + " pass")

        def twice(cfg, params, rs, cache, st, active, sampling, step):
            st, cache, out = once(cfg, params, rs, cache, st, active, sampling, step)
            return once(cfg, params, rs, cache, st, active, sampling, step)
        return twice

    def step(cfg, params, rs, cache, st, active, sampling, step):
        second = st.toks[:, 0]
        if which in ("draft pass", "both passes"):
            pos = jnp.stack([st.length - 2, st.length - 1], axis=1)
            logits, _, cache = mtp_forward(cfg, params, rs, cache, st.hs, st.toks, pos, k=0,
                                           key_valid=pos >= 0, outputs_from=1)
            second = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        if which in ("verify pass", "both passes"):
            pos = jnp.stack([st.length, st.length + 1], axis=1)
            h0, cache = forward(cfg, params, rs, cache, jnp.stack([st.toks[:, -1], second], axis=1), pos)
            logits = main_logits(cfg, params, h0)
        tok = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
        toks = st.toks.at[:, -1].set(tok)
        return st._replace(toks=toks), cache, (toks, (tok == st.toks[:, -1]).astype(jnp.int32))
    return step


def chunk_programs(cfg, params, rs, batch: int, seed: int = 0) -> dict:
    """{(kind, rule): run()} for kind plain / speculative and each rule in RULES, plus the speculative step's
    two passes alone ('draft pass', 'verify pass') under the current rule: run() makes one device call of
    CHUNK steps from the same state (a prefill of `batch` random prompts), compiled under that rule.
    run.hlo() gives the program's compiled HLO text."""
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(0, cfg.vocab_size, PROMPT)] for _ in range(batch)]
    req = GenerationRequest(prompts, NEW, max_len=CONTEXT)
    active = jnp.ones((batch,), bool)
    plain, spec = start_request(cfg, params, rs, req, mtp=False), start_request(cfg, params, rs, req, mtp=True)
    rows = np.arange(batch)
    state = start_state(spec.lengths, spec.tokens, spec.tok, spec.prefill.h_tail, 1)
    args = {"plain": lambda c: (params, rs, c, plain.tok, jnp.asarray(plain.lengths), active, plain.sampling, 1,
                                CHUNK),
            "speculative": lambda c: (params, rs, c, state, active, spec.sampling, 1, CHUNK)}
    progs = {}
    builds = {"plain": lambda: jit_decode_steps.__wrapped__(cfg, True, CHUNK),
              "speculative": lambda: jit_speculative_steps.__wrapped__(cfg, CHUNK, greedy_only=True),
              RUN_TIME_RULE: lambda: jit_speculative_steps.__wrapped__(cfg, CHUNK),
              **{p: lambda p=p: jit_speculative_steps.__wrapped__(cfg, CHUNK, one_pass_step(p)) for p in PASSES}}
    for rule, rows_limit in RULES.items():
        for kind, build in builds.items():
            if kind in PASSES + (RUN_TIME_RULE,) and rule != CURRENT:
                continue
            start = plain if kind == "plain" else spec
            make = args["plain" if kind == "plain" else "speculative"]
            # A fresh jitted function, called as `generate` calls its steps (a `Compiled` object's own
            # __call__ adds a host overhead per call that would pass for step time: session 12's reading).
            fn = build()
            box = {"cache": jax.tree.map(jnp.copy, start.cache)}

            def run(fn=fn, box=box, make=make):
                out = fn(*make(box["cache"]))                       # the cache is donated: keep the new one
                box["cache"] = out[-2]
                jax.block_until_ready(out[-1])
            with capacity_rule(rows_limit):                         # traced at the first call
                run()
            run.hlo = functools.partial(compiled_text, fn, make, box, rows_limit)
            progs[(kind, rule)] = run
    return progs


@contextlib.contextmanager
def capacity_rule(rows_limit: int):
    """dispatch.CAPACITY_ROWS (the few-token expert rule, read at trace time) set while inside."""
    saved, dispatch.CAPACITY_ROWS = dispatch.CAPACITY_ROWS, rows_limit
    try:
        yield
    finally:
        dispatch.CAPACITY_ROWS = saved


def compiled_text(fn, make, box, rows_limit: int) -> str:
    """The compiled HLO text of a program of chunk_programs, compiled again under its rule (for the op names)."""
    with capacity_rule(rows_limit):
        return fn.lower(*make(box["cache"])).compile().as_text()


def step_costs(progs: dict, repeats: int, calls: int = 5) -> tuple[dict, dict]:
    """Median device microseconds per step of each program, the programs alternating over `repeats`; and per
    rule the median over repeats of that repeat's speculative / plain ratio (steadier on a shared machine)."""
    for run in progs.values():
        run()
    times = {k: [] for k in progs}
    for _ in range(repeats):
        for k, run in progs.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times[k].append((time.perf_counter() - t0) / (calls * CHUNK) * 1e6)
    ratios = {rule: statistics.median(s / p for s, p in zip(times[("speculative", rule)], times[("plain", rule)]))
              for rule in RULES}
    return {k: statistics.median(v) for k, v in times.items()}, ratios


def part_of(op: str) -> str:
    """The part of a decode step an XLA op belongs to, from its op_name metadata."""
    if "mtp_depth" in op:
        return "MTP draft (the whole module)"
    if "main_logits" in op:
        return "output head"
    if "moe/" in op:
        if "dynamic_index_in_dim" in op:
            return "routed experts: weight slices copied out (few_local)"
        if "routed_experts" in op:
            return "routed experts: kernel"
        return "shared expert" if "moe/shared" in op else "routing, rest of the MoE layer"
    if "/mlp/" in op:
        return "dense MLP"
    if "attn" in op:
        return "attention"
    if "_layers/" in op:
        return "layer loop: weights sliced from the stack, norms, residuals"
    return "step loop, sampling, acceptance, state"


def step_parts(progs: dict, rounds: int = 10) -> dict:
    """{(kind, rule): {part: us per step}} from one jax.profiler trace of `rounds` rounds, each calling every
    program once (alternating, as the timings do); each XLA op event's exclusive time (its duration minus that
    of the events nested in it on its thread) goes to the program whose call it falls in."""
    progs = {key: run for key, run in progs.items() if key[0] not in PASSES + (RUN_TIME_RULE,)}
    names = {key: op_names(run.hlo()) for key, run in progs.items()}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(rounds):
                for key, run in progs.items():
                    with jax.profiler.TraceAnnotation("|".join(key)):
                        run()
        events = [e for e in json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))
                  ["traceEvents"] if e.get("ph") == "X"]
    calls = sorted((e["ts"], e["ts"] + e["dur"], tuple(e["name"].split("|"))) for e in events
                   if tuple(e["name"].split("|")) in progs)
    ops = [e for e in events if "hlo_op" in e.get("args", {})]
    threads = collections.defaultdict(list)
    for e in ops:
        threads[e["tid"]].append(e)
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            e["excl"] = e["dur"]
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                stack[-1]["excl"] -= e["dur"]
            stack.append(e)
    starts = [c[0] for c in calls]
    parts = {key: collections.Counter() for key in progs}
    for e in ops:
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= calls[i][1]:
            key = calls[i][2]
            parts[key][part_of(names[key].get(e["args"]["hlo_op"], ("",))[0])] += e["excl"] / (rounds * CHUNK)
    return {key: dict(c) for key, c in parts.items()}


def matmul_costs(n: int, repeats: int) -> dict:
    """Microseconds per [256,768] x [768,256] MLP pair on 1 and 2 rows: XLA, and torch when installed."""
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((256, 768), np.float32) * 0.05, rng.standard_normal((768, 256), np.float32) * 0.05)
          for _ in range(4)]
    out = {}
    jws = [(jnp.asarray(a), jnp.asarray(b)) for a, b in ws]

    def chain(x):
        def body(i, x):
            for a, b in jws:
                x = jnp.tanh(jax.nn.silu(x @ a) @ b)
            return x
        return jax.lax.fori_loop(0, n, body, x)
    fns = {m: (jax.jit(chain), jnp.full((m, 256), 0.01, jnp.float32)) for m in (1, 2)}
    for f, x in fns.values():
        f(x).block_until_ready()
    times = {m: [] for m in fns}
    for _ in range(repeats):
        for m, (f, x) in fns.items():
            t0 = time.perf_counter()
            f(x).block_until_ready()
            times[m].append((time.perf_counter() - t0) / (4 * n) * 1e6)
    out["xla"] = {m: statistics.median(v) for m, v in times.items()}
    try:
        import torch
    except ImportError:
        return out
    tws = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in ws]
    times = {1: [], 2: []}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for m in (1, 2):
                x = torch.full((m, 256), 0.01)
                t0 = time.perf_counter()
                for _ in range(n):
                    for a, b in tws:
                        x = torch.tanh(torch.nn.functional.silu(x @ a) @ b)
                if r:                                                             # round 0 warms up
                    times[m].append((time.perf_counter() - t0) / (4 * n) * 1e6)
    out["torch"] = {m: statistics.median(v) for m, v in times.items()}
    return out


def bound(c: dict, acceptance: float) -> float:
    """(1 + a) / (c2/c1 + cm/c1): the speed-up of a speculative step with no overhead beyond its two passes."""
    return (1 + acceptance) * c["main_1"] / (c["main_2"] + c["mtp_2"])


# Two drafts per step (--chain) ------------------------------------------------------------------------------------
# MTP module 1 chained on its own output: the step at L drafts d1 at position L-1 from (h^0_{L-1}, Emb(t_L)),
# then d2 at position L from (h^1_{L-1}, Emb(d1)) (h^1_{L-1} standing in for h^0_L, which predicts the same
# token t_{L+1}), over the module's cache of true entries before L; the main model verifies [t_L, d1, d2].

def chain_acceptance(cfg, params, rs, prompts: list, new: int) -> dict:
    """On the plain greedy continuations of `prompts` (what greedy speculative decoding must reproduce):
    a1, how often the depth-1 draft is the main model's next token, and a2, how often the chained depth-2
    draft is the one after, given depth 1 right. Depth 1 and h^1 come from one full-sequence forward (the
    prefill's expanded form, which equals cached decoding); each chained draft attends over the MTP cache
    of the true entries before its position (the prefill's), one batch row per draft position."""
    from dsv3_jax.infer import generate
    out, _ = generate(cfg, {"params": params, "router_state": rs}, prompts, new)
    seqs = jnp.asarray([p + o for p, o in zip(prompts, out)], jnp.int32)                  # [N, S]
    n, s = seqs.shape
    full = init_cache(cfg, n, SLOTS, mtp=True)
    pre = prefill(cfg, params, rs, full, seqs, jnp.full((n,), s, jnp.int32), mtp=True)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
    h0, _ = forward(cfg, params, rs, full, seqs, pos, read_cache=False, absorbed=False)
    d1_logits, h1, _ = mtp_forward(cfg, params, rs, full, h0, jnp.pad(seqs[:, 1:], ((0, 0), (0, 1))), pos,
                                   read_cache=False, absorbed=False)
    i = np.arange(len(prompts[0]) - 1, s - 3)        # draft positions L-1 inside the continuation
    hit1 = np.asarray(jnp.argmax(d1_logits[:, i], -1) == seqs[:, i + 2])                 # [N, I]
    hit2 = []
    for row in range(n):
        rows = jax.tree.map(lambda a: jnp.repeat(a[:, row:row + 1], len(i), axis=1), pre.cache.mtp[0])
        logits, _, _ = mtp_forward(cfg, params, rs, pre.cache.replace(dense=None, moe=None, mtp=(rows,)),
                                   h1[row, i][:, None], seqs[row, i + 2][:, None], jnp.asarray(i + 1)[:, None])
        hit2.append(np.asarray(jnp.argmax(logits[:, 0], -1) == seqs[row, i + 3]))
    hit2 = np.stack(hit2)
    return {"positions": int(hit1.size), "a1": float(hit1.mean()), "a2_given_a1": float(hit2[hit1].mean())}


CHAIN_PASSES = (("main", 1), ("main", 2), ("main", 3), ("mtp", 2), ("mtp", 3), ("mtp", 1))


def chain_bounds(c: dict, a1: float, a2: float) -> dict:
    """Bounds of one and two drafts per step (passes only): (1 + a1) / ((c2 + cm2) / c1) and
    (1 + a1 + a1 a2) / ((c3 + cm3 + cm1) / c1); the two-draft step's first MTP pass writes three positions
    (entries a previous step's chained draft wrote stand in for h^0 and must be rewritten), the second is one."""
    return {"one_draft": (1 + a1) * c["main_1"] / (c["main_2"] + c["mtp_2"]),
            "two_drafts": (1 + a1 + a1 * a2) * c["main_1"] / (c["main_3"] + c["mtp_3"] + c["mtp_1"])}


def chain_study(args, cfg, params, rs, label) -> dict:
    """--chain: acceptance of a chained second draft on validation text and the passes' costs -> the
    bounds of one and two drafts per step; writes spec_cost_chain.{md,json}."""
    from bench_decode import validation_prompts
    from dsv3_jax.train.checkpoint import load_run_config
    from dsv3_jax.data import load_tokenizer
    rc = load_run_config(args.run_dir)
    acc = chain_acceptance(cfg, params, rs, validation_prompts(rc, load_tokenizer(rc.train.tokenizer),
                                                               args.chain_prompts, PROMPT), NEW)
    print(f"chain acceptance: {acc}", flush=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        c = pass_costs(cfg, params, rs, b, args.passes, args.repeats, CHAIN_PASSES)
        rows.append({"batch": b, **{k: round(v, 1) for k, v in c.items()},
                     **{k: round(v, 3) for k, v in chain_bounds(c, acc["a1"], acc["a2_given_a1"]).items()}})
        print(f"batch {b}: {rows[-1]}", flush=True)
    a1, a2 = acc["a1"], acc["a2_given_a1"]
    lines = ["# Two drafts per step: chained MTP module 1", "",
             f"Model: {label}. Acceptance on the plain greedy continuations ({NEW} tokens) of {args.chain_prompts} "
             f"validation-text prompts of {PROMPT} tokens, {acc['positions']} draft positions: depth 1 a1 = "
             f"{a1:.3f}, the chained depth-2 draft given depth 1 right a2 = {a2:.3f}; tokens per step "
             f"1 + a1 = {1 + a1:.2f} with one draft, 1 + a1 + a1 a2 = {1 + a1 + a1 * a2:.2f} with two.", "",
             f"Device microseconds per pass ({args.passes} passes per device call, median of {args.repeats} "
             f"alternating repeats, {CONTEXT} cached tokens): main model on T tokens (cT), MTP module on T "
             "positions of which the last runs attention, FFN and head (cmT; cm1 is the chained draft). "
             "Bounds count the passes only.", "",
             "| batch | c1 | c2/c1 | c3/c1 | cm2/c1 | cm3/c1 | cm1/c1 | bound, one draft | bound, two drafts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q = lambda k: r[k] / r["main_1"]
        lines.append(f"| {r['batch']} | {r['main_1']:.0f} | {q('main_2'):.2f} | {q('main_3'):.2f} | "
                     f"{q('mtp_2'):.2f} | {q('mtp_3'):.2f} | {q('mtp_1'):.2f} | {r['one_draft']:.2f}x | "
                     f"{r['two_drafts']:.2f}x |")
    summary = {"model": label, **acc, "rows": rows}
    write_results(args.out, "spec_cost_chain", lines, summary)
    print(json.dumps(summary))
    return summary


def parts_table(parts: dict, cols: list, plain_of: dict, order_by: str) -> list[str]:
    """The lines of a "what a step's time is made of" table: one row per part (largest first in column
    order_by) and a total; each cell the part's microseconds and, in brackets, its share of plain_of[column]."""
    names = sorted({k for d in parts.values() for k in d}, key=lambda k: -parts[order_by].get(k, 0))
    lines = ["| part | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name in names + ["total"]:
        cells = []
        for c in cols:
            v = sum(parts[c].values()) if name == "total" else parts[c].get(name, 0.0)
            cells.append(f"{v:.0f} ({v / plain_of[c]:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", help="training run directory (default: random tiny weights; costs do not "
                                      "depend on the weights)")
    ap.add_argument("--acceptance", type=float, default=0.91,
                    help="draft acceptance to evaluate the bound at (bench_decode measures it)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--passes", type=int, default=100, help="passes per device call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile-batch", type=int, default=0,
                    help="trace the whole steps at this batch and tabulate their parts (0: no trace)")
    ap.add_argument("--ffn-scale", type=float, default=0.0,
                    help="random weights with every FFN width (dense, experts) scaled by this: a model with fewer "
                         "weight bytes per step (the together penalty against the working set)")
    ap.add_argument("--chain", action="store_true",
                    help="only the two-drafts study (needs --run-dir): spec_cost_chain.{md,json}")
    ap.add_argument("--chain-prompts", type=int, default=16, help="validation prompts of the --chain acceptance")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    if args.chain and not args.run_dir:
        ap.error("--chain measures acceptance on a trained run's validation text: give --run-dir")
    if args.run_dir:
        from dsv3_jax.infer.cli import load_run
        cfg, variables, _ = load_run(args.run_dir)
        label = args.run_dir
    else:
        cfg = PRESETS["tiny"]
        variables, label = random_variables(cfg, 0), "random tiny"
    if args.ffn_scale:
        cfg = cfg.replace(intermediate_size=int(cfg.intermediate_size * args.ffn_scale),
                          moe_intermediate_size=int(cfg.moe_intermediate_size * args.ffn_scale))
        variables, label = random_variables(cfg, 0), f"{label}, FFN widths x{args.ffn_scale}, random weights"
    params, rs = split_variables(variables)
    if args.chain:
        return chain_study(args, cfg, params, rs, label)

    rows, layouts = [], {}
    for b in [int(x) for x in args.batches.split(",")]:
        params_b = decode_params(cfg, params, rows=b)     # the layout `generate` decodes this batch from
        layouts[b] = "per layer" if params_b is not params else "stacked"
        c = pass_costs(cfg, params_b, rs, b, args.passes, args.repeats)
        rows.append({"batch": b, **{k: round(v, 1) for k, v in c.items()},
                     "c2_over_c1": round(c["main_2"] / c["main_1"], 3), "cm_over_c1": round(c["mtp_2"] / c["main_1"], 3),
                     "bound_at_acceptance": round(bound(c, args.acceptance), 3), "bound_at_1": round(bound(c, 1.0), 3)})
        progs = chunk_programs(cfg, params_b, rs, b)
        steps, ratios = step_costs(progs, args.repeats)
        for rule in RULES:
            rows[-1][rule] = {"plain_step": round(steps[("plain", rule)], 1),
                              "spec_step": round(steps[("speculative", rule)], 1),
                              "spec_over_plain": round(ratios[rule], 3),
                              "bound_at_acceptance": round((1 + args.acceptance) / ratios[rule], 3)}
        rows[-1][CURRENT].update({p.split()[0]: round(steps[(p, CURRENT)], 1) for p in PASSES[:3]})
        rows[-1][CURRENT]["passes_over_plain"] = round(
            (steps[("draft pass", CURRENT)] + steps[("verify pass", CURRENT)]) / steps[("plain", CURRENT)], 3)
        rows[-1][CURRENT]["run_time_rule_over_greedy_only"] = round(
            steps[(RUN_TIME_RULE, CURRENT)] / steps[("speculative", CURRENT)], 3)
        rows[-1][CURRENT]["both_over_plain"] = round(steps[("both passes", CURRENT)] / steps[("plain", CURRENT)], 3)
        for p in ("draft twice", "verify twice"):
            rows[-1][CURRENT][p.replace(" ", "_") + "_over_plain"] = round(
                steps[(p, CURRENT)] / steps[("plain", CURRENT)], 3)
        if b == args.profile_batch:
            parts = step_parts(progs)
            rows[-1]["parts"] = {f"{kind} {rule}": {k: round(v, 1) for k, v in d.items()}
                                 for (kind, rule), d in parts.items()}
        del progs, params_b
        print(f"batch {b}: {rows[-1]}", flush=True)
    mm = matmul_costs(args.passes, args.repeats)
    print(f"matmul pairs (us): {mm}", flush=True)

    lines = ["# Speculative step cost model", "",
             f"Model: {label} ({cfg.num_hidden_layers} layers + 1 MTP block; parameters "
             f"{sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) / 2 ** 20:.1f} MiB, of which MTP module 1 "
             f"{sum(a.nbytes for a in jax.tree_util.tree_leaves(params['mtp_0'])) / 2 ** 20:.1f} MiB). "
             f"{os.cpu_count()} CPU cores, jax "
             f"{jax.__version__}. Device microseconds per pass ({args.passes} passes per device call, median of "
             f"{args.repeats} alternating repeats), {CONTEXT} cached tokens. Main-layer weights in the layout "
             f"`generate` decodes each batch from (`decode_params`): "
             + ", ".join(f"batch {b} {v}" for b, v in layouts.items()) + ".", "",
             f"Bound = (1 + a) / (c2/c1 + cm/c1), the speed-up over plain decoding of a speculative step that costs "
             f"only its two passes; a = {args.acceptance} (measured by bench_decode) and a = 1.", "",
             "| batch | main, 1 token (c1) | main, 2 tokens (c2) | MTP draft, 2 positions (cm) | c2/c1 | cm/c1 | "
             f"bound at a={args.acceptance} | bound at a=1 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['main_1']:.0f} | {r['main_2']:.0f} | {r['mtp_2']:.0f} | {r['c2_over_c1']:.2f} | "
                     f"{r['cm_over_c1']:.2f} | {r['bound_at_acceptance']:.2f}x | {r['bound_at_1']:.2f}x |")
    lines += ["", f"Whole steps as decoding runs them: device microseconds per step in calls of {CHUNK} steps "
              f"(median of {args.repeats} alternating repeats of 5 calls), after a prefill of {PROMPT}-token random "
              f"prompts, {SLOTS} cache slots; the few-token expert rule before this session (few_local) and now "
              "(capacity_local); speculative / plain is the median of the per-repeat ratios. Bound = (1 + a) / "
              "that ratio: what the speculative step's own overhead leaves of the speed-up at acceptance a. Draft "
              "and verify: the speculative step cut down to one of its passes (same loop, state and caches; no "
              "acceptance), under the current rule; both: the two passes in one step, still without acceptance, "
              "sampling or state updates; twice: one pass run twice in one step. The speculative step is the one "
              "greedy requests run (compiled greedy-only); run-time rule: the step that picks greedy or sampling "
              "by lax.cond on the traced temperature (what every request ran before session 9), / the greedy-only "
              "step.", "",
              "| batch | expert rule | plain step | draft pass | verify pass | (draft + verify) / plain | "
              "both passes / plain | draft twice / plain | verify twice / plain | speculative step | "
              f"speculative / plain | bound at a={args.acceptance} | run-time rule / greedy-only |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for rule in RULES:
            q = r[rule]
            passes = (f"{q['draft']:.0f} | {q['verify']:.0f} | {q['passes_over_plain']:.2f} | "
                      f"{q['both_over_plain']:.2f} | {q['draft_twice_over_plain']:.2f} | "
                      f"{q['verify_twice_over_plain']:.2f}" if "draft" in q else "- | - | - | - | - | -")
            run_time = f"{q['run_time_rule_over_greedy_only']:.2f}" if "draft" in q else "-"
            lines.append(f"| {r['batch']} | {rule} | {q['plain_step']:.0f} | {passes} | {q['spec_step']:.0f} | "
                         f"{q['spec_over_plain']:.2f} | {q['bound_at_acceptance']:.2f}x | {run_time} |")
    for r in rows:
        if "parts" in r:
            cols = [f"{kind} {rule}" for rule in RULES for kind in ("plain", "speculative")]
            plain_total = {rule: sum(r["parts"][f"plain {rule}"].values()) for rule in RULES}
            lines += ["", f"What a step's time is made of at batch {r['batch']}: microseconds per step (exclusive "
                      "time of each XLA op in a jax.profiler trace of 10 alternating calls of each program, mapped to the model code through "
                      "the op_name metadata; the profiler inflates every op, so read the shares: in brackets, "
                      "as a fraction of the same rule's plain step).", ""]
            lines += parts_table(r["parts"], cols, {c: plain_total[c.split(" ", 1)[1]] for c in cols}, cols[-1])
    lines += ["", "Matmul kernels alone, microseconds per [256,768] x [768,256] MLP pair (four distinct pairs):", "",
              "| library | 1 row | 2 rows | 2 rows / 1 row |", "|---|---|---|---|"]
    for lib, t in mm.items():
        lines.append(f"| {lib} | {t[1]:.1f} | {t[2]:.1f} | {t[2] / t[1]:.2f} |")
    summary = {"model": label, "acceptance": args.acceptance, "rows": rows,
               "matmul_2rows_over_1row": {lib: round(t[2] / t[1], 3) for lib, t in mm.items()}}
    write_results(args.out, "spec_cost", lines, summary, keep_from="## Reading")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
