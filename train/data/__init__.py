"""Pre-training data: corpus, TFDS builder, tokenizers and the batch pipeline.

See ``docs/interfaces.md`` ("Data") and :mod:`train.data.pipeline`::

    from train.data import DataConfig, build_batches
    it = build_batches(DataConfig(), split="train", seq_len=256, batch_size=16, seed=0)
    batch = next(it)  # {"tokens": int32 (16, 257), "mask": float32 (16, 256)}

Everything but :class:`DataConfig` is imported on first use; TensorFlow-Datasets
only when a corpus must be prepared or a TFDS dataset is opened.
"""

from importlib import import_module

from .config import DataConfig, default_cache_dir

#: where each name lives; imported on first use, so that reading a config (which
#: needs only :class:`DataConfig`) does not import grain, numpy or TFDS (~2.5 s)
_LAZY = {
    "BatchIterator": "pipeline", "build_batches": "pipeline",
    "CorpusUnavailableError": "corpus", "prepare_default_corpus": "corpus",
    "default_corpus_dir": "sources",
    "BYTE_SEPARATOR_ID": "tokenizers", "ByteTokenizer": "tokenizers",
    "SentencePieceTokenizer": "tokenizers", "Tokenizer": "tokenizers",
    "get_tokenizer": "tokenizers",
    "TokenizedSplit": "tokens", "load_tokens": "tokens", "unigram_entropy": "tokens",
    "prepare_text_dataset": "tfds_builder", "open_text_source": "tfds_builder",
    "LocalTextDataset": "tfds_builder",
}

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


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
