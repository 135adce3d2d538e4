"""experiments/train_memory.py: the train step compiled (never run) per MoE dispatch, its temporaries and
compiled FLOPs tabulated; ragged, which XLA:CPU expands over every expert, compiles to more FLOPs than gathered."""

import json
import os

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.slow       # an experiment script's table (four train-step compiles); the default suite is near 10 min
def test_table_per_batch_and_dispatch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(EXPERIMENTS)
    import train_memory
    rows = train_memory.main(["--preset", "tiny", "--impls", "ragged,gathered", "--dtype", "float32",
                              "--batches", "2,4", "--out", str(tmp_path), "train.seq_len=64",
                              "model.num_hidden_layers=2", "model.scan_unroll=2"])
    assert [(r["batch"], r["impl"]) for r in rows] == [(2, "ragged"), (2, "gathered"), (4, "ragged"), (4, "gathered")]
    for ragged, gathered in (rows[:2], rows[2:]):
        assert ragged["flops_per_device"] > gathered["flops_per_device"] > 0
        assert ragged["temp_bytes"] > 0 and gathered["temp_bytes"] > 0
    table = (tmp_path / "train_memory.md").read_text()
    assert "| 4 | gathered |" in table and "compiled FLOPs / model FLOPs" in table
    assert json.loads((tmp_path / "train_memory.json").read_text())[3]["impl"] == "gathered"
