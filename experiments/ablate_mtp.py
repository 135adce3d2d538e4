"""Multi-token prediction ablation: D=0 against D=1 and D=2 (lambda 0.3), beside DeepSeek-V3
(arXiv 2412.19437, §4.5.1 Table 4 and §5.4.3: second-token acceptance 85-90%).

    PYTHONPATH=$PWD python experiments/ablate_mtp.py                 # D=0, 1, 2; 2 seeds (resumes)
    PYTHONPATH=$PWD python experiments/ablate_mtp.py --arms d0,d1    # without D=2
    PYTHONPATH=$PWD python experiments/ablate_mtp.py --quick          # a few steps (CI)

Every arm uses the V3 balancing setting of ablate_balance.py, whose `v3` record is D=0 here (reused when
present). Writes experiments/results/ablate_mtp.md and ablate_mtp.png, and run records under ablate_mtp_runs/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ablate_balance import ARMS as BALANCE_ARMS
from ablate_common import arm_table, compare, fmt, parse_args, save, sweep

_, V3_TRAIN, _ = BALANCE_ARMS["v3"]
ARMS = {
    "d0": ("D=0 (no MTP)", V3_TRAIN, {"num_nextn_predict_layers": 0}),
    "d1": ("D=1, lambda 0.3", dict(V3_TRAIN, mtp_lambda=0.3), {"num_nextn_predict_layers": 1}),
    "d2": ("D=2, lambda 0.3", dict(V3_TRAIN, mtp_lambda=0.3), {"num_nextn_predict_layers": 2}),
}
DEFAULT_ARMS = ("d0", "d1", "d2")


def write_table(rec: dict, out: Path, prefix: str) -> str:
    tc = next(iter(rec.values()))[0]["config"]["train"]
    seeds = max(len(v) for v in rec.values())
    lines = [
        "# Multi-token prediction ablation", "",
        f"The ablation config of `ablate_balance.md` with the V3 balancing setting; {tc['steps']} steps of "
        f"{tc['global_batch_size']} x {tc['seq_len']} tokens; {seeds} seed(s), value ± half the seed range. "
        "Acceptance: teacher-forced greedy drafts on the validation text (the draft of depth k is accepted when "
        "it equals the main head's next prediction and every shallower draft was accepted). Regenerate with "
        "`PYTHONPATH=$PWD python experiments/ablate_mtp.py`.", "",
    ]

    def cells(rs):
        acc = [r.get("acceptance", []) for r in rs]
        return [fmt([r["val_ce"] for r in rs], 4), fmt([np.mean(r["train_ce"][-10:]) for r in rs]),
                fmt([a[0] for a in acc]) if acc[0] else "-", fmt([a[1] for a in acc]) if len(acc[0]) > 1 else "-"]
    lines += arm_table(ARMS, rec, ["val CE (main head)", "train CE, last 10 steps", "2nd-token acceptance",
                                   "3rd-token acceptance"], cells)
    lines += ["", "## Beside the paper", "", "| finding | paper | ours | verdict | why (at this scale) |",
              "|---|---|---|---|---|"]
    if rec.get("d0") and rec.get("d1"):
        d0, d1 = [r["val_ce"] for r in rec["d0"]], [r["val_ce"] for r in rec["d1"]]
        c = compare(d1, d0)
        lines.append(
            f"| MTP keeps the main model's validation loss (and helps downstream) | Table 4: Pile BPB unchanged "
            f"or better at small and large scale, benchmarks improve | main-head val CE D=1 {fmt(d1, 4)} vs "
            f"D=0 {fmt(d0, 4)} | {'reproduces (within seed noise)' if c == 'tie' else 'reproduces (better)' if c == 'lower' else 'does not reproduce (worse)'} "
            "| The MTP loss is a denser training signal on the same tokens (each position also learns about the "
            "token after next), which helps most when tokens are scarce, as in these 51k-token runs. Two seeds "
            "only, and no downstream benchmarks at this size. |")
        acc = [r["acceptance"][0] for r in rec["d1"]]
        ok = np.mean(acc) >= 0.85
        lines.append(
            f"| Second-token acceptance 85-90% | §5.4.3: 85-90% across generation topics | {fmt(acc)} | "
            f"{'reproduces' if ok else 'does not reproduce'} | Acceptance needs the draft to agree with the "
            "main head; on byte-level text a small, briefly trained model is uncertain about the next-but-one "
            "byte much more often than a 671B model is about the next-but-one token. |")
    text = "\n".join(lines) + "\n"
    (out / f"{prefix}.md").write_text(text)
    return text


def plot(rec: dict, out: Path, prefix: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for n, rs in rec.items():
        curve = np.mean([[v for _, v in r["val_curve"]] for r in rs], 0)
        a1.plot([s for s, _ in rs[0]["val_curve"]], curve, marker=".", label=ARMS[n][0])
    a1.set(xlabel="step", ylabel="validation CE, main head (mean over seeds)", title="Main-model quality")
    a1.legend()
    names = [n for n in rec if rec[n][0].get("acceptance")]
    for i, n in enumerate(names):
        acc = np.asarray([r["acceptance"] for r in rec[n]])                       # [seeds, depth]
        a2.bar(np.arange(acc.shape[1]) + 0.35 * i, acc.mean(0), 0.35, yerr=(acc.max(0) - acc.min(0)) / 2,
               capsize=3, label=ARMS[n][0])
    a2.axhspan(0.85, 0.90, color="green", alpha=0.2, label="V3: 85-90% (2nd token)")
    a2.set(xticks=np.arange(2) + 0.35 * (len(names) - 1) / 2, xticklabels=["2nd token", "3rd token"], ylim=(0, 1), ylabel="acceptance (validation)",
           title="Teacher-forced draft acceptance")
    a2.legend(fontsize=7)
    save(fig, out / f"{prefix}.png")


def main():
    args = parse_args(__doc__.splitlines()[0], "ablate_mtp")
    args.arms = args.arms or ",".join(DEFAULT_ARMS)
    rec = sweep(args, ARMS, first=("d1",))
    out = Path(args.out)
    print(write_table(rec, out, args.prefix))
    plot(rec, out, args.prefix)


if __name__ == "__main__":
    main()
