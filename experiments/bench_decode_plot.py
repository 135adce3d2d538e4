"""experiments/bench_decode.py's figure: decode tokens/s against context (part 1), speculative against plain at
batch 1 (part 2), and by batch for each trained run with the serving queue (parts 3 and 4)."""

from __future__ import annotations

import os

import numpy as np


def by_model(rows) -> dict:
    """Rows grouped by their "model", in order of first appearance."""
    out = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def plot(out_dir: str, preset: str, contexts: list, rows: list, spec_rows: list, batch_rows=(),
         queue_rows=()) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    by = {(r["context"], r["form"]): r for r in rows}
    fig, axes = plt.subplots(1, 4 if batch_rows else 2, figsize=(21 if batch_rows else 11, 4))
    ax1, ax2 = axes[:2]
    for form, style in (("absorbed", "o-"), ("expanded", "s--")):
        ax1.plot(contexts, [by[(c, form)]["tokens_per_s"] for c in contexts], style, label=form)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("cached tokens (context)")
    ax1.set_ylabel("decode tokens/s (batch 1)")
    ax1.set_title(f"MLA decode, {preset} preset, random weights")
    ax1.legend()
    ax1.grid(alpha=0.3)
    names = [r["model"].split(",")[0] for r in spec_rows]
    xs = np.arange(len(spec_rows))
    ax2.bar(xs - 0.2, [r["tokens_per_forward"] for r in spec_rows], 0.4, label="tokens per main-model forward")
    ax2.bar(xs + 0.2, [r["speedup"] for r in spec_rows], 0.4, label="decode speedup vs plain (this CPU)")
    ax2.axhline(1.0, color="gray", lw=0.8)
    for i, r in enumerate(spec_rows):
        ax2.text(i - 0.2, r["tokens_per_forward"], f"acc {r['acceptance_rate']:.2f}", ha="center", va="bottom",
                 fontsize=8)
    ax2.set_xticks(xs, names, fontsize=8)
    ax2.set_ylim(0, 2.4)
    ax2.set_title("self-speculative (MTP draft) vs plain greedy")
    ax2.legend(fontsize=8, loc="upper right")
    if batch_rows:
        ax3 = axes[2]
        groups = list(by_model(batch_rows).values())
        for i, group in enumerate(groups):
            bs = [r["batch"] for r in group]
            name = "" if len(groups) == 1 else f", {group[0].get('layers', '?')} layers, {group[0]['routed_experts']} experts"
            ax3.plot(bs, [r["plain_tokens_per_s"] for r in group], "o-", color=f"C{2 * i}", label="plain" + name)
            ax3.plot(bs, [r["spec_tokens_per_s"] for r in group], "s-", color=f"C{2 * i + 1}",
                     label="speculative (MTP draft)" + name)
        if len(groups) > 1:
            ax3.set_yscale("log")
        ax4 = axes[3]                 # speculative / plain: one request per batch (solid), the serving queue (dashed)
        names = [g[0]["model"] for g in groups]
        for i, group in enumerate(groups):
            ax4.plot([r["batch"] for r in group], [r["speedup"] for r in group], "s-", color=f"C{2 * i + 1}",
                     label=f"{group[0].get('layers', '?')} layers, {group[0].get('weights_mib', 0):.0f} MiB: "
                     "one request")
        for model, queue in by_model(queue_rows).items():
            i = names.index(model) if model in names else len(names)
            ax4.plot([r["batch"] for r in queue], [r["speedup"] for r in queue], "o--", color=f"C{2 * i + 1}",
                     alpha=0.7,
                     label=f"same, queue of {queue[0]['requests'] // queue[0]['batch']}x batch (prefills in)")
        ax4.axhline(1.0, color="gray", lw=0.8)
        ax4.axhline(1.2, color="gray", lw=0.8, ls=":")
        ax4.set_xscale("log", base=2)
        ax4.set_xticks([r["batch"] for r in groups[0]], [str(r["batch"]) for r in groups[0]])
        ax4.set_xlabel("batch (rows decoded together)")
        ax4.set_ylabel("speculative / plain tokens/s")
        ax4.set_title("speculative / plain by batch (dotted: 1.2x)", fontsize=9)
        ax4.legend(fontsize=7, loc="best")
        ax4.grid(alpha=0.3)
        batch_rows, bs = groups[0], [r["batch"] for r in groups[0]]
        for r in [r for group in groups for r in group]:
            ax3.annotate(f"{r['speedup']:.2f}x", (r["batch"], r["spec_tokens_per_s"]), textcoords="offset points",
                         xytext=(0, 6), ha="center", fontsize=8)
        ax3.set_xscale("log", base=2)
        ax3.set_xticks(bs, [str(b) for b in bs])
        ax3.set_xlabel("batch (rows decoded together)")
        ax3.set_ylabel("decode tokens/s (all rows)")
        ax3.set_title("greedy decode by batch" + (f", {batch_rows[0].get('model', '')}"[:50] if len(groups) == 1 else
                                                  ": trained runs"), fontsize=9)
        ax3.legend(fontsize=7, loc="upper left")
        ax3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bench_decode.png"), dpi=110)


# Main ----------------------------------------------------------------------------------------------------------
