"""Where a split's text comes from: the default corpus, a directory of text files or TFDS."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import DataConfig
from .corpus import prepare_default_corpus

__all__ = ["as_config", "canonical_split", "default_corpus_dir", "local_text_dir", "open_tfds"]

_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation",
                  "valid": "validation", "eval": "validation"}


def as_config(data_cfg: DataConfig | Mapping[str, Any] | None) -> DataConfig:
    """A :class:`DataConfig` from itself, a mapping of its fields, or ``None`` (defaults)."""
    if data_cfg is None:
        return DataConfig()
    if isinstance(data_cfg, DataConfig):
        return data_cfg
    if isinstance(data_cfg, Mapping):
        return DataConfig.from_dict(data_cfg)
    raise TypeError(f"data_cfg must be a DataConfig or a mapping, got {type(data_cfg).__name__}")


def canonical_split(split: str) -> str:
    """``"train"`` or ``"validation"`` (also accepts ``val``, ``valid``, ``eval``)."""
    try:
        return _SPLIT_ALIASES[split]
    except KeyError:
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}") from None


def default_corpus_dir(cfg: DataConfig) -> Path:
    """Where ``source="default"`` puts the Python documentation (``<cache>/corpus/...``)."""
    return cfg.resolved_cache_dir / "corpus" / "python3.11-doc"


def local_text_dir(cfg: DataConfig) -> Path:
    """The directory of text files of a ``default`` or ``text_dir`` source (prepared if needed)."""
    if cfg.source == "default":
        return prepare_default_corpus(default_corpus_dir(cfg))
    path = Path(str(cfg.path)).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"data.path: {str(path)!r} is not a directory; set data.path to a directory of "
            ".txt/.rst.txt/.md files (data.source='text_dir')"
        )
    return path.resolve()


def open_tfds(cfg: DataConfig, split: str) -> Any:
    """The documents of one split of a prepared TFDS dataset (random access)."""
    from .tfds_builder import open_text_source

    tfds_split = cfg.train_split if split == "train" else cfg.val_split
    data_dir = None if cfg.path is None else str(Path(cfg.path).expanduser().resolve())
    return open_text_source(
        name=cfg.name, data_dir=data_dir, split=tfds_split, text_key=cfg.text_key,
        limit=cfg.max_documents,
    )
