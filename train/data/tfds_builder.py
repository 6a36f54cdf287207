"""TensorFlow-free TFDS datasets of plain text.

* :class:`LocalTextDataset`: a ``tfds.core.GeneratorBasedBuilder`` over a local
  directory of text files, written as ``array_record`` with features
  ``{"text": tfds.features.Text()}`` and splits ``train`` / ``validation``.
* :func:`prepare_text_dataset`: prepare (idempotently) such a dataset.
* :func:`open_text_source`: random-access ``Sequence[str]`` over one split of a
  prepared dataset, either by directory or by TFDS name (``"c4/en"``), read via
  ``builder.as_data_source()`` / ``tfds.data_source`` - no TensorFlow needed.

The held-out split is decided per document by a hash of its relative path
(see :mod:`train.data.textfiles`), so validation never overlaps train.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import tensorflow_datasets as tfds
from etils import epath

from .textfiles import DATASET_VERSION, corpus_layout, dataset_config_name, read_text

__all__ = [
    "LocalTextDataset",
    "TextSource",
    "open_text_source",
    "prepare_text_dataset",
]

@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Hide TFDS's progress bars and INFO/WARNING chatter while preparing."""
    from tensorflow_datasets.core.utils import tqdm_utils

    absl_logger = logging.getLogger("absl")
    old_level, old_bar = absl_logger.level, tqdm_utils._active
    absl_logger.setLevel(logging.ERROR)
    tqdm_utils._active = False
    try:
        yield
    finally:
        absl_logger.setLevel(old_level)
        tqdm_utils._active = old_bar


# Not registered in TFDS's global registry: each instance is tied to a local
# directory, and prepared copies are read back from files (builder_from_directory).
with tfds.core.registered.skip_registration():

    class LocalTextDataset(tfds.core.GeneratorBasedBuilder):
        """Documents of a local text directory; one example per non-empty file.

        Features: ``{"text": tfds.features.Text()}``; splits ``train`` and
        ``validation``; stored as ``array_record`` in sorted key (path) order.
        """

        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES: ClassVar[dict[str, str]] = {
            DATASET_VERSION: "Plain text documents from a local directory."
        }

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path | None:
            # TFDS 4.9.10's default implementation imports `importlib_resources`,
            # which it only declares as a dependency for Python < 3.9.
            return epath.Path(inspect.getfile(cls))

        def __init__(
            self,
            *,
            text_dir: str | Path,
            val_fraction: float = 0.02,
            data_dir: str | Path | None = None,
            **kwargs: Any,
        ):
            self._text_dir = Path(text_dir).expanduser().resolve()
            if not self._text_dir.is_dir():
                raise ValueError(
                    f"data.path: text directory {str(self._text_dir)!r} does not exist; point "
                    "data.path at a directory of .txt files"
                )
            self._val_fraction = float(val_fraction)
            config = tfds.core.BuilderConfig(
                name=dataset_config_name(self._text_dir, self._val_fraction),
                description=f"text files under {self._text_dir}",
            )
            kwargs.setdefault("file_format", "array_record")
            super().__init__(
                data_dir=None if data_dir is None else str(data_dir), config=config, **kwargs
            )

        # TFDS prints "Downloading and preparing dataset Unknown size ..." and
        # "Dataset ... downloaded and prepared to ..." with termcolor (not logging):
        # nothing is downloaded from a local directory, so say nothing.
        def _log_download_bytes(self) -> None:
            pass

        def _log_download_done(self) -> None:
            pass

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Plain-text documents read from {self._text_dir}.",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(
                    text_dir=str(self._text_dir), val_fraction=self._val_fraction
                ),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
            layout = corpus_layout(self._text_dir, self._val_fraction)
            return {split: self._generate_examples(items) for split, items in layout.items()}

        def _generate_examples(
            self, items: list[tuple[str, Path]]
        ) -> Iterator[tuple[str, dict[str, str]]]:
            for key, path in items:
                yield key, {"text": read_text(path)}


