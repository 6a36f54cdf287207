"""Configuration of the pre-training data pipeline.

Cache directory
---------------
Everything the pipeline derives (the extracted default corpus, prepared TFDS
array_record files, cached token ids) lives under one directory, chosen as:

1. ``DataConfig.cache_dir`` if set;
2. else the environment variable ``LOWRANK_JAX_DATA`` if set;
3. else ``<repo>/data`` when running from a source checkout (the directory that
   holds ``pyproject.toml`` next to the ``train`` package; ``data/`` is
   git-ignored). Keeping it inside the checkout lets the prepared corpus travel
   with the working tree to a machine without network access;
4. else ``~/.cache/lowrank_jax``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DataConfig", "default_cache_dir"]

_SOURCES = ("default", "text_dir", "tfds")
_MODES = ("pack", "truncate")


def default_cache_dir() -> Path:
    """Cache directory used when ``DataConfig.cache_dir`` is ``None`` (see module doc)."""
    env = os.environ.get("LOWRANK_JAX_DATA")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "train").is_dir():
        return repo / "data"
    return Path.home() / ".cache" / "lowrank_jax"


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes ``(B, L+1)`` token batches.

    Attributes:
      source: ``"default"`` (Python 3.11 documentation, prepared offline from
        Debian's ``python3.11-doc``), ``"text_dir"`` (a directory of ``.txt`` /
        ``.rst.txt`` / ``.md`` files, see ``path``) or ``"tfds"`` (an already
        prepared TFDS dataset called ``name`` under data_dir ``path``).
      path: text directory (``source="text_dir"``) or TFDS data_dir
        (``source="tfds"``; ``None`` means TFDS's default ``~/tensorflow_datasets``).
        Ignored for ``"default"``.
      name: TFDS dataset name, e.g. ``"c4/en"`` or ``"c4/en:3.1.0"`` (``source="tfds"``).
      text_key: feature holding the text in TFDS records.
      train_split / val_split: TFDS split names used for ``split="train"`` and
        ``split="validation"``. Local corpora always produce ``train`` /
        ``validation``.
      tokenizer: ``"byte"`` or the path of a SentencePiece ``.model`` file.
      mode: ``"pack"`` (concatenate documents with separators, cut into windows)
        or ``"truncate"`` (one document per row, padded and masked).
      cache_dir: see the module docstring; ``None`` picks the default.
      val_batches: number of validation batches (``None``: all complete ones).
      val_fraction: fraction of documents of a local corpus held out for
        validation (by a hash of the file's relative path).
      max_documents: use at most this many documents per split (the first ones,
        in stored order); ``None`` uses all.
      streaming: ``None`` (auto) tokenises and caches the whole split when it has
        at most ``max_cached_documents`` documents, otherwise tokenises on the
        fly; ``True``/``False`` force either way.
      max_cached_documents: threshold for ``streaming=None``.
    """

    source: str = "default"
    path: str | None = None
    name: str | None = None
    text_key: str = "text"
    train_split: str = "train"
    val_split: str = "validation"
    tokenizer: str = "byte"
    mode: str = "pack"
    cache_dir: str | None = None
    val_batches: int | None = 16
    val_fraction: float = 0.02
    max_documents: int | None = None
    streaming: bool | None = None
    max_cached_documents: int = 200_000

    def __post_init__(self) -> None:
        if self.source not in _SOURCES:
            raise ValueError(f"data.source must be one of {_SOURCES}, got {self.source!r}")
        if self.mode not in _MODES:
            raise ValueError(f"data.mode must be one of {_MODES}, got {self.mode!r}")
        if self.source == "text_dir" and not self.path:
            raise ValueError(
                "data.path is required when data.source='text_dir': set it to a directory "
                "of .txt/.rst.txt/.md files (or use data.source='default')"
            )
        if self.source == "default" and self.path:
            raise ValueError(
                "data.path is not used with data.source='default'; to train on your own text "
                "set data.source='text_dir' (directory of .txt files) or 'tfds'"
            )
        if self.source == "tfds" and not self.name:
            raise ValueError(
                "data.name is required when data.source='tfds': set it to a prepared TFDS "
                "dataset name such as 'c4/en' (and data.path to its data_dir)"
            )
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError("data.tokenizer must be 'byte' or the path of a SentencePiece .model")
        if self.val_batches is not None and self.val_batches < 1:
            raise ValueError(f"data.val_batches must be >= 1 or None, got {self.val_batches}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents must be >= 1 or None, got {self.max_documents}")

    @property
    def resolved_cache_dir(self) -> Path:
        """The cache directory actually used (absolute)."""
        base = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()
        return base.resolve()

    def replace(self, **changes: Any) -> DataConfig:
        """``dataclasses.replace`` shortcut."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DataConfig:
        """Build from a mapping (e.g. the ``data:`` section of a YAML file).

        Raises:
          ValueError: an unknown key (its name and the known keys are listed).
        """
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)
