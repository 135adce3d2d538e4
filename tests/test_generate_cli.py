"""`generate --prompts-file`: a file of prompts served through the queue's batch slots from the command line.
Bad input is refused before anything loads; a trained run (2 steps, MTP on) served through 2 slots prints one
JSON line per prompt, in the file's order, and each completion is what `generate --prompt` prints for that
prompt alone, for plain and speculative decoding, on one device and on the (2, 2, 2) mesh."""

import json

import pytest

from hf_utils import cli
from train_utils import make_run, write_corpus


@pytest.mark.parametrize("lines,extra,message", [
    (None, [], "no such file"),
    (["", "   ", ""], [], "holds no prompts"),
    (["a"], ["--prompt", "b"], "give --prompt or --prompts-file, not both"),
    (["a"], ["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (None, ["--prompt", ""], "the prompt is empty"),
    (None, ["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (None, ["--prompt", "x", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (None, ["--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (None, ["--prompt", "x", "--drafts", "2"], "--drafts is the number of tokens a speculative step drafts: add "
                                               "--speculative"),
    (None, ["--prompt", "x", "--speculative", "--drafts", "0"], "drafts must be an integer from 1 to 3"),
    (None, ["--prompt", "x", "--batch-size", "4"], "--batch-size sets the slots that serve a --prompts-file"),
    (None, ["--prompt", "x", "--mesh", "data=z"], "--mesh 'data=z': sizes must be integers, got 'z'"),
    (None, ["--prompt", "x", "--mesh", "data=1,foo=2"], "use data=N,expert=N,tensor=N")])
def test_bad_prompts_are_refused(lines, extra, message, tmp_path, capsys):
    """In process, through the CLI's entry point: exit 2 with a one-line reason, before any run is read (the
    run directory does not even exist, so a check made after reading it would report that instead). Options
    that would do nothing (--drafts without --speculative, --batch-size for one --prompt) are refused too:
    the user meant something the command would silently not do."""
    from dsv3_jax.__main__ import main
    argv = ["generate", "--run-dir", str(tmp_path / "no-run")] + extra
    if lines is not None or "--prompt" not in extra:
        path = tmp_path / "prompts.txt"
        if lines is not None:
            path.write_text("\n".join(lines) + "\n")
        argv += ["--prompts-file", str(path)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_prompts_file_that_is_not_text_is_refused(tmp_path, capsys):
    from dsv3_jax.__main__ import main
    path = tmp_path / "prompts.bin"
    path.write_bytes(b"ok\n\xff\xfe\x00\n")
    assert main(["generate", "--run-dir", str(tmp_path), "--prompts-file", str(path)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("model_changes,extra,message", [
    ({"max_position_embeddings": 16}, ["--prompt", "a prompt of more than sixteen bytes"],
     "positions, more than max_position_embeddings = 16"),
    ({}, ["--prompt", "x", "--max-new-tokens", "5000"], "5001 positions, more than max_position_embeddings"),
    ({"num_nextn_predict_layers": 0}, ["--prompt", "x", "--speculative"], "--speculative needs the MTP module")])
def test_a_request_the_model_cannot_serve_is_refused_before_the_weights_load(model_changes, extra, message,
                                                                              tmp_path, capsys):
    """A run directory with its config and no checkpoint at all: the request is checked against the model's
    config and tokenizer first, so the answer names the request, not the missing weights (which a 671B
    load would take a long time to reach)."""
    import dataclasses
    from dsv3_jax.__main__ import main
    from dsv3_jax.config import run_preset
    from dsv3_jax.train.checkpoint import save_run_config
    rc = run_preset("tiny")
    save_run_config(str(tmp_path), dataclasses.replace(rc, model=rc.model.replace(**model_changes)))
    assert main(["generate", "--run-dir", str(tmp_path), "--max-new-tokens", "8", *extra]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_prompt_of_a_file_is_named_by_its_index_and_line(tmp_path, capsys):
    """The JSON output numbers prompts from 0 ("index") and skips blank lines, so an error about a prompt of
    a --prompts-file gives both its index and its line in the file."""
    import dataclasses
    from dsv3_jax.__main__ import main
    from dsv3_jax.config import run_preset
    from dsv3_jax.train.checkpoint import save_run_config
    rc = run_preset("tiny")
    save_run_config(str(tmp_path), dataclasses.replace(rc, model=rc.model.replace(max_position_embeddings=16)))
    path = tmp_path / "prompts.txt"
    path.write_text("short\n\n   \na prompt of more than sixteen bytes\n")
    assert main(["generate", "--run-dir", str(tmp_path), "--max-new-tokens", "8", "--prompts-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"prompt 1 (line 4 of {path}) has" in err, err


@pytest.mark.slow
def test_prompts_file_gives_each_prompt_its_own_completion(tmp_path):
    from dsv3_jax.config import MeshConfig
    from dsv3_jax.train.loop import train
    corpus = write_corpus(tmp_path / "c.txt")
    run = str(tmp_path / "run")
    train(make_run(MeshConfig(), steps=2, data=corpus, eval_every=2, checkpoint_every=2), run, progress=False,
          async_checkpoints=False)
    prompts = ["def main(", "alpha beta", "router ", "x", "latent token expert"]
    path = tmp_path / "prompts.txt"
    path.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")            # a blank line is skipped
    common = ("generate", "--run-dir", run, "--max-new-tokens", 12)
    served = {}
    for spec in ((), ("--speculative",), ("--speculative", "--mesh", "data=2,expert=2,tensor=2")):
        r = cli(*common, "--prompts-file", path, "--batch-size", 2, *spec, devices=8 if "--mesh" in spec else 1)
        assert r.returncode == 0, r.stderr[-3000:]
        served[spec] = [json.loads(line) for line in r.stdout.splitlines()]
        stats = json.loads(r.stderr.strip().splitlines()[-1])
        assert stats["batch_size"] == 2 and stats["refills"] == 3 and stats["new_tokens"] == 5 * 12
        if spec:                                    # one acceptance per prompt, rounded like the other floats
            assert len(stats["acceptance_per_prompt"]) == 5
            assert all(0 <= a <= 1 and a == round(a, 4) for a in stats["acceptance_per_prompt"])
    plain, spec = served[()], served[("--speculative",)]
    assert served[("--speculative", "--mesh", "data=2,expert=2,tensor=2")] == spec    # weights and cache sharded
    assert [d["index"] for d in plain] == list(range(5)) and [d["prompt"] for d in plain] == prompts
    assert all(d["new_tokens"] == 12 for d in plain)
    assert [d["completion"] for d in spec] == [d["completion"] for d in plain]
    for i in (0, 4):                                # as each prompt alone prints it (a newline after the text)
        alone = cli(*common, "--prompt", prompts[i], devices=1)
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert alone.stdout == plain[i]["completion"] + "\n"
