"""Token batches for pre-training: ``build_batches`` (see ``docs/interfaces.md``).

Batch format (every batch, every mode)::

    {"tokens": np.int32   (B, L+1),   # inputs tokens[:, :-1], targets tokens[:, 1:]
     "mask":   np.float32 (B, L)}     # 1.0 where the target tokens[:, t+1] is real

Modes
-----
* ``pack`` (default): every document is tokenised and followed by the
  tokenizer's separator id (``0`` for the byte tokenizer); the documents of the
  split, in stored order, form one token stream that is cut into
  non-overlapping windows of ``L+1`` tokens (the incomplete tail is dropped).
  ``mask`` is all ones. Concatenating the windows in index order reproduces the
  stream's prefix exactly.
* ``truncate``: one document (with its separator) per row, cut to ``L+1``
  tokens and padded with ``pad_id``; ``mask[t] = 1`` iff ``t + 1 < len(row)``.

Order
-----
* ``split="train"``: rows (windows or documents) are shuffled with
  ``grain.MapDataset.shuffle(seed)``, reshuffled every epoch (a different but
  seed-determined permutation), and repeated forever; batches never end and may
  straddle an epoch boundary.
* ``split="validation"``: rows in stored order, not shuffled, not repeated, the
  last batch padded with fully masked rows; at most ``num_batches`` (default
  ``DataConfig.val_batches``) batches. Independent of ``seed``, so evaluation
  sees the same tokens every time.

Caching
-------
The whole split is tokenised once and cached as ``.npy`` files under
``<cache_dir>/tokens/<key>/`` (the key covers the corpus fingerprint, the
tokenizer and ``max_documents``); later iterators memory-map it, so building one
takes milliseconds. TFDS splits with more than ``max_cached_documents``
documents (e.g. ``c4/en`` train) are instead tokenised on the fly
(``streaming``), packed with ``grain.experimental.ConcatThenSplitIterDataset``.

Checkpointing
-------------
``it.get_state()`` is a JSON-serialisable dict; ``it.set_state(state)`` on an
iterator built with the same arguments continues with exactly the batches the
original would have produced next. A state from an iterator with different
data, split, ``seq_len``, ``batch_size``, ``seed`` or mode is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from .config import DataConfig
from .sources import as_config, canonical_split, default_corpus_dir, local_text_dir, open_tfds
from .textfiles import dataset_config_name
from .tokenizers import Tokenizer, get_tokenizer
from .tokens import TokenizedSplit, load_tokens, portable_tfds_id, unigram_entropy

__all__ = [
    "STATE_FORMAT",
    "BatchIterator",
    "TokenizedSplit",
    "build_batches",
    "default_corpus_dir",
    "load_tokens",
    "unigram_entropy",
]

STATE_FORMAT = "lowrank_jax.data.BatchIterator/1"
Batch = dict[str, np.ndarray]


# --------------------------------------------------------------------------- iterator


class BatchIterator(Iterator[Batch]):
    """Checkpointable iterator of ``{"tokens": (B, L+1) int32, "mask": (B, L) float32}``.

    Attributes:
      info: JSON-friendly facts (split, mode, documents, tokens, rows,
        batches_per_epoch, vocab_size, separator_id, ...).
      num_batches: how many batches it yields (``None``: unbounded).
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        *,
        num_batches: int | None,
        fingerprint: str,
        info: dict[str, Any],
    ):
        self._dataset = dataset
        self._it = iter(dataset)
        self._count = 0
        self.num_batches = num_batches
        self.fingerprint = fingerprint
        self.info = dict(info)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self.num_batches is not None and self._count >= self.num_batches:
            raise StopIteration
        batch = next(self._it)
        self._count += 1
        return batch

    @property
    def batches_yielded(self) -> int:
        """Batches returned so far (restored by :meth:`set_state`)."""
        return self._count

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: ``{"format", "fingerprint", "batches", "grain"}``."""
        state = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "batches": self._count,
            "grain": self._it.get_state(),
        }
        return json.loads(json.dumps(state))

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`get_state` of an equally built iterator).

        Raises:
          ValueError: the state is malformed or was taken from a different pipeline.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data iterator state (expected format {STATE_FORMAT!r})")
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                "data iterator state was taken from a different pipeline (data, split, "
                "seq_len, batch_size, seed or mode differ); rebuild the iterator with the "
                "arguments used when the state was saved"
            )
        self._it.set_state(_lists_to_tuples(state["grain"]))
        self._count = int(state["batches"])

    def __repr__(self) -> str:
        return f"BatchIterator({self.info}, batches_yielded={self._count})"


def _lists_to_tuples(x: Any) -> Any:
    """Undo JSON's tuple -> list conversion in a grain state.

    grain's ConcatThenSplit state stores slices as tuples and compares them with
    a tuple sentinel, so a JSON round trip would otherwise corrupt it.
    """
    if isinstance(x, Mapping):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


def _pad_rows(tokens: np.ndarray, mask: np.ndarray, batch_size: int, pad_id: int) -> Batch:
    """Pad ``(b, L+1)`` / ``(b, L)`` to ``batch_size`` rows with fully masked rows."""
    b = tokens.shape[0]
    if b < batch_size:
        tokens = np.concatenate(
            [tokens, np.full((batch_size - b, tokens.shape[1]), pad_id, np.int32)]
        )
        mask = np.concatenate([mask, np.zeros((batch_size - b, mask.shape[1]), np.float32)])
    return {"tokens": tokens, "mask": mask}


class _PackBatch:
    """Row indices ``(b,)`` -> packed batch; windows are a view of the token stream."""

    def __init__(self, windows: np.ndarray, batch_size: int, pad_id: int):
        self.windows, self.batch_size, self.pad_id = windows, batch_size, pad_id

    def __call__(self, idx: np.ndarray) -> Batch:
        tokens = np.asarray(self.windows[idx], dtype=np.int32)
        mask = np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)
        return _pad_rows(tokens, mask, self.batch_size, self.pad_id)


class _TruncateBatch:
    """Document indices ``(b,)`` -> one document per row, padded and masked."""

    def __init__(self, data: TokenizedSplit, seq_len: int, batch_size: int):
        self.data, self.width, self.batch_size = data, seq_len + 1, batch_size
        self.pad_id = data.tokenizer.pad_id

    def __call__(self, idx: np.ndarray) -> Batch:
        idx = np.asarray(idx).reshape(-1)
        tokens = np.full((idx.shape[0], self.width), self.pad_id, np.int32)
        lengths = np.zeros(idx.shape[0], np.int64)
        for r, i in enumerate(idx):
            doc = self.data.document(int(i))[: self.width]
            tokens[r, : doc.shape[0]] = doc
            lengths[r] = doc.shape[0]
        mask = (np.arange(self.width - 1)[None, :] + 1 < lengths[:, None]).astype(np.float32)
        return _pad_rows(tokens, mask, self.batch_size, self.pad_id)


_SYNC = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _cached_dataset(
    data: TokenizedSplit, cfg: DataConfig, split: str, seq_len: int, batch_size: int, seed: int
) -> tuple[grain.IterDataset, dict[str, Any]]:
    width = seq_len + 1
    n_tok = data.num_tokens
    if n_tok < width:
        raise ValueError(
            f"seq_len={seq_len} needs windows of {width} tokens but the {split} split has only "
            f"{n_tok} tokens ({data.num_documents} documents); lower seq_len or use a larger "
            "corpus (data.path)"
        )
    if cfg.mode == "pack":
        n_rows = n_tok // width
        windows = data.tokens[: n_rows * width].reshape(n_rows, width)
        make_batch: Any = _PackBatch(windows, batch_size, data.tokenizer.pad_id)
    else:
        n_rows = data.num_documents
        make_batch = _TruncateBatch(data, seq_len, batch_size)
    rows = grain.MapDataset.range(n_rows)
    if split == "train":
        rows = rows.shuffle(seed=seed % (1 << 32)).repeat(None)
    ds = rows.batch(batch_size, drop_remainder=split == "train").map(make_batch)
    info = {
        "rows": n_rows,
        "batches_per_epoch": n_rows // batch_size if split == "train" else -(-n_rows // batch_size),
        "documents": data.num_documents,
        "tokens": n_tok,
        "cache_dir": str(data.cache_dir),
    }
    return ds.to_iter_dataset(_SYNC), info


class _Encode:
    """Text -> ``{"tokens": (n+1,) int32}`` (document ids followed by the separator)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        return {"tokens": np.append(ids, self.tokenizer.separator_id).astype(np.int32)}


