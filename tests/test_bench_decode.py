"""experiments/bench_decode.py's batch and serving-queue tables over several trained runs (`--batch-runs`): one
table of each per run, labelled with what decides whether its decode step is bound by weight reads, and one
README row each."""

import json
import os
import sys

import pytest

from dsv3_jax.config import MeshConfig
from train_utils import make_run, write_corpus

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.slow
def test_batch_tables_for_two_runs(tmp_path, monkeypatch):
    from dsv3_jax.train.loop import train
    monkeypatch.syspath_prepend(EXPERIMENTS)
    import bench_decode
    import readme_table
    corpus = write_corpus(tmp_path / "c.txt")
    runs = {}
    for name, experts in (("few", 4), ("many", 8)):
        rc = make_run(MeshConfig(), model_changes={"n_routed_experts": experts, "n_group": 2, "topk_group": 1}, steps=2,
                      data=corpus, eval_every=2, checkpoint_every=2)
        runs[name] = str(tmp_path / name)
        train(rc, runs[name], progress=False, async_checkpoints=False)
    out = tmp_path / "out"
    args = ["--preset", "tiny", "--contexts", "64", "--steps", "1", "--repeats", "1", "--new-tokens", "6",
            "--prompts", "2", "--prompt-tokens", "8", "--agree-presets", "", "--batch", "1,2",
            "--queue", "2", "--queue-batch", "2", "--run-dir", runs["few"], "--batch-runs", runs["many"],
            "--out", str(out)]
    bench_decode.main(args)

    saved = json.loads((out / "bench_decode.json").read_text())
    by_model = {}
    for r in saved["batches"]:
        by_model.setdefault(r["model"], []).append(r)
    assert list(by_model) == [runs["few"], runs["many"]]
    assert [r["batch"] for r in by_model[runs["many"]]] == [1, 2]
    assert [r["routed_experts"] for r in saved["batches"]] == [4, 4, 8, 8]
    # every batch size decodes the same lcm(1, 2) = 2 prompts: two one-row groups, one two-row group
    assert [r["groups"] for r in saved["batches"]] == [2, 1, 2, 1]
    assert [(r["model"], r["batch"], r["requests"]) for r in saved["queue"]] == [(runs["few"], 2, 4),
                                                                               (runs["many"], 2, 4)]
    assert all(r["spec_prefill_calls"] == r["plain_prefill_calls"] == 2 for r in saved["queue"])   # 2 + 2 prompts
    few_mib, many_mib = by_model[runs["few"]][0]["weights_mib"], by_model[runs["many"]][0]["weights_mib"]
    assert 0 < few_mib < many_mib
    md = (out / "bench_decode.md").read_text()
    assert md.count("## Plain and speculative greedy decoding by batch") == 2
    assert md.count("## Serving queue") == 2
    assert f"{runs['few']}: 3 layers, 4 routed experts" in md and f"{runs['many']}: 3 layers, 8 routed experts" in md
    rows = readme_table._decode_rows(saved)
    batch_rows = [r for r in rows if r[0].startswith("greedy decoding of a trained run")]
    assert [("4 routed experts" in r[0], "8 routed experts" in r[0]) for r in batch_rows] == [(True, False),
                                                                                            (False, True)]
    assert "--batch-runs" not in batch_rows[0][2] and "--batch-runs RUN2" in batch_rows[1][2]
    queue_rows = [r for r in rows if r[0].startswith("serving queue")]
    assert len(queue_rows) == 2 and all("--queue 2" in r[2] for r in queue_rows)
    assert "--batch-runs" not in queue_rows[0][2] and "--batch-runs RUN2" in queue_rows[1][2]

    with pytest.raises(SystemExit, match="not a training run directory"):
        bench_decode.main(args[:-4] + ["--batch-runs", str(tmp_path), "--out", str(tmp_path / "out2")])


@pytest.mark.slow
def test_spec_depth_table(tmp_path, monkeypatch):
    """experiments/spec_depth.py: one row per (depth, batch), the weights growing with depth, the bound the
    stated tokens per forward over the measured step ratio, and the table and plot written."""
    monkeypatch.syspath_prepend(EXPERIMENTS)
    import spec_depth
    out = spec_depth.main(["--preset", "tiny", "--depths", "1,2", "--batches", "1,2", "--repeats", "1",
                           "--tokens-per-forward", "1.5", "--out", str(tmp_path)])
    rows = out["rows"]
    assert [(r["layers"], r["batch"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert rows[0]["weights_mib"] < rows[2]["weights_mib"]
    for r in rows:
        assert r["plain_step_us"] > 0 and r["spec_step_us"] > 0
        assert r["bound"] == pytest.approx(1.5 / r["step_over_plain"])
    saved = json.loads((tmp_path / "spec_depth.json").read_text())
    assert saved["rows"] == rows
    assert (tmp_path / "spec_depth.md").read_text().count("\n| ") == 1 + len(rows)    # header + one per row
    assert (tmp_path / "spec_depth.png").stat().st_size > 0
