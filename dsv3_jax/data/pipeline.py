"""Training data: load a token stream, pack it, shuffle/shard/batch it with grain.

The design follows nanoGPT: the whole corpus is one flat int32 token stream
(documents joined by a separator), cut into non-overlapping windows of
``seq_len + 1`` tokens. Each window holds the inputs ``w[:-1]`` and the
next-token labels ``w[1:]``; windows share exactly one token so no label is
wasted. No padding, no masks.

On top of that, grain gives us a *random-access* dataset
(``MapDataset``): shuffle (reseeded every epoch) -> repeat -> per-process
slice -> batch. Because every batch is addressable by its index, the
iterator's checkpoint state is a single integer (batches consumed), which is
trivially JSON-serialisable, independent of grain's internal state format, and
lets a restored run yield exactly the batches an uninterrupted run would have.

All validation happens here, at the edge: JAX gathers clamp out-of-range
indices silently, so a bad token id would otherwise train on garbage quietly.
"""

from __future__ import annotations

import os
import sysconfig

import grain
import numpy as np

from dsv3_jax.data.tokenizer import ByteTokenizer
from dsv3_jax.errors import InputError, MissingInputError, UnreadableInputError

# Extensions picked up when a *folder* is given. A single file is read as text
# whatever its extension (unless it is .npy/.bin).
TEXT_EXTENSIONS = frozenset(
    ".py .pyi .txt .text .md .rst .json .jsonl .c .h .cc .cpp .hpp .cu .rs .go"
    " .java .js .ts .html .css .xml .yaml .yml .toml .ini .cfg .sh .tex .csv".split()
)
_TOKEN_EXTENSIONS = (".npy", ".bin")
_SKIP_STDLIB_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


# ----------------------------------------------------------------------------
# Loading a token stream


def default_corpus_files() -> list[str]:
    """The built-in corpus: the Python standard library's own ``.py`` sources.

    Why: it is always present wherever this code runs (no download, no
    network), is a few MB of real, structured text, and is identical for a
    given Python version, so default runs are reproducible. Test suites and
    third-party packages are excluded; paths are sorted for determinism.
    """
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_STDLIB_DIRS)
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def document_separator(tokenizer) -> np.ndarray:
    """Tokens placed between documents: the EOS id if the vocab has one, else a blank line."""
    if getattr(tokenizer, "eos_id", None) is not None:
        return np.asarray([tokenizer.eos_id], dtype=np.int32)
    return np.asarray(tokenizer.encode("\n\n"), dtype=np.int32)