def _streaming_dataset(
    source: Sequence[str], tokenizer: Tokenizer, cfg: DataConfig, split: str,
    seq_len: int, batch_size: int, seed: int,
) -> tuple[grain.IterDataset, dict[str, Any]]:
    width = seq_len + 1
    pad_id = tokenizer.pad_id
    docs = grain.MapDataset.source(source)
    if split == "train":
        docs = docs.shuffle(seed=seed % (1 << 32)).repeat(None)
    encoded = docs.map(_Encode(tokenizer)).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)
    )
    if cfg.mode == "pack":
        packed = grain.experimental.ConcatThenSplitIterDataset(
            encoded, length_struct={"tokens": width}
        )

        def to_row(e: dict[str, np.ndarray]) -> Batch:
            tokens = np.where(e["tokens_segment_ids"] > 0, e["tokens"], pad_id).astype(np.int32)
            return {"tokens": tokens, "mask": (e["tokens_segment_ids"][1:] > 0).astype(np.float32)}

        rows = packed.map(to_row)
    else:

        def to_row(e: dict[str, np.ndarray]) -> Batch:
            doc = e["tokens"][:width]
            tokens = np.full(width, pad_id, np.int32)
            tokens[: doc.shape[0]] = doc
            return {"tokens": tokens,
                    "mask": (np.arange(1, width) < doc.shape[0]).astype(np.float32)}

        rows = encoded.map(to_row)

    def pad(b: Batch) -> Batch:
        return _pad_rows(b["tokens"], b["mask"], batch_size, pad_id)

    ds = rows.batch(batch_size, drop_remainder=split == "train").map(pad)
    return ds, {"documents": len(source)}