def prepare_text_dataset(
    text_dir: str | Path, data_dir: str | Path, val_fraction: float = 0.02
) -> tfds.core.DatasetBuilder:
    """Prepare (once) a TFDS ``array_record`` dataset from a directory of text files.

    Args:
      text_dir: directory of ``.txt`` / ``.rst.txt`` / ``.md`` files (recursive).
      data_dir: TFDS data_dir; the dataset goes to
        ``data_dir/local_text_dataset/<dirname>_<fingerprint>/1.0.0``.
      val_fraction: fraction of documents held out (by path hash) for validation.

    Returns:
      The prepared builder; ``builder.data_dir`` is the dataset directory and
      ``builder.as_data_source(split)`` reads it back (``record["text"]`` is
      UTF-8 ``bytes``). A second call with an unchanged directory only reads
      metadata.

    Raises:
      ValueError: missing directory, no text files, fewer than 2 documents.
    """
    with _quiet_tfds():
        builder = LocalTextDataset(
            text_dir=text_dir, val_fraction=val_fraction, data_dir=data_dir
        )
        if not Path(builder.data_dir, "dataset_info.json").is_file():
            try:
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
                )
            except BaseException:
                _remove_empty_parents(Path(builder.data_dir), Path(data_dir))
                raise
    return builder


def _remove_empty_parents(path: Path, root: Path) -> None:
    """Remove ``path`` and its parents up to (not including) ``root`` while they are empty.

    A failed preparation leaves TFDS's ``<name>/<config>/`` directories behind
    empty (its temporary ``<version>.incomplete*`` directory is removed); a later
    run would list them as datasets.
    """
    root = root.resolve()
    path = path.resolve()
    while path != root and root in path.parents:
        try:
            path.rmdir()
        except OSError:  # not empty, already gone or not ours to remove
            if path.exists():
                return
        path = path.parent


class TextSource(Sequence[str]):
    """Random-access documents (``str``) of one split of a TFDS data source."""

    def __init__(self, data_source: Any, text_key: str = "text", limit: int | None = None):
        self._ds = data_source
        self._key = text_key
        n = len(data_source)
        self._len = n if limit is None else min(n, int(limit))
        if self._len:
            first = data_source[0]
            if not isinstance(first, dict) or text_key not in first:
                keys = sorted(first) if isinstance(first, dict) else type(first).__name__
                raise ValueError(
                    f"data.text_key: records have no feature {text_key!r}; available: {keys}"
                )

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not -self._len <= i < self._len:
            raise IndexError(i)
        value = self._ds[i % self._len][self._key]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if hasattr(value, "item"):  # numpy scalar / 0-d array
            value = value.item()
            if isinstance(value, bytes):
                return value.decode("utf-8", errors="replace")
        return str(value)


def open_text_source(
    *,
    dataset_dir: str | Path | None = None,
    name: str | None = None,
    data_dir: str | Path | None = None,
    split: str = "train",
    text_key: str = "text",
    limit: int | None = None,
) -> TextSource:
    """Open one split of a prepared TFDS dataset as a ``Sequence[str]``.

    Give either ``dataset_dir`` (a prepared dataset's version directory, e.g.
    ``prepare_text_dataset(...).data_dir``) or ``name`` (e.g. ``"c4/en"``) with
    an optional ``data_dir``. Nothing is downloaded or prepared.

    Raises:
      ValueError: the dataset or split is not there, or has no ``text_key``.
    """
    if dataset_dir is not None:
        try:
            builder = tfds.builder_from_directory(str(dataset_dir))
            ds = builder.as_data_source(split=split)
        except Exception as e:
            raise ValueError(
                f"data.path: cannot read split {split!r} of the TFDS dataset at "
                f"{str(dataset_dir)!r}: {e}"
            ) from e
    else:
        if not name:
            raise ValueError("data.name: give the TFDS dataset name, e.g. 'c4/en'")
        try:
            ds = tfds.data_source(
                name, split=split, data_dir=None if data_dir is None else str(data_dir),
                download=False,
            )
        except Exception as e:
            raise ValueError(
                f"data.name/data.path: cannot open split {split!r} of TFDS dataset {name!r} "
                f"under data_dir {str(data_dir) if data_dir else '(TFDS default)'}: {e}. "
                "Prepare it first (e.g. `tfds build` with file_format=array_record) and set "
                "data.path to its data_dir; set data.train_split/val_split if its splits are "
                "named differently"
            ) from e
    return TextSource(ds, text_key=text_key, limit=limit)
