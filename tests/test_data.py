"""Tests for the data layer (tokenizers, corpus loading, grain batching). No jax needed."""

import json

import numpy as np
import pytest

from dsv3_jax.data import (
    ByteTokenizer,
    PackedSequences,
    check_token_range,
    default_corpus_files,
    load_tokenizer,
    load_tokens,
    make_eval_batches,
    make_train_iterator,
    split_train_val,
)

# ----------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_unicode_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld — 你好, 🚀 ∑x²\n\ttab"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 0 and ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.eos_id is None


def test_byte_tokenizer_decode_skips_out_of_vocab_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    assert tok.decode([104, 300, 105, 1000]) == "hi"
    assert tok.decode([0xFF]) == "\ufffd"


def test_load_tokenizer_default_and_missing(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)  # folder without a tokenizer.json


def test_hf_tokenizer_from_folder(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 4 and tok.eos_id == 3
    ids = tok.encode("hello world hello")
    assert ids.dtype == np.int32 and ids.tolist() == [1, 2, 1]
    assert "hello" in tok.decode(ids)
    # Documents are joined with the eos id when the vocab has one.
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello")
    (tmp_path / "docs" / "b.txt").write_text("world")
    assert load_tokens(tmp_path / "docs", tok).tolist() == [1, 3, 2]


# ----------------------------------------------------------------------------
# loading


def test_default_corpus_nonempty_and_deterministic():
    files = default_corpus_files()
    assert len(files) > 50 and files == sorted(files) == default_corpus_files()
    assert all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or "/test/" in f or "/idlelib/" in f for f in files)
    a = load_tokens(None, ByteTokenizer(), max_bytes=50_000)
    b = load_tokens(None, ByteTokenizer(), max_bytes=50_000)
    assert a.dtype == np.int32 and a.ndim == 1 and 50_000 <= len(a) < 60_000
    np.testing.assert_array_equal(a, b)


def test_load_text_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo")
    tokens = load_tokens(p, ByteTokenizer())
    assert tokens.dtype == np.int32
    assert ByteTokenizer().decode(tokens) == "héllo"
    assert len(load_tokens(p, ByteTokenizer(), max_bytes=2)) == 1  # cap cuts 'é' in half


def test_load_folder_sorted_recursive_with_separator(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("BBB")
    (tmp_path / "a.py").write_text("AAA")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00")  # not text: ignored
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("hidden")  # hidden folder: ignored
    tokens = load_tokens(tmp_path, ByteTokenizer())
    assert ByteTokenizer().decode(tokens) == "AAA\n\nBBB"


def test_load_npy_and_bin(tmp_path):
    ids = np.array([1, 5, 300, 65535, 7], dtype=np.int64)
    np.save(tmp_path / "t.npy", ids)
    ids.astype(np.uint16).tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        out = load_tokens(tmp_path / name, None, vocab_size=65536)
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, ids)


# ----------------------------------------------------------------------------
# bad inputs


def test_missing_path_names_it(tmp_path):
    p = tmp_path / "does_not_exist.txt"
    with pytest.raises(FileNotFoundError, match="does_not_exist.txt"):
        load_tokens(p, ByteTokenizer())


