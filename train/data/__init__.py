"""Pre-training data: corpus, TFDS builder, tokenizers and the batch pipeline.

See ``docs/interfaces.md`` ("Data") and :mod:`train.data.pipeline`::

    from train.data import DataConfig, build_batches
    it = build_batches(DataConfig(), split="train", seq_len=256, batch_size=16, seed=0)
    batch = next(it)  # {"tokens": int32 (16, 257), "mask": float32 (16, 256)}

TensorFlow-Datasets is imported lazily (only when a corpus must be prepared
or a TFDS dataset is opened).
"""

from .config import DataConfig, default_cache_dir
from .corpus import CorpusUnavailableError, prepare_default_corpus
from .pipeline import BatchIterator, build_batches
from .sources import default_corpus_dir
from .tokenizers import (
    BYTE_SEPARATOR_ID,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    get_tokenizer,
)
from .tokens import TokenizedSplit, load_tokens, unigram_entropy

__all__ = [
    "BYTE_SEPARATOR_ID",
    "BatchIterator",
    "ByteTokenizer",
    "CorpusUnavailableError",
    "DataConfig",
    "SentencePieceTokenizer",
    "TokenizedSplit",
    "Tokenizer",
    "build_batches",
    "default_cache_dir",
    "default_corpus_dir",
    "get_tokenizer",
    "load_tokens",
    "prepare_default_corpus",
    "prepare_text_dataset",
    "unigram_entropy",
]


def __getattr__(name: str):  # lazy: importing TFDS costs ~0.5 s
    if name in ("prepare_text_dataset", "open_text_source", "LocalTextDataset"):
        from . import tfds_builder

        return getattr(tfds_builder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
