"""Whole splits tokenised once and cached as ``.npy`` files (memory-mapped afterwards)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .sources import as_config, canonical_split, local_text_dir, open_tfds
from .textfiles import dataset_config_name
from .tokenizers import Tokenizer, get_tokenizer

__all__ = ["TokenizedSplit", "load_tokens", "portable_tfds_id", "unigram_entropy"]


@dataclass(frozen=True)
class TokenizedSplit:
    """A whole split, tokenised.

    Attributes:
      tokens: ``(N,)`` unsigned/int ids (``uint8`` for the byte tokenizer): every
        document followed by ``tokenizer.separator_id``, in stored order. This
        is the ``pack`` stream.
      offsets: ``(D+1,)`` int64; document ``i`` (with its separator) is
        ``tokens[offsets[i]:offsets[i+1]]``.
      tokenizer: the tokenizer used.
      cache_dir: directory of the cached ``.npy`` files.
      source_id: machine-independent name of the text (local corpora: directory
        name and content hash; TFDS: name, split, text key, document count).
    """

    tokens: np.ndarray
    offsets: np.ndarray
    tokenizer: Tokenizer
    cache_dir: Path
    source_id: str

    @property
    def num_documents(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def document(self, i: int) -> np.ndarray:
        """``(n_i,)`` int32 ids of document ``i`` including its trailing separator."""
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], dtype=np.int32)


def _token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _tokenize_all(texts: Sequence[str], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    dtype = _token_dtype(tokenizer.vocab_size)
    sep = np.asarray([tokenizer.separator_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    for i in range(len(texts)):
        ids = tokenizer.encode(texts[i]).astype(dtype)
        pieces.append(ids)
        pieces.append(sep)
        lengths[i] = ids.shape[0] + 1
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return tokens, offsets


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _cache_key_dir(cfg: DataConfig, tokenizer: Tokenizer, source_id: str) -> Path:
    limit = "" if cfg.max_documents is None else f"__max{cfg.max_documents}"
    return cfg.resolved_cache_dir / "tokens" / f"{source_id}__{tokenizer.fingerprint}{limit}"


def _tfds_source_id(cfg: DataConfig) -> str:
    data_dir = "" if cfg.path is None else str(Path(cfg.path).expanduser().resolve())
    ident = f"{cfg.name}|{data_dir}|{cfg.train_split}|{cfg.val_split}|{cfg.text_key}"
    slug = "".join(c if c.isalnum() else "_" for c in str(cfg.name))[:40]
    return f"tfds_{slug}_{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def portable_tfds_id(cfg: DataConfig, split: str, num_documents: int) -> str:
    """A machine-independent name of one TFDS split (name, split, text key, documents)."""
    tfds_split = cfg.train_split if split == "train" else cfg.val_split
    return f"tfds:{cfg.name}:{tfds_split}:{cfg.text_key}:{num_documents}"


def load_tokens(
    data_cfg: DataConfig | Mapping[str, Any] | None,
    split: str = "train",
    tokenizer: Tokenizer | None = None,
) -> TokenizedSplit:
    """Tokenise a whole split once and cache it; later calls memory-map the cache.

    Args:
      data_cfg: the data configuration (``DataConfig`` or a mapping).
      split: ``"train"`` or ``"validation"``.
      tokenizer: defaults to ``get_tokenizer(data_cfg.tokenizer)``.

    Returns:
      The :class:`TokenizedSplit`.

    Raises:
      ValueError: missing ``data.path``, empty corpus, unknown tokenizer file.
      CorpusUnavailableError: the default corpus cannot be obtained.
    """
    cfg = as_config(data_cfg)
    split = canonical_split(split)
    tok = tokenizer if tokenizer is not None else get_tokenizer(cfg.tokenizer)
    if cfg.source == "tfds":
        source = open_tfds(cfg, split)
        key_dir = _cache_key_dir(cfg, tok, _tfds_source_id(cfg))
        expected_docs: int | None = len(source)
        source_id = portable_tfds_id(cfg, split, len(source))

        def texts_fn() -> Sequence[str]:
            return source

    else:
        text_dir = local_text_dir(cfg)
        source_id = dataset_config_name(text_dir, cfg.val_fraction)
        key_dir = _cache_key_dir(cfg, tok, source_id)
        expected_docs = None

        def texts_fn() -> Sequence[str]:
            from .tfds_builder import TextSource, prepare_text_dataset

            builder = prepare_text_dataset(
                text_dir, cfg.resolved_cache_dir / "tfds", val_fraction=cfg.val_fraction
            )
            return TextSource(builder.as_data_source(split=split), "text", cfg.max_documents)

    tok_path = key_dir / f"{split}.tokens.npy"
    off_path = key_dir / f"{split}.offsets.npy"
    if tok_path.is_file() and off_path.is_file():
        tokens = np.load(tok_path, mmap_mode="r")
        offsets = np.load(off_path)
        if expected_docs is None or offsets.shape[0] - 1 == expected_docs:
            return TokenizedSplit(tokens, offsets, tok, key_dir, source_id)

    t0 = time.perf_counter()
    texts = texts_fn()
    tokens, offsets = _tokenize_all(texts, tok)
    if tokens.shape[0] == len(texts):  # only separators
        raise ValueError(
            f"data.path: the {split} split of the corpus is empty (no text in its "
            f"{len(texts)} document(s)); point data.path at non-empty text files"
        )
    key_dir.mkdir(parents=True, exist_ok=True)
    _save_npy(tok_path, tokens)
    _save_npy(off_path, offsets)
    meta = {
        "split": split,
        "documents": int(offsets.shape[0] - 1),
        "tokens": int(tokens.shape[0]),
        "tokenizer": tok.fingerprint,
        "vocab_size": int(tok.vocab_size),
        "separator_id": int(tok.separator_id),
        "seconds": round(time.perf_counter() - t0, 3),
        "config": cfg.to_dict(),
    }
    (key_dir / f"{split}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TokenizedSplit(np.load(tok_path, mmap_mode="r"), offsets, tok, key_dir, source_id)


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Entropy of the empirical unigram distribution of ``tokens`` ``(N,)``.

    Returns ``{"bits": H / ln 2, "nats": H}`` - the cross-entropy a model that
    only learned token frequencies reaches on the same tokens.
    """
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    nats = float(-(p * np.log(p)).sum())
    return {"nats": nats, "bits": nats / float(np.log(2.0))}
