"""Bad input and impossible configs: a clear error naming the problem before anything is compiled, and
nothing written; no pickle and no eval in the package."""

from __future__ import annotations

from reliability_utils import *  # noqa: F401,F403  (imports, helpers, the corpus fixture)

import importlib.util
import json

from dsv3_jax.errors import InputError

# ----------------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything is built or compiled, and nothing written


def _input_case(kind: str, tmp_path: Path, monkeypatch) -> tuple[dict, dict, type, str]:
    """-> (train changes, model changes, exception type, message pattern)."""
    if kind == "npy_id_too_large":
        np.save(tmp_path / "t.npy", np.r_[np.arange(200), 300, np.arange(200)].astype(np.int32))
        return dict(data=str(tmp_path / "t.npy")), {}, ValueError, r"t\.npy: 1 token id\(s\) out of range for " \
                                                                    r"vocab_size 256: values \[300\]"
    if kind == "npy_id_negative":
        np.save(tmp_path / "t.npy", np.r_[np.arange(200), -1].astype(np.int32))
        return dict(data=str(tmp_path / "t.npy")), {}, ValueError, r"out of range for vocab_size 256: values \[-1\]"
    if kind == "bin_id_too_large":
        np.r_[np.arange(500) % 256, 256, 65535].astype(np.uint16).tofile(tmp_path / "t.bin")
        return dict(data=str(tmp_path / "t.bin")), {}, ValueError, r"t\.bin: 2 token id\(s\) out of range"
    if kind == "text_with_bigger_tokenizer":            # bytes (256 ids) into a 128-row embedding
        write_corpus(tmp_path / "c.txt", 5000)
        return dict(data=str(tmp_path / "c.txt")), dict(vocab_size=128), ValueError, \
            r"tokenizer has 256 ids but model\.vocab_size=128"
    if kind == "hf_tokenizer_bigger_than_model":
        tokenizers = pytest.importorskip("tokenizers")
        tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
        tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        tk.save(str(tmp_path / "tokenizer.json"))
        write_corpus(tmp_path / "c.txt", 5000)
        return dict(data=str(tmp_path / "c.txt"), tokenizer=str(tmp_path / "tokenizer.json")), {}, ValueError, \
            r"tokenizer has 300 ids but model\.vocab_size=256"
    if kind == "empty_file":
        (tmp_path / "empty.txt").write_text("")
        return dict(data=str(tmp_path / "empty.txt")), {}, ValueError, r"empty\.txt has no tokens"
    if kind == "empty_npy":
        np.save(tmp_path / "e.npy", np.zeros(0, np.int32))
        return dict(data=str(tmp_path / "e.npy")), {}, ValueError, r"e\.npy has no tokens"
    if kind == "folder_without_text":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "image.png").write_bytes(b"\x89PNG")
        return dict(data=str(tmp_path / "folder")), {}, ValueError, r"folder has no tokens: no text files"
    if kind == "missing_path":
        return dict(data=str(tmp_path / "nope.txt")), {}, FileNotFoundError, r"data path not found: .*nope\.txt"
    if kind == "unreadable_file":
        path = tmp_path / "secret.txt"
        write_corpus(path, 5000)
        path.chmod(0)
        if os.access(path, os.R_OK):                      # root reads anything: make the read fail instead
            import builtins
            from dsv3_jax.data import pipeline

            def fake_open(file, *a, **k):
                if os.fspath(file) == str(path):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return builtins.open(file, *a, **k)
            monkeypatch.setattr(pipeline, "open", fake_open, raising=False)
        return dict(data=str(path)), {}, OSError, r"cannot read .*secret\.txt: Permission denied"
    if kind == "not_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
        return dict(data=str(tmp_path / "latin1.txt")), {}, ValueError, r"latin1\.txt is not UTF-8"
    if kind == "float_npy":
        np.save(tmp_path / "f.npy", np.ones(500, np.float32))
        return dict(data=str(tmp_path / "f.npy")), {}, ValueError, r"expected an integer token array"
    if kind == "seq_len_beyond_positions":
        write_corpus(tmp_path / "c.txt", 5000)
        return dict(data=str(tmp_path / "c.txt"), seq_len=300), {}, ValueError, \
            r"train\.seq_len=300 is longer than model\.max_position_embeddings=256"
    if kind == "corpus_shorter_than_a_sequence":
        (tmp_path / "short.txt").write_text("tiny")
        return dict(data=str(tmp_path / "short.txt")), {}, ValueError, r"too small|fewer than"
    raise ValueError(kind)


