"""Released weights through the command line, on a tiny DeepSeek-V3 written by transformers' own
save_pretrained (no MTP tensors, `num_nextn_predict_layers: 1` in config.json):
  * `train --init-from` on the (2, 2, 2) CPU mesh, `convert --run-dir`, and transformers loading the export:
    logits equal the original checkpoint's (the acceptance sequence); `generate --run-dir` on the mesh
    prints what one device prints;
  * `generate --hf-dir --mesh data=2,expert=2,tensor=2` prints what one device prints; --speculative is
    refused clearly;
  * --init-from with --preset or --resume is refused before anything runs.
The HF loads use the default moe_impl (no override is passed)."""

import json
import os

import jax
import numpy as np
import pytest

from hf_utils import TINY, cli, transformers_logits  # noqa: E402

MESH = "data=2,expert=2,tensor=2"


@pytest.mark.parametrize("argv,message", [
    (["train", "--init-from", "{hf}", "--preset", "tiny"], "--init-from takes the model from the checkpoint's"),
    (["train", "--init-from", "{hf}", "--resume"], "use --resume without --init-from"),
    (["train", "--init-from", "{tmp}/nowhere"], "no such directory"),
    (["convert"], "exactly one of --run-dir or --hf-dir"),
    (["generate", "--prompt", "x"], "exactly one of --run-dir or --hf-dir"),
    (["generate", "--hf-dir", "{hf}", "--prompt", "x", "--layout", "fsdp"], "--layout fsdp places the weights on a "
                                                                             "mesh: give --mesh")])
def test_bad_combinations_are_refused(argv, message, tmp_path, capsys):
    """Through the CLI's entry point (in process: these fail before anything is loaded), exit 2, nothing
    written."""
    from dsv3_jax.__main__ import main
    (tmp_path / "hf").mkdir()
    argv = [a.format(hf=tmp_path / "hf", tmp=tmp_path) for a in argv]
    out = ["--run-dir", str(tmp_path / "run")] if argv[0] == "train" else \
        ["--out", str(tmp_path / "run")] if argv[0] == "convert" else []
    assert main(argv + out) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_generate_on_a_mesh_prints_the_one_device_text(hf_dir):
    args = ("generate", "--hf-dir", hf_dir, "--prompt", "The quick brown fox", "--max-new-tokens", 12,
            "--temperature", 0)
    one = cli(*args, devices=1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "has no MTP module" in one.stderr                          # the transformers-saved directory
    for layout in ("replicated", "fsdp"):
        mesh = cli(*args, "--mesh", MESH, "--layout", layout)
        assert mesh.returncode == 0, mesh.stderr[-3000:]
        assert json.loads(mesh.stderr.strip().splitlines()[-1])["new_tokens"] == 12
        assert mesh.stdout == one.stdout and len(one.stdout.strip()) > 0, layout
    spec = cli(*args, "--speculative", devices=1)
    assert spec.returncode == 2 and "--speculative needs the MTP module" in spec.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mesh_options", [(), ("mesh.zero3=true", "mesh.fsdp=true")], ids=["default", "zero3-fsdp"])
def test_finetune_export_and_transformers_load(mesh_options, hf_dir, tmp_path):
    """train --init-from on the (2,2,2) mesh (its default layout, and the 671B preset's zero3 + FSDP) with a
    tiny learning rate and the bias update off, export with convert --run-dir, load with transformers: logits
    equal the original checkpoint's within 1e-4 (the same tolerance as test_hf_parity.py; a lost router bias
    or a transposed weight moves them by >= 1e-2)."""
    run = tmp_path / "run"
    r = cli("train", "--init-from", hf_dir, "--run-dir", run, "--mesh", MESH, "--no-progress", *mesh_options,
            "train.learning_rate=1e-9", "train.bias_update_rate=0", "train.steps=2", "train.global_batch_size=8",
            "train.seq_len=32", "train.warmup_steps=0", "train.eval_every=2", "train.eval_batches=1",
            "train.checkpoint_every=2", "train.max_corpus_bytes=100000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the checkpoint has no MTP module (mtp_0); it starts from a fresh initialisation" in r.stderr
    saved = json.load(open(run / "config.json"))
    assert saved["model"]["hidden_size"] == TINY.hidden_size and saved["mesh"]["expert"] == 2
    assert saved["mesh"]["fsdp"] == saved["mesh"]["zero3"] == bool(mesh_options)
    assert saved["train"]["tokenizer"] == os.path.join(hf_dir, "tokenizer.json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 2

    out = tmp_path / "export"
    r = cli("convert", "--run-dir", run, "--out", out, "--dtype", "float32", devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2" in r.stdout
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    from dsv3_jax.hf import read_safetensors_header
    names = read_safetensors_header(str(out / "model.safetensors"))[0]
    n = TINY.num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in names                    # the MTP layer, at index n
    assert f"model.layers.{n - 1}.mlp.gate.e_score_correction_bias" in names
    tokens = np.random.default_rng(4).integers(0, TINY.vocab_size, (2, 24))
    want, got = transformers_logits(hf_dir, tokens), transformers_logits(str(out), tokens)
    diff = np.abs(got - want).max()
    print(f"\nexported vs original logits: max |diff| = {diff:.3g} (|logits| max {np.abs(want).max():.3g})")
    assert np.abs(want).max() > 0.1
    assert diff <= 1e-4

    # The run generates the same text on the mesh as on one device (params restored sharded, no optimizer;
    # the zero3 + FSDP run serves in the fsdp layout).
    args = ("generate", "--run-dir", run, "--prompt", "Hello", "--max-new-tokens", 8, "--temperature", 0)
    layout = "fsdp" if mesh_options else "replicated"
    one, mesh = cli(*args, devices=1), cli(*args, "--mesh", MESH, "--layout", layout)
    assert one.returncode == 0 and mesh.returncode == 0, (one.stderr[-2000:], mesh.stderr[-2000:])
    assert mesh.stdout == one.stdout and len(one.stdout.strip()) > 0


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_generate_loads_the_weights_in_the_serving_layout(layout, hf_dir):
    """What `generate --hf-dir --mesh --layout` loads: the embedding's hidden axis split over data x expert
    under fsdp (and the routed experts over expert); under replicated only `tensor` splits anything but the
    experts. The printed text is the same either way (the slow CLI test above)."""
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.infer.cli import load_hf
    from dsv3_jax.sharding import make_mesh
    mesh = make_mesh(MeshConfig(data=2, expert=2, tensor=2))
    _, variables, _ = load_hf(hf_dir, mesh, layout=layout)
    params = variables["params"]
    axes = lambda x: set(jax.tree.leaves(tuple(x.sharding.spec)))  # noqa: E731
    assert axes(params["embedding"]) == ({"data", "expert", "tensor"} if layout == "fsdp" else {"tensor"})
    assert "expert" in axes(params["moe_layers"]["layers"]["moe"]["experts_gate_up"])
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    whole = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"\n{layout}: {per_device} of {whole} parameter bytes on device 0")
    assert per_device < (0.2 if layout == "fsdp" else 0.8) * whole
