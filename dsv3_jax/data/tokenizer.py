"""Tokenizers: a dependency-free byte tokenizer and a thin HuggingFace wrapper.

Why two: the byte tokenizer (vocab 256) makes the model trainable out of the
box on any text with no downloads or extra packages, which is what a smoke run
or a unit test wants. Real training uses a trained BPE vocabulary stored as a
HuggingFace ``tokenizer.json``; ``HFTokenizer`` exposes that through the exact
same tiny interface so nothing downstream cares which one it got:

    vocab_size: int          # size of the id space the model must embed
    eos_id: int | None       # document separator token, if the vocab has one
    encode(text) -> np.ndarray[int32]
    decode(ids) -> str
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from dsv3_jax.errors import InputError, MissingInputError

# Special tokens tried (in order) to find an end-of-sequence id in a
# tokenizer.json. The DeepSeek-V3 tokenizer uses the full-width variant.
_EOS_CANDIDATES = (
    "<｜end▁of▁sentence｜>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "[SEP]",
)


class ByteTokenizer:
    """UTF-8 bytes as tokens: id == byte value, vocab_size == 256.

    Lossless for any text, needs nothing, and small enough that a tiny model
    can learn it in minutes. There is no EOS token; the data pipeline separates
    documents with a blank line instead (see ``pipeline.document_separator``).
    """

    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        # Models can sample ids >= 256 when their embedding is padded to a
        # friendlier size; skip them rather than crash mid-generation.
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        arr = arr.reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)].astype(np.uint8)
        # errors='replace': a sampled byte sequence need not be valid UTF-8.
        return arr.tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class HFTokenizer:
    """A HuggingFace ``tokenizer.json`` behind the ByteTokenizer interface.

    ``tokenizers`` is imported lazily so the package (and the byte-level
    default) works on machines where it is not installed.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise MissingInputError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"loading {path} needs the 'tokenizers' package "
                "(pip install tokenizers); or pass no tokenizer path to use "
                "the built-in byte tokenizer"
            ) from e
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:
            raise InputError(f"could not parse tokenizer file {path}: {e}") from e
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = None
        for name in _EOS_CANDIDATES:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                self.eos_id = int(tid)
                break

    def encode(self, text: str) -> np.ndarray:
        # No automatic BOS/EOS: the pipeline decides where separators go.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Parallel (Rust-side) encoding; much faster for many documents."""
        encs = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        arr = arr.reshape(-1)
        # Same policy as ByteTokenizer: ids outside the vocab (padded
        # embedding rows) are skipped instead of raising.
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        return self._tok.decode([int(i) for i in arr], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike | None = None):
    """None -> ByteTokenizer; a tokenizer.json (or a folder holding one) -> HFTokenizer."""
    if path is None:
        return ByteTokenizer()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingInputError(f"tokenizer path not found: {path}")
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise MissingInputError(
                f"tokenizer folder {path} has no tokenizer.json (expected {candidate})"
            )
        path = candidate
    return HFTokenizer(path)
