"""Load-balancing ablation: the aux-loss-free bias rule against auxiliary losses and no balancing, beside
Loss-Free Balancing (arXiv 2408.15664, Table 2 and section 4) and DeepSeek-V3 (arXiv 2412.19437, §4.5.3).

    PYTHONPATH=$PWD python experiments/ablate_balance.py            # every arm, 2 seeds (resumes)
    PYTHONPATH=$PWD python experiments/ablate_balance.py --quick    # 2 arms, a few steps (CI)

Writes experiments/results/ablate_balance.md (the table, the papers' numbers and a verdict per finding),
ablate_balance_{maxvio,load,bias,val}.png and one record per run under ablate_balance_runs/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ablate_common import arm_table, compare, fmt, mean_spread, parse_args, save, smooth, sweep

# name: (label, TrainConfig overrides, ModelConfig overrides). The base config has no balancing at all.
PRESET_GAMMA = {"bias_update_rate": 1e-2, "bias_update_rate_final": 1e-3}     # the tiny preset's schedule
ARMS = {
    "none": ("no balancing", {}, {}),
    "sign_1e-4": ("loss-free, sign, gamma 1e-4", {"bias_update_rate": 1e-4}, {}),
    "sign_1e-3": ("loss-free, sign, gamma 1e-3", {"bias_update_rate": 1e-3}, {}),
    "sign_1e-2": ("loss-free, sign, gamma 1e-2", {"bias_update_rate": 1e-2}, {}),
    "sign_sched": ("loss-free, sign, gamma 1e-2 -> 1e-3 (preset)", PRESET_GAMMA, {}),
    "proportional": ("loss-free, proportional, u 1e-2 -> 1e-3", dict(PRESET_GAMMA, bias_update_rule="proportional"),
                     {}),
    "aux_batch_1e-3": ("aux loss (batch-wise), alpha 1e-3", {"balance_loss": "batch", "balance_alpha": 1e-3}, {}),
    "aux_batch_1e-2": ("aux loss (batch-wise), alpha 1e-2", {"balance_loss": "batch", "balance_alpha": 1e-2}, {}),
    "aux_seq_1e-3": ("aux loss (sequence-wise), alpha 1e-3", {"balance_loss": "sequence", "balance_alpha": 1e-3},
                     {}),
    "v3": ("loss-free (preset) + sequence-wise 1e-4 (V3)", dict(PRESET_GAMMA, balance_alpha=1e-4), {}),
}
QUICK_ARMS = ("none", "sign_sched")


def findings(rec: dict) -> list:
    """(finding, paper, ours, verdict, why) rows. Verdicts compare means against the seed spread."""
    def get(arm, key):
        return [r[key] for r in rec.get(arm, [])]

    def has(*arms):
        return all(rec.get(a) for a in arms)

    rows = []
    steps = next(iter(rec.values()))[0]["config"]["train"]["steps"]
    if has("sign_sched", "aux_batch_1e-3"):
        vio, ce = compare(get("sign_sched", "maxvio_global"), get("aux_batch_1e-3", "maxvio_global")), \
            compare(get("sign_sched", "val_ce"), get("aux_batch_1e-3", "val_ce"))
        rows.append((
            "Loss-free balances better than an aux loss, at equal or better quality",
            "1B: aux 9.56 PPL / MaxVio_g 0.72, loss-free 9.50 / 0.04; 3B: 7.97 / 0.52 vs 7.92 / 0.04",
            f"loss-free MaxVio_g {fmt(get('sign_sched', 'maxvio_global'))} vs aux 1e-3 "
            f"{fmt(get('aux_batch_1e-3', 'maxvio_global'))}; val CE {fmt(get('sign_sched', 'val_ce'))} vs "
            f"{fmt(get('aux_batch_1e-3', 'val_ce'))}",
            ("balance: reproduces" if vio == "lower" else f"balance: does not reproduce ({vio})")
            + ("; quality: reproduces" if ce == "lower" else
               "; quality: within seed noise" if ce == "tie" else "; quality: does not reproduce"),
            f"After {steps} updates neither method is near the paper's 0.04: the bias needs on the order of "
            "(score gap / gamma) steps to cancel the router's preferences, and 512 tokens per batch give noisy "
            "counts (a perfectly uniform router still shows MaxVio_batch ~0.15 at 2048 assignments over 16 "
            "experts). The quality comparison rests on two seeds per arm: a direction, not a size."))
    if has("none", "sign_sched"):
        ce = compare(get("none", "val_ce"), get("sign_sched", "val_ce"))
        rows.append((
            "Balancing costs no quality",
            "implied by both papers: balanced models at the same or better loss",
            f"val CE no balancing {fmt(get('none', 'val_ce'))}, loss-free {fmt(get('sign_sched', 'val_ce'))}, "
            f"gamma 1e-4 (barely balanced) {fmt(get('sign_1e-4', 'val_ce')) if has('sign_1e-4') else '-'}",
            "does not reproduce at this scale (unbalanced is better)" if ce == "lower" else
            "reproduces" if ce == "higher" else "within seed noise",
            "Unbalanced runs vary far more between seeds than balanced ones: a collapsed router is in effect a "
            "4-expert model, and which experts win early decides its quality. Over 51k training tokens that "
            "noise hides any mean cost or gain; the papers compare at billions of tokens."))
    if has("sign_1e-4", "sign_1e-3", "sign_1e-2"):
        slow = compare(get("sign_1e-4", "maxvio_batch"), get("sign_1e-3", "maxvio_batch")) == "higher"
        jit = compare(get("sign_1e-2", "maxvio_batch_std_last"), get("sign_1e-3", "maxvio_batch_std_last"))
        rows.append((
            "Update rate: 1e-4 converges slowly, 1e-2 fluctuates late",
            "Loss-Free Fig. 4 / §4.2: 1e-3 best; 1e-4 slow, 1e-2 larger late MaxVio swings",
            f"last-20% MaxVio_b: 1e-4 {fmt(get('sign_1e-4', 'maxvio_batch'))}, 1e-3 "
            f"{fmt(get('sign_1e-3', 'maxvio_batch'))}, 1e-2 {fmt(get('sign_1e-2', 'maxvio_batch'))}; its std over "
            f"steps 1e-2 {fmt(get('sign_1e-2', 'maxvio_batch_std_last'))} vs 1e-3 "
            f"{fmt(get('sign_1e-3', 'maxvio_batch_std_last'))}",
            ("slow 1e-4: reproduces" if slow else "slow 1e-4: does not reproduce")
            + ("; late fluctuation of 1e-2: reproduces" if jit == "higher" else
               f"; late fluctuation of 1e-2: does not reproduce ({jit})"),
            f"A bias moves at most gamma per step: with 1e-4 it travels {steps * 1e-4:.3f} in our whole run, too "
            "little to matter against sigmoid scores that differ by ~0.1; the paper's runs have ~100x more updates. Our "
            "learning rate is 14x V3's, so the router drifts faster and larger gammas are favoured here."))
    if has("sign_sched", "proportional"):
        vio = compare(get("proportional", "maxvio_global"), get("sign_sched", "maxvio_global"))
        ce = compare(get("proportional", "val_ce"), get("sign_sched", "val_ce"))
        rows.append((
            "Sign and proportional rules are alike (proportional slightly better balanced)",
            "sign 9.50 PPL / MaxVio_g 0.044, proportional 9.51 / 0.036",
            f"MaxVio_g sign {fmt(get('sign_sched', 'maxvio_global'))}, proportional "
            f"{fmt(get('proportional', 'maxvio_global'))}; val CE {fmt(get('sign_sched', 'val_ce'))} vs "
            f"{fmt(get('proportional', 'val_ce'))}",
            "balance: " + {"tie": "reproduces (alike)", "lower": "reproduces (proportional better)",
                           "higher": "does not reproduce (proportional worse)"}[vio]
            + "; quality: " + {"tie": "reproduces (alike)", "lower": "proportional better",
                               "higher": "does not reproduce (proportional worse)"}[ce],
            "The proportional step equals the sign step for an idle expert or one at twice the mean load, is "
            "larger for busier experts and smaller near balance: at one rate it pulls overloaded experts down "
            "faster and nudges near-balanced ones more gently. Which ends better balanced depends on the rate and the run's length; 100 updates "
            "separate them little."))
    if has("aux_seq_1e-3", "aux_batch_1e-3", "v3"):
        seq, bat, free = get("aux_seq_1e-3", "val_ce"), get("aux_batch_1e-3", "val_ce"), get("v3", "val_ce")
        rows.append((
            "Sequence-wise aux loss is (slightly) worse than aux-free and than a batch-wise aux loss",
            "V3 §4.5.3, 1B: sequence-wise 2.258, aux-free 2.253, batch-wise 2.253 validation loss",
            f"val CE sequence-wise {fmt(seq)}, aux-free (V3 setting) {fmt(free)}, batch-wise {fmt(bat)}",
            ("reproduces" if compare(seq, free) == "higher" and compare(seq, bat) == "higher" else
             "within seed noise" if compare(seq, free) == "tie" else "does not reproduce"),
            "The paper's gap is 0.005 nats on a 1B model, far below our seed spread, which is largest for the "
            "arms that balance least."))
    if has("none", "sign_sched"):
        rows.append((
            "Without balancing, routing collapses",
            "motivation of both papers (no number given)",
            f"MaxVio_g none {fmt(get('none', 'maxvio_global'))} vs loss-free "
            f"{fmt(get('sign_sched', 'maxvio_global'))}; val CE {fmt(get('none', 'val_ce'))} vs "
            f"{fmt(get('sign_sched', 'val_ce'))}",
            "reproduces" if compare(get("none", "maxvio_global"), get("sign_sched", "maxvio_global")) == "higher"
            else "does not reproduce",
            "MaxVio near E/K - 1 = 3 means a layer sends every token to the same 4 experts."))
    return rows


def write_table(rec: dict, out: Path, prefix: str) -> str:
    any_rec = next(iter(rec.values()))[0]
    tc, mc = any_rec["config"]["train"], any_rec["config"]["model"]
    seeds = max(len(v) for v in rec.values())
    lines = [
        "# Load-balancing ablation",
        "",
        f"Model: the tiny preset's size with {mc['n_routed_experts']} routed experts, top-{mc['num_experts_per_tok']} "
        f"({mc['n_group']} groups, {mc['topk_group']} kept), {mc['num_hidden_layers'] - mc['first_k_dense_replace']} "
        f"MoE layers, no MTP. {tc['steps']} steps of {tc['global_batch_size']} x {tc['seq_len']} tokens "
        f"({tc['steps'] * tc['global_batch_size'] * tc['seq_len'] / 1e3:.0f}k tokens), lr {tc['learning_rate']} "
        f"(warm-up, constant, cosine), byte-level default corpus; {seeds} seed(s) per arm, value ± half the "
        "seed range. MaxVio averaged over the main MoE layers: _global_ over all validation tokens of the final "
        "model, _batch_ per training batch averaged over the last 20% of steps. Regenerate with "
        "`PYTHONPATH=$PWD python experiments/ablate_balance.py`.",
        "",
    ]
    lines += arm_table(ARMS, rec, ["val CE (main head)", "MaxVio_global", "MaxVio_batch (last 20%)"],
                       lambda rs: [fmt([r["val_ce"] for r in rs], 4), fmt([r["maxvio_global"] for r in rs]),
                                   fmt([r["maxvio_batch"] for r in rs])])
    lines += ["", "What this scale implies: 100 updates of 512 tokens over 16 experts show the balancing mechanisms "
              "at work (MaxVio falls from the collapsed value of 3 for every method that moves fast enough) but "
              "not their converged state, so no arm reaches the papers' MaxVio of 0.04, and quality differences "
              "of the papers' size (under 1%) are below the seed spread. Verdicts compare means against the two "
              "seeds' spread: a difference inside it is reported as a tie.",
              "", "## Beside the papers", "",
              "| finding | paper | ours | verdict | why (at this scale) |", "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in findings(rec)]
    lines += ["", f"Plots: `{prefix}_maxvio.png` (MaxVio_batch per arm), `{prefix}_load.png` (per-expert load over "
              f"steps), `{prefix}_bias.png` (bias trajectories), `{prefix}_val.png` (validation CE)."]
    text = "\n".join(lines) + "\n"
    (out / f"{prefix}.md").write_text(text)
    return text


def plot(rec: dict, out: Path, prefix: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {n: ARMS[n][0] for n in rec}
    fig, ax = plt.subplots(figsize=(9, 5))
    for n, rs in rec.items():
        curve = np.mean([r["maxvio_batch_curve"] for r in rs], 0)
        ax.plot(rs[0]["steps"], smooth(curve), label=labels[n])
    ax.set(yscale="log", xlabel="step", ylabel="MaxVio_batch (mean over layers and seeds, 5-step mean)",
           title="Load violation per training batch")
    ax.legend(fontsize=7)
    save(fig, out / f"{prefix}_maxvio.png")

    show = [n for n in ("none", "aux_batch_1e-2", "sign_sched", "proportional") if n in rec and
            "expert_counts" in rec[n][0]] or [n for n in rec if "expert_counts" in rec[n][0]][:4]
    fig, axes = plt.subplots(len(show), 1, figsize=(9, 2.2 * len(show)), squeeze=False)
    for ax, n in zip(axes[:, 0], show):
        c = np.asarray(rec[n][0]["expert_counts"], float)                       # [steps, layers, E]
        layer = c.shape[1] // 2
        load = c[:, layer] / c[:, layer].mean(-1, keepdims=True)               # load / mean load
        im = ax.imshow(load.T, aspect="auto", cmap="magma", vmin=0, vmax=3, interpolation="nearest",
                       extent=(rec[n][0]["steps"][0], rec[n][0]["steps"][-1], load.shape[1] - 0.5, -0.5))
        ax.set(ylabel="expert", title=f"{labels[n]}: load / mean, MoE layer {layer}, seed 0")
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("step")
    save(fig, out / f"{prefix}_load.png")

    show = [n for n in ("sign_1e-4", "sign_1e-3", "sign_1e-2", "sign_sched", "proportional", "v3")
            if n in rec and "router_bias" in rec[n][0]]
    if show:
        nrows = 2 if len(show) > 3 else 1
        ncols = -(-len(show) // nrows)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False, sharey=True)
        for ax in axes.flat[len(show):]:
            ax.axis("off")
        for ax, n in zip(axes.flat, show):
            b = np.asarray(rec[n][0]["router_bias"])                          # [steps, layers, E]
            ax.plot(rec[n][0]["steps"], b[:, b.shape[1] // 2], lw=0.8)
            ax.set(title=labels[n], xlabel="step")
            ax.title.set_fontsize(8)
        for ax in axes[:, 0]:
            ax.set_ylabel("router bias (middle layer, seed 0)")
        save(fig, out / f"{prefix}_bias.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(rec)
    for i, n in enumerate(names):
        m, s = mean_spread([r["val_ce"] for r in rec[n]])
        a1.errorbar(m, i, xerr=s, fmt="o", capsize=3)
        curve = np.mean([[v for _, v in r["val_curve"]] for r in rec[n]], 0)
        a2.plot([s_ for s_, _ in rec[n][0]["val_curve"]], curve, marker=".", label=labels[n])
    a1.set(yticks=range(len(names)), yticklabels=[labels[n] for n in names], xlabel="final validation CE "
           "(nats/byte; bars: seed range)")
    a1.tick_params(axis="y", labelsize=7)
    a2.set(xlabel="step", ylabel="validation CE (mean over seeds)", yscale="log")
    a2.legend(fontsize=6)
    save(fig, out / f"{prefix}_val.png")


def main():
    args = parse_args(__doc__.splitlines()[0], "ablate_balance")
    if args.quick and not args.arms:
        args.arms = ",".join(QUICK_ARMS)
    rec = sweep(args, ARMS, first=("v3",))       # ablate_mtp.py's D=0 arm is the V3 setting
    out = Path(args.out)
    print(write_table(rec, out, args.prefix))
    plot(rec, out, args.prefix)


if __name__ == "__main__":
    main()