def _folder_text_files(path: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        # Hidden folders (.git, .venv, ...) are never training data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in TEXT_EXTENSIONS:
                files.append(os.path.join(dirpath, f))
    return sorted(files)


def _read_text(path: str, limit: int | None) -> str:
    """Read a UTF-8 file, at most ``limit`` bytes; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
            truncated = limit is not None and f.read(1) != b""
    except OSError as e:
        raise UnreadableInputError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # A byte cap may cut a multi-byte character in half: drop the stub.
        if truncated and e.start >= len(data) - 3:
            return data[: e.start].decode("utf-8")
        raise InputError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from e


def _load_token_file(path: str, max_bytes: int | None) -> np.ndarray:
    """A pre-tokenized stream: ``.npy`` (1-D integer array) or ``.bin`` (raw uint16)."""
    try:
        if path.endswith(".bin"):
            size = os.path.getsize(path)
            if size % 2:
                raise InputError(f"{path}: .bin size {size} is not a multiple of 2 (expected raw uint16 tokens)")
            if size == 0:
                raise InputError(f"{path} has no tokens (empty file)")
            arr = np.memmap(path, dtype=np.uint16, mode="r")
        else:
            # allow_pickle=False: a .npy must never be able to run code.
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except InputError:
        raise
    except OSError as e:
        raise UnreadableInputError(f"cannot read {path}: {e}") from e
    except ValueError as e:          # numpy's own complaint about the file (a pickled or malformed .npy)
        raise InputError(f"cannot load {path}: {e}") from e
    if arr.ndim != 1:
        raise InputError(f"{path}: expected a 1-D token array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{path}: expected an integer token array, got dtype {arr.dtype}")
    if max_bytes is not None:
        arr = arr[: max(max_bytes // arr.dtype.itemsize, 0)]
    if arr.size == 0:
        raise InputError(f"{path} has no tokens (empty array)")
    if arr.dtype.itemsize > 4 or arr.dtype == np.uint32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > np.iinfo(np.int32).max:
            raise InputError(f"{path}: token ids must be in [0, 2**31), found min {lo} max {hi}")
    return np.array(arr, dtype=np.int32)  # copy out of the memmap


def load_tokens(path=None, tokenizer=None, max_bytes: int | None = None, vocab_size: int | None = None) -> np.ndarray:
    """Return the corpus as one flat 1-D int32 token stream.

    path:       None -> the built-in stdlib corpus; a text file; a folder
                (all text files below it, recursively, sorted); a
                pre-tokenized ``.npy`` / ``.bin`` file (tokenizer unused).
    tokenizer:  used for text; defaults to the byte tokenizer.
    max_bytes:  cap on bytes read from disk (quick runs on the default corpus).
    vocab_size: if given, every id is checked to be in [0, vocab_size).
    """
    tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
    if path is None:
        files, where = default_corpus_files(), "the default corpus (Python stdlib sources)"
    else:
        path = os.fspath(path)
        where = path
        if not os.path.exists(path):
            raise MissingInputError(f"data path not found: {path}")
        if os.path.isfile(path) and path.lower().endswith(_TOKEN_EXTENSIONS):
            tokens = _load_token_file(path, max_bytes)
            if vocab_size is not None:
                check_token_range(tokens, vocab_size, path)
            return tokens
        files = _folder_text_files(path) if os.path.isdir(path) else [path]
        if not files:
            raise InputError(
                f"{path} has no tokens: no text files ({', '.join(sorted(TEXT_EXTENSIONS))}) found in it"
            )

    texts, budget = [], max_bytes
    for f in files:
        if budget is not None and budget <= 0:
            break
        text = _read_text(f, budget)
        if budget is not None:
            budget -= len(text.encode("utf-8"))
        if text:
            texts.append(text)

    if hasattr(tokenizer, "encode_batch"):
        pieces = tokenizer.encode_batch(texts)
    else:
        pieces = [tokenizer.encode(t) for t in texts]
    pieces = [np.asarray(p, dtype=np.int32) for p in pieces if len(p)]
    if not pieces:
        raise InputError(f"{where} has no tokens (all files are empty)")
    sep = document_separator(tokenizer)
    joined = [pieces[0]]
    for p in pieces[1:]:
        joined += [sep, p]
    tokens = np.concatenate(joined)
    if vocab_size is not None:
        check_token_range(tokens, vocab_size, where)
    return tokens


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Raise InputError if any id is outside [0, vocab_size).

    Must be called on host data before it reaches the model: an embedding
    lookup in JAX clamps bad indices silently instead of failing.
    """
    tokens = np.asarray(tokens)
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        flat = bad.reshape(-1)
        first = int(np.argmax(flat))
        values = np.unique(tokens.reshape(-1)[flat])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise InputError(
            f"{where}: {int(flat.sum())} token id(s) out of range for vocab_size {vocab_size}: "
            f"values [{shown}], first at position {first}"
        )


def split_train_val(tokens: np.ndarray, val_fraction: float = 0.01, min_val_tokens: int = 0, chunks: int = 100):
    """Hold out the tail of each of `chunks` equal stretches of the stream: ``(train, val)``.

    Contiguous held-out pieces keep the split deterministic and no train window overlaps a val window;
    taking them from across the whole stream (not only its end, which for the default corpus is a few
    late stdlib files) keeps validation representative of what is trained on. ``min_val_tokens`` (e.g.
    ``seq_len + 1``) makes sure each piece holds at least that many tokens, using fewer pieces if needed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(tokens)
    n_val = max(int(n * val_fraction), min_val_tokens)
    if n_val >= n:
        raise InputError(f"corpus of {n} tokens is too small to hold out {n_val} validation tokens")
    pieces = max(1, min(chunks, n_val // max(min_val_tokens, 1)))
    bounds = np.linspace(0, n, pieces + 1).astype(np.int64)
    per_piece = n_val // pieces
    train, val = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        train.append(tokens[a:b - per_piece])
        val.append(tokens[b - per_piece:b])
    return np.concatenate(train), np.concatenate(val)


# ----------------------------------------------------------------------------
# Packed sequences and batching


class PackedSequences:
    """Non-overlapping ``seq_len + 1`` windows of a token stream (grain RandomAccessDataSource).

    Window i = tokens[i*seq_len : i*seq_len + seq_len + 1]: inputs are w[:-1],
    labels w[1:]. Consecutive windows overlap by the one boundary token, so
    every token is a label exactly once. A trailing partial window is dropped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if seq_len < 1:
            raise InputError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = np.asarray(tokens, dtype=np.int32)
        if self.tokens.ndim != 1:
            raise InputError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        self.seq_len = seq_len
        if len(self.tokens) < seq_len + 1:
            raise InputError(
                f"token stream has {len(self.tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1} "
                "needed for one training sequence; use more data or a shorter seq_len"
            )
        self._len = (len(self.tokens) - 1) // seq_len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def __repr__(self) -> str:
        return f"PackedSequences(num_tokens={len(self.tokens)}, seq_len={self.seq_len}, len={self._len})"


class DataIterator:
    """Iterator over local batches with a tiny, JSON-serialisable checkpoint state.

    The state is ``{"step": batches_consumed, ...}`` plus a fingerprint of the
    data (seed, seq_len, global batch size, number of sequences) that
    ``set_state`` checks, so a checkpoint cannot silently resume on different
    data. Batch ``step`` is fetched by random access, so restoring is O(1).

    The step counts *global* batches and the rows of global batch b do not
    depend on the process count, so a run may even resume on a different
    number of hosts with the same global batch size.
    """

    def __init__(self, batches: grain.MapDataset, num_batches: int | None, fingerprint: dict):
        self._batches = batches
        self._num_batches = num_batches
        self._fingerprint = dict(fingerprint)
        self._step = 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._num_batches is not None and self._step >= self._num_batches:
            raise StopIteration
        batch = self._batches[self._step]
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        return self._step

    def get_state(self) -> dict:
        return {"step": self._step, **self._fingerprint}

    def set_state(self, state: dict) -> None:
        diffs = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
        if diffs:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
            raise InputError(f"data iterator state does not match this dataset ({desc})")
        step = int(state["step"])
        if step < 0:
            raise InputError(f"data iterator state has negative step {step}")
        self._step = step


def make_train_iterator(
    tokens: np.ndarray,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
) -> DataIterator:
    """Shuffled, repeated, per-process batches of ``[global_batch_size // process_count, seq_len + 1]``.

    Pipeline (grain MapDataset): windows -> shuffle(seed), reshuffled each
    epoch -> repeat(num_epochs; None = forever) -> take rows p, p+P, p+2P, ...
    -> batch. Global batch b is the shuffled rows [b*G, (b+1)*G); process p
    reads only its interleaved share of them, so processes never load each
    other's data and together cover the global batch exactly.
    """
    if global_batch_size < 1 or process_count < 1:
        raise InputError(f"global_batch_size ({global_batch_size}) and process_count ({process_count}) must be >= 1")
    if global_batch_size % process_count:
        raise InputError(
            f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise InputError(f"process_index {process_index} not in [0, {process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise InputError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    source = PackedSequences(tokens, seq_len)
    local_batch = global_batch_size // process_count

    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    ds = ds[process_index::process_count].batch(local_batch, drop_remainder=True)

    num_batches = None
    if num_epochs is not None:
        # Computed globally (not from this process's slice length) so every
        # process stops after the same number of steps.
        num_batches = num_epochs * len(source) // global_batch_size
        if num_batches == 0:
            raise InputError(
                f"{num_epochs} epoch(s) of {len(source)} sequences is less than one global batch "
                f"of {global_batch_size}"
            )
    fingerprint = {
        "seed": int(seed),
        "seq_len": int(seq_len),
        "global_batch_size": int(global_batch_size),
        "num_sequences": len(source),
    }
    return DataIterator(ds, num_batches, fingerprint)


def make_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """A fixed list of up to ``max_batches`` ``[batch_size, seq_len + 1]`` batches, in stream order.

    Same batches every call, so validation losses are comparable across steps
    and runs. Only full batches are returned (one static shape for jit).
    """
    source = PackedSequences(tokens, seq_len)
    n = min(max_batches, len(source) // batch_size)
    if n == 0:
        raise InputError(
            f"validation stream has {len(source)} sequences of length {seq_len + 1}, "
            f"fewer than one eval batch of {batch_size}"
        )
    return [np.stack([source[b * batch_size + i] for i in range(batch_size)]) for b in range(n)]
