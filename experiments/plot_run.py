"""Plot a training run's metrics.jsonl: loss / val_loss and per-layer MaxVio against step (PNG + a table).

    python experiments/plot_run.py runs/tiny [--out experiments/results/train_tiny]
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--out", default="experiments/results/train_tiny")
    args = p.parse_args()
    with open(os.path.join(args.run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(l) for l in fh if l.strip()]
    steps = [r["step"] for r in rows]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(steps, [r["ce"] for r in rows], label="train CE (nats/token)", lw=0.8)
    if val:
        a.plot(*zip(*val), "o-", label="validation CE")
    a.axhline(2.0, color="gray", ls=":", label="2.0 target")
    a.set_xlabel("step"), a.set_ylabel("nats per token"), a.legend(), a.set_title("loss")
    layers = len(rows[0]["max_vio"])
    for i in range(layers):
        b.plot(steps, [r["max_vio"][i] for r in rows], lw=0.8, label=f"MoE layer {i}")
    vv = [(r["step"], max(r["val_max_vio"])) for r in rows if r.get("val_max_vio")]
    if vv:
        b.plot(*zip(*vv), "ko-", label="worst layer, all validation tokens")
    b.axhline(0.3, color="gray", ls=":", label="0.3")
    b.set_yscale("log"), b.set_xlabel("step"), b.set_ylabel("MaxVio (global batch)"), b.legend(fontsize=7)
    b.set_title("load balance")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out + ".png", dpi=110)
    with open(args.out + ".md", "w") as fh:
        fh.write("| step | train CE | val CE | tokens/s | MaxVio per MoE layer (this step's batch) | MaxVio over "
                 "all validation tokens |\n|---|---|---|---|---|---|\n")
        for r in rows:
            if "val_loss" in r or r["step"] == rows[-1]["step"]:
                fh.write(f"| {r['step']} | {r['ce']:.3f} | {r.get('val_loss', float('nan')):.3f} | "
                         f"{r['tokens_per_s']:.0f} | {', '.join(f'{x:.2f}' for x in r['max_vio'])} | "
                         f"{', '.join(f'{x:.2f}' for x in r.get('val_max_vio', []))} |\n")
    print(f"wrote {args.out}.png and {args.out}.md")


if __name__ == "__main__":
    main()