def test_empty_file_and_folder(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*no tokens"):
        load_tokens(p, ByteTokenizer())
    d = tmp_path / "emptydir"
    d.mkdir()
    with pytest.raises(ValueError, match="emptydir.*no tokens"):
        load_tokens(d, ByteTokenizer())
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin.*no tokens"):
        load_tokens(tmp_path / "empty.bin", None)


def test_non_utf8_file_names_it(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match="latin.txt"):
        load_tokens(p, ByteTokenizer())


def test_bad_npy(tmp_path):
    np.save(tmp_path / "two_d.npy", np.zeros((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match=r"two_d.npy.*1-D.*\(2, 3\)"):
        load_tokens(tmp_path / "two_d.npy", None)
    np.save(tmp_path / "floats.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="floats.npy.*float32"):
        load_tokens(tmp_path / "floats.npy", None)
    np.save(tmp_path / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="obj.npy"):
        load_tokens(tmp_path / "obj.npy", None)  # never unpickled


def test_out_of_range_ids(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([1, 2, 999, 3, -4], dtype=np.int32))
    with pytest.raises(ValueError) as e:
        load_tokens(tmp_path / "ids.npy", None, vocab_size=256)
    msg = str(e.value)
    assert "ids.npy" in msg and "999" in msg and "-4" in msg and "256" in msg and "position 2" in msg
    check_token_range(np.arange(256), 256, "ok")  # in range: no error


def test_sequence_too_short():
    with pytest.raises(ValueError, match=r"5 tokens.*seq_len \+ 1 = 9"):
        PackedSequences(np.arange(5), seq_len=8)
    with pytest.raises(ValueError, match="5 tokens"):
        make_train_iterator(np.arange(5), 8, 2, seed=0)


def test_batch_not_divisible_by_processes():
    with pytest.raises(ValueError, match="6.*divisible.*4"):
        make_train_iterator(np.arange(100), 4, 6, seed=0, process_count=4)


# ----------------------------------------------------------------------------
# splitting, packing, batching


def test_split_train_val():
    t = np.arange(1000, dtype=np.int32)
    train, val = split_train_val(t, val_fraction=0.1, chunks=10)
    assert len(val) == 100 and val[0] == 90 and val[-1] == 999      # held out from across the stream
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), t)   # a partition
    _, val = split_train_val(t, val_fraction=0.001, min_val_tokens=33)
    assert len(val) == 33 and np.all(np.diff(val) == 1)             # one piece when only one fits
    with pytest.raises(ValueError, match="too small"):
        split_train_val(t, min_val_tokens=1000)


def test_packed_windows_and_labels():
    src = PackedSequences(np.arange(21), seq_len=4)
    assert len(src) == 5  # (21 - 1) // 4
    w = src[1]
    assert w.dtype == np.int32 and w.tolist() == [4, 5, 6, 7, 8]
    inputs, labels = w[:-1], w[1:]
    np.testing.assert_array_equal(labels, inputs + 1)


def _stream(n=4000):
    return np.arange(n, dtype=np.int32) % 50_000


def test_train_iterator_deterministic_and_seeded():
    tokens = _stream()
    take = lambda it, n: [next(it) for _ in range(n)]
    a = take(make_train_iterator(tokens, 16, 8, seed=1), 30)
    b = take(make_train_iterator(tokens, 16, 8, seed=1), 30)
    c = take(make_train_iterator(tokens, 16, 8, seed=2), 30)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    for batch in a:
        assert batch.shape == (8, 17) and batch.dtype == np.int32
        # Labels are the inputs shifted by one (the stream is consecutive ints).
        np.testing.assert_array_equal(batch[:, 1:], batch[:, :-1] + 1)


def test_train_iterator_epochs_cover_all_and_reshuffle():
    tokens = np.arange(161, dtype=np.int32)  # 40 windows of seq_len 4
    it = make_train_iterator(tokens, 4, 8, seed=0, num_epochs=2)
    batches = list(it)
    assert len(batches) == 10  # 2 * 40 // 8, then StopIteration
    starts = np.concatenate([b[:, 0] for b in batches])
    ep1, ep2 = starts[:40], starts[40:]
    assert sorted(ep1) == sorted(ep2) == list(range(0, 160, 4))
    assert not np.array_equal(ep1, ep2)


def test_train_iterator_process_shards_partition_global_batch():
    tokens = _stream()
    whole = make_train_iterator(tokens, 16, 8, seed=3)
    p0 = make_train_iterator(tokens, 16, 8, seed=3, process_index=0, process_count=2)
    p1 = make_train_iterator(tokens, 16, 8, seed=3, process_index=1, process_count=2)
    for _ in range(20):
        g, a, b = next(whole), next(p0), next(p1)
        assert a.shape == b.shape == (4, 17)
        rows = lambda x: {tuple(r) for r in x.tolist()}
        assert not rows(a) & rows(b)
        assert rows(a) | rows(b) == rows(g)


def test_train_iterator_resume_matches_uninterrupted():
    tokens = _stream()
    ref = make_train_iterator(tokens, 16, 4, seed=7, process_index=1, process_count=2)
    expected = [next(ref) for _ in range(25)]

    it = make_train_iterator(tokens, 16, 4, seed=7, process_index=1, process_count=2)
    for _ in range(10):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    assert state["step"] == 10

    for fresh in (it, make_train_iterator(tokens, 16, 4, seed=7, process_index=1, process_count=2)):
        fresh.set_state(state)
        for want in expected[10:]:
            np.testing.assert_array_equal(next(fresh), want)

    other = make_train_iterator(tokens, 16, 4, seed=8, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_eval_batches_fixed():
    tokens = np.arange(1001, dtype=np.int32)
    a = make_eval_batches(tokens, 10, 4, max_batches=3)
    b = make_eval_batches(tokens, 10, 4, max_batches=3)
    assert len(a) == 3 and all(x.shape == (4, 11) and x.dtype == np.int32 for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[0][:, 1:], a[0][:, :-1] + 1)
    assert len(make_eval_batches(tokens, 10, 4, max_batches=1000)) == 25  # 100 windows // 4
    with pytest.raises(ValueError, match="fewer than one eval batch"):
        make_eval_batches(tokens[:30], 10, 4, max_batches=2)
