"""Directory-of-text-files helpers that do not need TFDS (cheap to import).

Held-out split: a document belongs to ``validation`` iff
``int(sha256(relative_posix_path)[:8 bytes]) / 2**64 < val_fraction``, so the
split depends only on the file's own path and validation never overlaps
train. If that leaves validation (or train) empty, the document with the
smallest (largest) hash is moved, so both splits are non-empty. A directory
that holds ``train/`` and ``validation/`` sub-directories is used as given.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DATASET_VERSION",
    "TEXT_SUFFIXES",
    "corpus_layout",
    "dataset_config_name",
    "list_text_files",
    "read_text",
    "split_documents",
    "split_of",
]

#: File name endings recognised as documents (``.rst.txt`` ends with ``.txt``).
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".rst")

#: Version of the local TFDS dataset layout (part of every cache key).
DATASET_VERSION = "1.0.0"


def list_text_files(text_dir: str | Path) -> list[Path]:
    """Sorted non-empty text files under ``text_dir`` (recursive; hidden entries skipped)."""
    root = Path(text_dir)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES) and p.stat().st_size > 0:
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _path_hash(relpath: str) -> float:
    """Uniform number in ``[0, 1)`` from the path (stable across machines)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, val_fraction: float = 0.02) -> str:
    """``"validation"`` or ``"train"`` for a document's relative POSIX path."""
    return "validation" if _path_hash(relpath) < val_fraction else "train"


def split_documents(relpaths: Sequence[str], val_fraction: float = 0.02) -> dict[str, list[str]]:
    """Partition relative paths into ``{"train": [...], "validation": [...]}``.

    Both lists are sorted and disjoint, their union is ``relpaths``; both are
    non-empty (at least two documents are required).

    Raises:
      ValueError: fewer than two documents.
    """
    paths = sorted(set(relpaths))
    if len(paths) < 2:
        raise ValueError(
            f"data.path: the corpus has {len(paths)} document(s); at least 2 are needed to "
            "hold one out for validation - add more .txt files"
        )
    val = [p for p in paths if split_of(p, val_fraction) == "validation"]
    if not val:
        val = [min(paths, key=_path_hash)]
    if len(val) == len(paths):
        val.remove(max(paths, key=_path_hash))
    val_set = set(val)
    return {"train": [p for p in paths if p not in val_set], "validation": sorted(val)}


def corpus_layout(text_dir: str | Path, val_fraction: float) -> dict[str, list[tuple[str, Path]]]:
    """``{"train"|"validation": [(relative_path, file), ...]}`` for a text directory.

    Raises:
      ValueError: the directory is missing, holds no text files, or only one.
    """
    text_dir = Path(text_dir)
    if not text_dir.is_dir():
        raise ValueError(
            f"data.path: text directory {str(text_dir)!r} does not exist; point data.path at "
            "a directory of .txt/.rst.txt/.md files"
        )
    explicit = {"train": text_dir / "train", "validation": text_dir / "validation"}
    if all(d.is_dir() for d in explicit.values()):
        layout = {
            split: [(f.relative_to(text_dir).as_posix(), f) for f in list_text_files(d)]
            for split, d in explicit.items()
        }
        for split, items in layout.items():
            if not items:
                raise ValueError(f"data.path: {explicit[split]} holds no text files")
        return layout
    files = list_text_files(text_dir)
    if not files:
        raise ValueError(
            f"data.path: {str(text_dir)!r} holds no text files ({', '.join(TEXT_SUFFIXES)}); "
            "point data.path at a directory of documents"
        )
    by_rel = {f.relative_to(text_dir).as_posix(): f for f in files}
    parts = split_documents(list(by_rel), val_fraction)
    return {split: [(r, by_rel[r]) for r in rels] for split, rels in parts.items()}


def _fingerprint(text_dir: Path, val_fraction: float) -> str:
    """Hash of the documents' relative paths and contents, and of the split fraction.

    Independent of where the directory lives and of file times, so a copied
    corpus keeps its caches (and iterator checkpoints stay valid).
    """
    h = hashlib.sha256(f"{val_fraction!r}|{DATASET_VERSION}".encode())
    for f in list_text_files(text_dir):
        h.update(f"{f.relative_to(text_dir).as_posix()}\0".encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def dataset_config_name(text_dir: str | Path, val_fraction: float) -> str:
    """``<dirname>_<fingerprint>``: changes whenever a document is added, removed or edited."""
    text_dir = Path(text_dir)
    slug = re.sub(r"[^a-z0-9]+", "_", text_dir.resolve().name.lower()).strip("_") or "text"
    return f"{slug[:40]}_{_fingerprint(text_dir, val_fraction)}"


def read_text(path: str | Path) -> str:
    """A document's text (UTF-8; undecodable bytes replaced, newlines normalised)."""
    return Path(path).read_text(encoding="utf-8", errors="replace")
