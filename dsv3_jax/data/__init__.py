"""Data layer: tokenizers, corpus loading, and grain-based packed-sequence batching."""

from dsv3_jax.data.pipeline import (
    DataIterator,
    PackedSequences,
    check_token_range,
    default_corpus_files,
    document_separator,
    load_tokens,
    make_eval_batches,
    make_train_iterator,
    split_train_val,
)
from dsv3_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer",
    "DataIterator",
    "HFTokenizer",
    "PackedSequences",
    "check_token_range",
    "default_corpus_files",
    "document_separator",
    "load_tokenizer",
    "load_tokens",
    "make_eval_batches",
    "make_train_iterator",
    "split_train_val",
]
