"""Where a train step's time goes: a jax.profiler trace of a few steps of experiments/bench_train.py's
one-device step, each XLA op's exclusive time mapped to the model code through the compiled HLO's op_name
metadata, summed into categories (forward / backward of attention, MoE loops, dense MLP, ...).

    python experiments/profile_train.py [--preset bench] [--steps 3] [--top 25] [--show TEXT] [--dots]
        [key=value overrides]

Prints the categories (ms per step and share) and the top ops. Shares are what to read on a loaded machine:
the profiler and other processes inflate every op's time. `--dots` lists the matrix products XLA:CPU left
outside its fast-library (YNN) fusions: typically contractions over an operand's rows (a^T b). Their
traced times are not to be trusted (a 6 GFLOP one traced at under 1 ms: its work runs on threads the trace
does not attribute to it), so compare variants by process CPU time (train_ab.py) instead. The runs behind
experiments/results/train_speed.md.
"""

from __future__ import annotations

import argparse
import os
import collections
import glob
import gzip
import json
import re
import tempfile

import jax

from bench_train import make_runner  # noqa: E402  (sets JAX_PLATFORMS=cpu unless set)
from dsv3_jax.config import run_preset
from dsv3_jax.host_malloc import reuse_freed_memory

# Category keys, first match wins, looked up in an op's op_name; "transpose(" in it marks the backward.
CATEGORIES = (("moe/while", "MoE expert loops"), ("routed_experts/while", "MoE expert loops"), ("moe/shared", "shared expert"), ("moe/", "MoE routing, dispatch"),
              ("/mlp/", "dense MLP"), ("attn/BH", "attention core matmuls"), ("attn/", "attention, rest"),
              ("head", "head"), ("norm", "RMSNorm"), ("cond/branch_1_fun", "optimizer update"),
              ("_layers/slice", "per-layer parameter slices"), ("_layers/concatenate", "stacked gradients"))


def exclusive_times(trace_file: str) -> collections.Counter:
    """Per event name, the summed duration (us) minus that of events nested inside it on the same thread."""
    events = [e for e in json.load(gzip.open(trace_file))["traceEvents"] if e.get("ph") == "X"]
    threads = collections.defaultdict(list)
    for e in events:
        threads[(e["pid"], e["tid"])].append(e)
    excl = collections.Counter()
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                excl[stack[-1]["name"]] -= e["dur"]
            excl[e["name"]] += e["dur"]
            stack.append(e)
    return excl


def op_names(hlo_text: str) -> dict:
    """HLO instruction name -> (op_name metadata, result shape)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) [\w\-]+\(", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = (op.group(1) if op else "", m.group(2))
    return out


def plain_dots(hlo_text: str) -> list:
    """(result shape, contracting dims, op_name) of each dot outside a fused computation."""
    out, computation = [], ""
    for line in hlo_text.splitlines():
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            computation = head.group(1)
        elif " dot(" in line and not computation.startswith("fused_computation"):
            dims = " ".join(re.findall(r"\w+_contracting_dims=\{[\d,]*\}", line))
            op = re.search(r'op_name="([^"]*)"', line)
            out.append((re.search(r"= (\S+) dot\(", line).group(1), dims, op.group(1) if op else ""))
    return out


def category(op_name: str) -> str:
    for key, label in CATEGORIES:
        if key in op_name:
            return label + (" (bwd)" if "transpose(" in op_name else "")
    return "other"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--show", action="append", default=[],
                   help="also list the top ops of each category containing this text (repeatable)")
    p.add_argument("--dots", action="store_true", help="list the dots outside YNN fusions (see above)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if os.environ["JAX_PLATFORMS"] == "cpu":
        reuse_freed_memory()        # the malloc settings bench_train.py and the train CLI run with
    rc = run_preset(args.preset).override(args.overrides)
    run = make_runner(rc)
    hlo = run.compiled_text()
    names = op_names(hlo)
    if args.dots:
        dots = plain_dots(hlo)
        print(f"{len(dots)} dots outside YNN fusions:")
        for shape, dims, op in dots:
            print(f"  {shape:28s} {dims:50s} {category(op)}: {op[-80:]}")
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            seconds = run(args.steps)
        excl = exclusive_times(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0])
    steps = args.steps + 1                                             # run() adds one warm-up step
    ops = {n: v / steps / 1e3 for n, v in excl.items() if n in names}  # ms per step, XLA ops only
    total = sum(ops.values())
    cats = collections.Counter()
    for n, ms in ops.items():
        cats[category(names[n][0])] += ms
    print(f"median step {seconds:.3f} s; XLA ops {total:.0f} ms per step (traced)")
    print("| category | ms/step | share |\n|---|---|---|")
    for c, ms in cats.most_common():
        print(f"| {c} | {ms:.0f} | {ms / total:.1%} |")
    print(f"\ntop {args.top} ops:")
    for n, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:8.1f} ms {ms / total:6.1%} {n:30s} {names[n][1][:28]:28s} {names[n][0][-90:]}")
    for text in args.show:
        print(f"\ntop {args.top} ops of the categories containing {text!r}:")
        picked = [(n, ms) for n, ms in ops.items() if text in category(names[n][0])]
        for n, ms in sorted(picked, key=lambda kv: -kv[1])[:args.top]:
            print(f"{ms:8.1f} ms {ms / total:6.1%} {n:30s} {names[n][1][:28]:28s} {names[n][0][-90:]}")


if __name__ == "__main__":
    main()