INPUT_CASES = ["npy_id_too_large", "npy_id_negative", "bin_id_too_large", "text_with_bigger_tokenizer",
               "hf_tokenizer_bigger_than_model", "empty_file", "empty_npy", "folder_without_text", "missing_path",
               "unreadable_file", "not_utf8", "float_npy", "seq_len_beyond_positions",
               "corpus_shorter_than_a_sequence"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if train() gets as far as building the model (and so compiling anything)."""
    def refuse(*a, **k):
        raise AssertionError("train() reached the model before rejecting its input")
    monkeypatch.setattr(loop_lib, "Transformer", refuse)


@pytest.mark.parametrize("kind", INPUT_CASES)
def test_bad_input_is_a_clear_error_before_anything_runs(kind, tmp_path, monkeypatch, capsys, no_model):
    train_changes, model_changes, exc, pattern = _input_case(kind, tmp_path, monkeypatch)
    rc = rel_run(model_changes=model_changes, **train_changes)
    run_dir = tmp_path / "run"
    with pytest.raises(exc, match=pattern) as info:
        train(rc, str(run_dir), progress=False)
    assert isinstance(info.value, InputError), type(info.value)      # what the CLI reports as bad input
    assert main(cli(rc, run_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err) and "Traceback" not in err, err
    assert not run_dir.exists()


def test_bad_input_exit_code_of_the_real_cli(tmp_path):
    """One case through `python -m dsv3_jax train` itself: exit status 2, one line, no traceback."""
    np.save(tmp_path / "t.npy", np.r_[np.arange(200), 999].astype(np.int32))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "dsv3_jax", "train", "--run-dir", str(tmp_path / "run"),
                        "--no-progress", "--data", str(tmp_path / "t.npy")],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: ") and "values [999]" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Only our validation errors are "bad input": a bug keeps its traceback


@pytest.mark.parametrize("bug", [ValueError("a bug's ValueError, not bad input"),
                                 OSError("a bug's OSError, not bad input")])
def test_a_bug_is_not_reported_as_bad_input(bug, tmp_path, capsys, monkeypatch):
    """main() maps only InputError to exit 2: a plain ValueError or OSError (a bug, or one raised inside JAX
    tracing) propagates out of main(), traceback and all."""
    def fail(*a, **k):
        raise bug
    monkeypatch.setattr(loop_lib, "train", fail)
    with pytest.raises(type(bug), match="a bug"):
        main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert "error: " not in capsys.readouterr().err


def test_a_bug_in_the_real_cli_exits_1_with_its_traceback(tmp_path):
    """The same through the interpreter: a bug's ValueError ends `python -m dsv3_jax`-style runs with
    Python's traceback and exit status 1, never the bad-input status 2."""
    code = ("import sys\n"
            "from dsv3_jax.train import loop\n"
            "def train(*a, **k):\n"
            "    raise ValueError('planted bug')\n"
            "loop.train = train\n"
            "from dsv3_jax.__main__ import main\n"
            f"sys.exit(main(['train', '--run-dir', {str(tmp_path / 'run')!r}, '--no-progress']))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" in p.stderr and "ValueError: planted bug" in p.stderr
    assert not p.stderr.startswith("error: ")


# ----------------------------------------------------------------------------------------------------------
# Impossible configs: a ValueError naming the field, through train() and the CLI


MESH_CASES = [
    # (mesh, model changes, train changes, pattern)
    (MeshConfig(data=1, tensor=8), dict(num_attention_heads=4), {}, r"num_attention_heads=4 is not divisible by the "
                                                                    r"tensor axis \(8\)"),
    (MeshConfig(data=1, expert=8), dict(n_routed_experts=12), {}, r"n_routed_experts=12 is not divisible by the "
                                                                  r"expert axis \(8\)"),
    (MeshConfig(data=4, expert=2), {}, dict(global_batch_size=12), r"global_batch_size=12 is not divisible by data "
                                                                   r"x expert = 8"),
    (MeshConfig(data=4, expert=2), {}, dict(global_batch_size=8, microbatches=2),
     r"global_batch_size=8 in train.microbatches=2 gives 4 rows per microbatch, not divisible by data x expert = 8"),
    (MeshConfig(data=3), {}, {}, r"has 3 devices, but there are 8 devices"),
    (MeshConfig(data=3, expert=-1), {}, {}, r"needs a multiple of 3 devices, but there are 8"),
    (MeshConfig(data=2, tensor=4), dict(vocab_size=258), {}, r"vocab_size=258 is not divisible by the tensor "
                                                              r"axis \(4\)"),
]


@pytest.mark.parametrize("mesh,model_changes,train_changes,pattern", MESH_CASES)
def test_impossible_mesh_configs_name_the_field(mesh, model_changes, train_changes, pattern, corpus, tmp_path,
                                                capsys, no_model):
    rc = rel_run(mesh, model_changes=model_changes, data=corpus, **train_changes)
    run_dir = tmp_path / "run"
    with pytest.raises(InputError, match=pattern):
        train(rc, str(run_dir), progress=False)
    axes = ",".join(f"{k}={getattr(mesh, k)}" for k in ("data", "expert", "tensor"))
    assert main(cli(rc, run_dir, mesh=axes)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert not run_dir.exists()


@pytest.mark.parametrize("override,pattern", [
    ("train.steps=abc", r"override 'train\.steps=abc': expected a number"),
    ("train.steps=0", r"TrainConfig\.steps must be >= 1"),
    ("model.n_group=3", r"n_group"),
    ("train.nope=1", r"train has no field 'nope'"),
    ("mesh.data=0", r"sizes must be positive"),
])
def test_bad_overrides_are_clear_errors(override, pattern, tmp_path, capsys, no_model):
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Security: no pickle, no eval/exec, config text is data


FORBIDDEN = {
    r"\bpickle\b": "pickle (checkpoints are orbax, weights safetensors, the rest JSON)",
    r"\b(cloudpickle|dill|shelve|marshal|joblib)\b": "a pickle-like serializer",
    r"allow_pickle\s*=\s*True": "np.load that may unpickle",
    r"torch\.load\b": "torch.load (unpickles)",
    r"\beval\s*\(": "eval(",
    r"\bexec\s*\(": "exec(",
    r"yaml\.(unsafe_)?load\s*\(": "yaml.load",
}


def test_package_source_has_no_pickle_and_no_eval():
    files = sorted((REPO / "dsv3_jax").rglob("*.py"))
    assert len(files) > 10
    found = [f"{f.relative_to(REPO)}:{n}: {what}: {line.strip()}"
             for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
             for pattern, what in FORBIDDEN.items() if re.search(pattern, line)]
    assert not found, "\n".join(found)


def test_config_text_is_never_evaluated(tmp_path, capsys, no_model):
    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"
    for override in (f"train.seq_len={payload}", f"model.hidden_size={payload}", f"train.data={payload}"):
        code = main(["train", "--run-dir", str(tmp_path / "run"), "--no-progress", override])
        assert code == 2 and capsys.readouterr().err.startswith("error: ")
    assert not marker.exists()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the `tpu` extra) not installed")
def test_cli_without_tpu_chips_does_not_initialise_libtpu():
    """With libtpu installed for `plan` and JAX_PLATFORMS unset, a machine without TPU chips runs the CLI on
    CPU quietly: no libtpu initialisation errors before the output (on a TPU host jax uses the chips)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "dsv3_jax", "params", "--preset", "tiny", "--json"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["total"] > 0
    assert "TPU" not in p.stderr and "libtpu" not in p.stderr, p.stderr[-2000:]


def test_run_and_hf_directories_given_as_each_other_are_named(tmp_path, capsys):
    """A run directory given where an HF checkpoint goes (--hf-dir, --init-from) and the reverse (--run-dir of
    generate, train's --run-dir, --resume), or a file as --run-dir: exit 2 with a message that says what the
    path is and which option takes it (not a missing key, a missing safetensors file or a traceback), and
    neither directory changes."""
    from dsv3_jax.__main__ import main
    from dsv3_jax.config import run_preset, save_hf_config
    from dsv3_jax.train.checkpoint import save_run_config
    hf, run, new = tmp_path / "hf", tmp_path / "run", str(tmp_path / "new")
    hf.mkdir()
    run.mkdir()
    save_hf_config(str(hf), run_preset("tiny").model)
    save_run_config(str(run), run_preset("tiny"))
    (tmp_path / "file").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    cases = [
        (["generate", "--run-dir", str(hf), "--prompt", "x"], "is a Hugging Face checkpoint, not a dsv3_jax run: "
                                                              "pass it as --hf-dir"),
        (["train", "--run-dir", str(hf), "--resume"], "is a Hugging Face checkpoint, not a dsv3_jax run"),
        (["train", "--preset", "tiny", "--run-dir", str(hf)], "holds a Hugging Face checkpoint, not a run: start a "
                                                              f"run from it with --init-from {hf}"),
        (["generate", "--hf-dir", str(run), "--prompt", "x"], "is a dsv3_jax training run's config, not a Hugging "
                                                              "Face checkpoint's"),
        (["train", "--init-from", str(run), "--run-dir", new], "is a dsv3_jax training run's config"),
        (["train", "--preset", "tiny", "--run-dir", str(tmp_path / "file")], "is a file, not a directory")]
    for argv, message in cases:
        assert main(argv + ["--no-progress"] * (argv[0] == "train")) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not os.path.exists(new)


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "checkpoints/100/state", "tensorboard/events"])
def test_a_run_without_its_config_is_not_trained_over(leftover, tmp_path, capsys):
    """A directory holding what a run writes (metrics, checkpoint steps, TensorBoard logs) but no config.json
    (deleted, or copied without it) is refused for a fresh run: training there would cut metrics.jsonl back
    to step 0 and garbage-collect the checkpoints. Exit 2, no file changed; a directory with only the user's
    own files, or an empty checkpoints/ (another process of the same run may have just made it), passes the
    check."""
    from dsv3_jax.__main__ import main
    from dsv3_jax.train.loop import prepare_run_dir
    from dsv3_jax.config import run_preset
    path = tmp_path / "run" / leftover
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"step": 100, "loss": 1.5}\n')
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"holds {leftover.split('/')[0]}" in err and "but no config.json" in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    rc = run_preset("tiny")
    assert prepare_run_dir(str(mine), rc, resume=False) is rc
