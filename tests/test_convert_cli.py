"""`convert --out`: an export never loses what is already saved.
  * An --out that is the source, a training run, a file, or a non-empty directory (unless --overwrite, and
    then only an earlier HF export) is refused before anything is read, with exit 2 and nothing changed.
  * The export is written into a sibling and renamed into place: one that fails part-way leaves --out as it
    was; one that replaces an earlier export leaves none of the earlier files behind.
  * A real re-save of an HF checkpoint, then again with --overwrite, reads back equal to its source."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from dsv3_jax.__main__ import main
from dsv3_jax.config import run_preset, save_hf_config
from dsv3_jax.train.checkpoint import save_run_config


def _snapshot(root: Path) -> dict:
    """Every file under root (names, relative) -> a hash of its bytes: equal snapshots, nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_hf(path: Path) -> Path:
    path.mkdir(parents=True)
    save_hf_config(str(path), run_preset("tiny").model)
    (path / "model.safetensors").write_bytes(b"stale shard")
    return path


def _fake_run(path: Path) -> Path:
    (path / "checkpoints" / "100").mkdir(parents=True)
    save_run_config(str(path), run_preset("tiny"))
    (path / "metrics.jsonl").write_text('{"step": 100}\n')
    return path


@pytest.mark.parametrize("source,out,overwrite,message", [
    ("run", "run", False, "is or holds the checkpoint being converted"),
    ("hf", "hf", True, "is or holds the checkpoint being converted"),          # --overwrite does not make it allowed
    ("hf", "run", True, "holds a training run"),
    ("hf", "checkpoints_only", True, "holds a training run"),
    ("run", "export", False, "is not empty (config.json, model.safetensors, nested); choose a new directory, or pass "
                             "--overwrite"),
    ("run", "notes", True, "is not an HF checkpoint (notes.txt); --overwrite only replaces one"),
    ("run", "file", False, "is a file; give a directory to create"),
    ("nested", "export", True, "is or holds the checkpoint being converted")])     # replacing it would delete it
def test_an_out_that_would_lose_something_is_refused(source, out, overwrite, message, tmp_path, capsys):
    """Fake directories (no weights): a refusal must come before the source is read, and change nothing."""
    dirs = {"run": _fake_run(tmp_path / "run"), "hf": _fake_hf(tmp_path / "hf"),
            "export": _fake_hf(tmp_path / "export"), "notes": tmp_path / "notes",
            "checkpoints_only": tmp_path / "checkpoints_only", "file": tmp_path / "file"}
    dirs["nested"] = _fake_hf(dirs["export"] / "nested")                    # an HF checkpoint inside an export
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints_only" / "checkpoints").mkdir(parents=True)
    (tmp_path / "file").write_text("mine")
    before = _snapshot(tmp_path)
    argv = ["convert", f"--{'run' if source == 'run' else 'hf'}-dir", str(dirs[source]), "--out", str(dirs[out])]
    assert main(argv + (["--overwrite"] if overwrite else [])) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was written" in err
    assert _snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(set(dirs) - {"nested"})    # no partial sibling left behind


def test_an_export_is_written_whole_or_not_at_all(tmp_path):
    """write_directory: a write that fails part-way leaves --out (an earlier export) as it was and no
    sibling; one that succeeds replaces it whole (the earlier export's second shard does not survive)."""
    from dsv3_jax.runs import write_directory
    out = _fake_hf(tmp_path / "out")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old")
    before = _snapshot(tmp_path)

    def fails(path):
        Path(path, "config.json").write_text("{}")
        raise OSError("No space left on device")
    with pytest.raises(OSError, match="No space left"):
        write_directory(str(out), fails)
    assert _snapshot(tmp_path) == before and os.listdir(tmp_path) == ["out"]

    write_directory(str(out), lambda path: Path(path, "model.safetensors").write_bytes(b"new"))
    assert _snapshot(out) == {"model.safetensors": hashlib.sha256(b"new").hexdigest()}
    assert os.listdir(tmp_path) == ["out"]
    assert (os.stat(out).st_mode & 0o777) == (0o777 & ~_umask())      # as mkdir makes it, not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_hf_checkpoint_resaved_and_overwritten_reads_back_equal(random_variables, tmp_path, capsys):
    """convert --hf-dir to a new directory, then again over it with --overwrite: each time the variables read
    back are the source's exactly (float32 to float32, MTP module included), and the tokenizer comes along
    for generate --hf-dir. The source is written by our own save_checkpoint (hf_utils' transformers-written
    one costs half a minute to make; test_hf_cli exports to transformers)."""
    from flax import traverse_util
    from dsv3_jax.hf import load_checkpoint, save_checkpoint
    cfg = run_preset("tiny").model.replace(num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2,
                                           n_group=1, topk_group=1)
    source = tmp_path / "source"
    save_checkpoint(str(source), cfg, random_variables(cfg))
    (source / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    out = tmp_path / "resaved"
    _, expected = load_checkpoint(str(source))
    for extra in ([], ["--overwrite"]):
        assert main(["convert", "--hf-dir", str(source), "--out", str(out), "--dtype", "float32", *extra]) == 0
        _, saved = load_checkpoint(str(out))
        a, b = traverse_util.flatten_dict(expected), traverse_util.flatten_dict(saved)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        assert (out / "tokenizer.json").read_text() == (source / "tokenizer.json").read_text()
    assert sorted(os.listdir(tmp_path)) == ["resaved", "source"]
    capsys.readouterr()