def _dataset(cfg: DataConfig, split: str, tokenizer: Tokenizer, seq_len: int, batch_size: int,
             seed: int) -> tuple[grain.IterDataset, dict[str, Any], dict[str, Any], bool]:
    """``(dataset, info, identity of the data, streaming?)`` of one split: the cached
    token stream, or documents tokenised on the fly (a large TFDS split, ``streaming``)."""
    source: Any = None
    streaming = bool(cfg.streaming)
    if cfg.source == "tfds":
        source = open_tfds(cfg, split)
        if cfg.streaming is None:
            streaming = len(source) > cfg.max_cached_documents
        if len(source) == 0:
            raise ValueError(f"data.name: the {split} split of {cfg.name!r} has no documents")
    if not streaming:
        data = load_tokens(cfg, split, tokenizer)
        dataset, info = _cached_dataset(data, cfg, split, seq_len, batch_size, seed)
        return dataset, info, {"source": data.source_id, "tokens": info["tokens"]}, False
    if source is None:
        from .tfds_builder import TextSource, prepare_text_dataset

        text_dir = local_text_dir(cfg)
        builder = prepare_text_dataset(text_dir, cfg.resolved_cache_dir / "tfds", cfg.val_fraction)
        source = TextSource(builder.as_data_source(split=split), "text", cfg.max_documents)
        source_id = dataset_config_name(text_dir, cfg.val_fraction)
    else:
        source_id = portable_tfds_id(cfg, split, len(source))
    dataset, info = _streaming_dataset(source, tokenizer, cfg, split, seq_len, batch_size, seed)
    return dataset, info, {"source": source_id, "documents": len(source)}, True


def build_batches(
    data_cfg: DataConfig | Mapping[str, Any] | None,
    split: str = "train",
    seq_len: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    *,
    num_batches: int | None = None,
) -> BatchIterator:
    """Iterator of token batches (see the module docstring for modes and order).

    Args:
      data_cfg: :class:`DataConfig` (or a mapping of its fields; ``None`` = defaults).
      split: ``"train"`` (shuffled, repeats forever) or ``"validation"`` (fixed order,
        finite).
      seq_len: ``L``; batches hold ``L+1`` tokens per row.
      batch_size: ``B``.
      seed: shuffling seed (train only; any int, used modulo ``2**32``).
      num_batches: stop after this many batches; default ``None`` for train
        (unbounded) and ``data_cfg.val_batches`` for validation.

    Returns:
      A :class:`BatchIterator` yielding
      ``{"tokens": np.int32 (B, L+1), "mask": np.float32 (B, L)}``.

    Raises:
      ValueError: bad arguments, missing ``data.path``, empty corpus, ``seq_len``
        longer than the split, unknown tokenizer file.
      CorpusUnavailableError: the default corpus cannot be obtained.
    """
    cfg = as_config(data_cfg)
    split = canonical_split(split)
    if int(seq_len) < 1 or int(batch_size) < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    seq_len, batch_size, seed = int(seq_len), int(batch_size), int(seed)
    tokenizer = get_tokenizer(cfg.tokenizer)
    dataset, info, ident, streaming = _dataset(cfg, split, tokenizer, seq_len, batch_size, seed)
    ident.update(mode=cfg.mode, max_documents=cfg.max_documents)

    if num_batches is None and split == "validation":
        num_batches = cfg.val_batches
    if split == "validation" and num_batches is not None and "batches_per_epoch" in info:
        num_batches = min(num_batches, info["batches_per_epoch"])
    key = {
        "ident": ident, "split": split, "seq_len": seq_len, "batch_size": batch_size,
        "seed": seed if split == "train" else None, "streaming": streaming,
        "tokenizer": tokenizer.fingerprint,
    }
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    info.update(
        split=split, mode=cfg.mode, seq_len=seq_len, batch_size=batch_size, seed=seed,
        streaming=streaming, vocab_size=int(tokenizer.vocab_size),
        separator_id=int(tokenizer.separator_id), pad_id=int(tokenizer.pad_id),
        num_batches=num_batches,
    )
    return BatchIterator(dataset, num_batches=num_batches, fingerprint=fingerprint, info=info)
