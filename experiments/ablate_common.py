"""Shared machinery of the ablations (ablate_balance.py, ablate_mtp.py): one ablation config, arms run
in-process with the library's `train`, one JSON record per (arm, seed), and the tables and plots.

The ablation config is the tiny preset's size with 16 routed experts and top-4 (4 groups, 2 kept), so that
balance is a real question; every arm gets the same data, steps and seeds. A finished record is reused when
its config is unchanged (an interrupted sweep resumes where it stopped; `--fresh` reruns everything).

Metrics (Loss-Free Balancing, arXiv 2408.15664 section 4.1): MaxVio = (max_i load_i - mean load) / mean load.
MaxVio_global is taken over every validation token of the final model, MaxVio_batch per training batch and
averaged over the last 20% of steps; both are averaged over the main model's MoE layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# Sized so that every arm x 2 seeds ran in about an hour on 2 CPU cores shared with other work:
# 100 steps of 8 x 64 tokens. The tiny preset's schedule shape (warm-up, constant, cosine), scaled.
ABLATION_STEPS = 100
ABLATION_BATCH = 8
ABLATION_SEQ = 64


def ablation_config(steps: int = ABLATION_STEPS, quick: bool = False):
    """The RunConfig every arm starts from: no balancing at all (arms switch their method on)."""
    from dsv3_jax.config import RunConfig, TrainConfig, get_preset
    model = get_preset("tiny").replace(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                       num_nextn_predict_layers=0)
    batch, seq = ABLATION_BATCH, ABLATION_SEQ
    if quick:
        model = model.replace(num_hidden_layers=2, scan_unroll=1)
        batch, seq = 4, 32
    warm = max(1, steps // 16)
    stable = (steps - warm) // 2
    train = TrainConfig(steps=steps, global_batch_size=batch, seq_len=seq, learning_rate=3e-3,
                        warmup_steps=warm, stable_steps=stable, decay_steps=steps - warm - stable, final_lr=3e-4,
                        eval_every=max(1, steps // 5), eval_batches=8 if not quick else 2,
                        checkpoint_every=10 * steps, keep_checkpoints=1, max_corpus_bytes=4_000_000,
                        balance_alpha=0.0, bias_update_rate=0.0, log_expert_load=True)
    return RunConfig(model, train)


def arm_config(base, train: dict | None = None, model: dict | None = None):
    return dataclasses.replace(base, train=dataclasses.replace(base.train, **(train or {})),
                               model=base.model.replace(**(model or {})))


# ------------------------------------------------------------------------------------------------------
# Running


def _mtp_acceptance(rc, params, router_state) -> list:
    """Teacher-forced greedy acceptance on the validation batches, per MTP depth: the draft of depth k at
    position t (for token t+k+1) is accepted when it equals the main head's argmax at position t+k and every
    shallower draft was accepted too. Depth 1 is the second-token acceptance rate of arXiv 2412.19437 §5.4.3."""
    import jax
    import jax.numpy as jnp
    from dsv3_jax import data as data_lib
    from dsv3_jax.model import Transformer
    from dsv3_jax.train.loop import run_split

    tc = rc.train
    _, val = run_split(rc, data_lib.load_tokenizer(tc.tokenizer))
    batches = data_lib.make_eval_batches(val, tc.seq_len, tc.global_batch_size, tc.eval_batches)
    apply = jax.jit(lambda p, r, x: Transformer(rc.model).apply({"params": p, "router_state": r}, x))
    depth = rc.model.num_nextn_predict_layers
    hits, total = np.zeros(depth), 0
    for b in batches:
        out = apply(params, router_state, jnp.asarray(b[:, :-1]))
        main = np.asarray(out.logits.argmax(-1))                                  # [B, T]
        t = main.shape[1] - depth
        chain = np.ones((main.shape[0], t), bool)
        for k, logits in enumerate(out.mtp_logits, start=1):
            chain &= np.asarray(logits.argmax(-1))[:, :t] == main[:, k:k + t]
            hits[k - 1] += chain.sum()
        total += chain.size
    return [float(h / total) for h in hits]


def _record(arm: str, seed: int, rc, run_dir: str, keep_traces: bool, seconds: float) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    layers = rc.model.num_moe_layers                        # main MoE layers come first in every list
    steps = [r["step"] for r in rows]
    batch_vio = [float(np.mean(r["max_vio"][:layers])) for r in rows]
    last = rows[int(len(rows) * 0.8):]
    evals = [r for r in rows if "val_loss" in r]
    rec = {
        "arm": arm, "seed": seed, "config": rc.to_dict(), "seconds": round(seconds, 1),
        "val_ce": evals[-1]["val_loss"],
        "maxvio_global": float(np.mean(evals[-1]["val_max_vio"][:layers])),
        "maxvio_global_layers": evals[-1]["val_max_vio"][:layers],
        "maxvio_batch": float(np.mean([np.mean(r["max_vio"][:layers]) for r in last])),
        "maxvio_batch_std_last": float(np.std([np.mean(r["max_vio"][:layers]) for r in last])),
        "train_ce": [round(r["ce"], 4) for r in rows],
        "steps": steps, "maxvio_batch_curve": [round(v, 4) for v in batch_vio],
        "val_curve": [[r["step"], r["val_loss"]] for r in evals],
    }
    if keep_traces:                      # per-expert load and bias per step (seed 0 only, to keep files small)
        rec["expert_counts"] = [[[int(c) for c in layer] for layer in r["expert_counts"][:layers]] for r in rows]
        rec["router_bias"] = [[[round(b, 5) for b in layer] for layer in r["router_bias"][:layers]] for r in rows]
    return rec


def run_arm(arm: str, seed: int, rc, work_dir: Path, runs_dir: Path, fresh: bool) -> dict:
    """Train one arm with one seed in this process, or reuse a record with the same config."""
    from dsv3_jax.train.loop import train
    rc = arm_config(rc, {"seed": seed})
    want = json.loads(json.dumps(rc.to_dict()))
    path = runs_dir / f"{arm}_s{seed}.json"
    if not fresh:
        for f in sorted(runs_dir.parent.glob("*_runs/*.json")):  # same config under any name or study
            rec = json.loads(f.read_text())
            if rec["config"] == want:
                if f != path:
                    path.write_text(json.dumps(dict(rec, arm=arm)))
                print(f"{arm} seed {seed}: reusing {f.name}", flush=True)
                return dict(rec, arm=arm)
    run_dir = work_dir / f"{arm}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    summary = train(rc, str(run_dir), progress=False, async_checkpoints=False)
    rec = _record(arm, seed, rc, str(run_dir), keep_traces=seed == 0, seconds=time.perf_counter() - t0)
    if rc.model.num_nextn_predict_layers:
        state = summary["state"]
        rec["acceptance"] = _mtp_acceptance(rc, state.params, state.router_state)
    rec["config"] = want
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    shutil.rmtree(run_dir, ignore_errors=True)              # checkpoints are not needed afterwards
    print(f"{arm} seed {seed}: val CE {rec['val_ce']:.4f}, MaxVio_global {rec['maxvio_global']:.3f}, "
          f"MaxVio_batch {rec['maxvio_batch']:.3f} ({rec['seconds']:.0f} s)", flush=True)
    return rec


def parse_args(description: str, default_out: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="2 arms, a few steps, a smaller model (CI)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per arm (default {ABLATION_STEPS})")
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm")
    p.add_argument("--only-seed", type=int, default=None, help="run just this seed (another process runs the rest)")
    p.add_argument("--reverse", action="store_true", help="run the arms in reverse order (for a second process)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    p.add_argument("--out", default=str(RESULTS), help="where the tables, plots and run records go")
    p.add_argument("--work-dir", default=None, help="scratch for run directories (default: a temp dir)")
    p.add_argument("--fresh", action="store_true", help="rerun arms even when a record with their config exists")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables and plots from records")
    a = p.parse_args()
    a.prefix = default_out + ("_quick" if a.quick else "")
    return a


def sweep(args, arms: dict, first: tuple = ()) -> dict:
    """Run every (arm, seed), seed-major (all arms of seed 0 first, so a cut-short sweep still covers every
    arm once), the arms in `first` before the others (arms the other study reuses).
    arms: {name: (label, train overrides, model overrides)}. Returns {name: [records]} in arms' order."""
    import tempfile
    import jax
    steps = args.steps or (6 if args.quick else ABLATION_STEPS)
    base = ablation_config(steps, quick=args.quick)
    names = args.arms.split(",") if args.arms else list(arms)
    unknown = set(names) - set(arms)
    if unknown:
        sys.exit(f"unknown arm(s) {sorted(unknown)}; choose from {list(arms)}")
    out = Path(args.out)
    runs_dir = out / f"{args.prefix}_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ablate_"))
    # Seeds of one arm compile the same step: the persistent cache compiles it once.
    jax.config.update("jax_compilation_cache_dir", str(work / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    records: dict = {n: [] for n in names}
    if not args.report_only:
        order = [n for n in first if n in names] + [n for n in names if n not in first]
        order = order[::-1] if args.reverse else order
        for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
            for n in order:
                _, train_over, model_over = arms[n]
                records[n].append(run_arm(n, seed, arm_config(base, train_over, model_over), work, runs_dir,
                                          args.fresh))
    else:
        for n in names:
            for f in sorted(runs_dir.glob(f"{n}_s*.json")):
                records[n].append(json.loads(f.read_text()))
    return {n: r for n, r in records.items() if r}


# ------------------------------------------------------------------------------------------------------
# Reporting


def mean_spread(values) -> tuple[float, float]:
    """Mean and half the range over seeds (with 2 seeds: the distance from the mean to either seed)."""
    v = np.asarray(values, float)
    return float(v.mean()), float((v.max() - v.min()) / 2)


def fmt(values, digits: int = 3) -> str:
    m, s = mean_spread(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def compare(a: list, b: list) -> str:
    """'lower' / 'higher' when a's mean is below/above b's by more than both seed spreads together,
    else 'tie' (the difference is inside the seed noise)."""
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    if abs(ma - mb) <= sa + sb:
        return "tie"
    return "lower" if ma < mb else "higher"


def arm_table(arms: dict, rec: dict, columns: list, cells) -> list:
    """Markdown rows: one per arm in `arms`' order, `cells(records)` giving its columns; arms without a
    record say 'not run'."""
    lines = ["| arm | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, (label, _, _) in arms.items():
        rs = rec.get(name)
        lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells(rs)) + " |" if rs else
                     f"| {label} | not run |" + " |" * len(columns))
    return lines


def save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def smooth(y, k: int = 5) -> np.ndarray:
    y = np.asarray(y, float)
    if len(y) < k:
        return y
    return np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, mode="valid")
