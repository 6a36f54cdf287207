"""The default pre-training corpus: the Python 3.11 documentation (English prose).

Source: Debian's ``python3.11-doc`` package, which ships the reStructuredText
sources of the documentation as ``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``
(497 documents, ~11 MB). The documentation is distributed under the Python
Software Foundation License Version 2 (PSF-2.0); the package's Debian copyright
file is copied next to the text as ``LICENSE``.

:func:`prepare_default_corpus` obtains the package, in this order, from

1. ``source_tree``: an already extracted package (the directory holding ``usr/``);
2. ``deb_path`` or the environment variable ``LOWRANK_JAX_DOC_DEB``: a ``.deb`` file;
3. the system, if ``python3.11-doc`` is installed (``/usr/share/doc/python3.11/...``);
4. ``apt-get download python3.11-doc`` in a temporary directory (after an
   ``apt-get update`` when the first attempt fails and we are root),

extracts it with ``dpkg -x`` (or a pure-Python ``.deb`` reader when ``dpkg`` is
missing) and writes::

    root/text/<relative path>.rst.txt   one plain-text document per file
    root/LICENSE                        PSF licence note + Debian copyright file
    root/README.md                      where the text comes from
    root/.prepared.json                 marker (second call returns at once)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

__all__ = [
    "DEFAULT_PACKAGE",
    "MARKER_NAME",
    "CorpusUnavailableError",
    "prepare_default_corpus",
]

DEFAULT_PACKAGE = "python3.11-doc"
MARKER_NAME = ".prepared.json"
_SOURCES_REL = Path("usr/share/doc/python3.11/html/_sources")
_COPYRIGHT_REL = Path("usr/share/doc/python3.11-doc/copyright")
_SUFFIX = ".rst.txt"

_HOW_TO_FIX = f"""\
To fix this, do one of:
  * install the documentation package by hand, then run again:
        sudo apt-get update && sudo apt-get install {DEFAULT_PACKAGE}
    (the text is then read from /{_SOURCES_REL});
  * or download the package on any Debian/Ubuntu machine and point to it:
        apt-get download {DEFAULT_PACKAGE}
        export LOWRANK_JAX_DOC_DEB=$PWD/{DEFAULT_PACKAGE}_*.deb
  * or train on your own text: set data.source='text_dir' and data.path to a
    directory of .txt files (or data.source='tfds' with a prepared dataset)."""


class CorpusUnavailableError(RuntimeError):
    """The default corpus cannot be obtained here (no apt, no network, ...)."""


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> tuple[bool, str]:
    try:
        p = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{' '.join(cmd)}: {e}"
    return p.returncode == 0, (p.stdout + p.stderr).strip()[-2000:]


def _apt_download(dest: Path) -> Path:
    """``apt-get download`` the package into ``dest``; returns the ``.deb`` path."""
    if shutil.which("apt-get") is None:
        raise CorpusUnavailableError(
            f"The default corpus needs Debian's {DEFAULT_PACKAGE} package, but apt-get is not "
            f"available on this machine.\n{_HOW_TO_FIX}"
        )
    ok, log = _run(["apt-get", "download", DEFAULT_PACKAGE], cwd=dest)
    if not ok and hasattr(os, "geteuid") and os.geteuid() == 0:
        # Typically the package lists are missing on a fresh machine.
        ok_upd, log_upd = _run(["apt-get", "update"])
        if ok_upd:
            ok, log = _run(["apt-get", "download", DEFAULT_PACKAGE], cwd=dest)
        else:
            log = f"{log}\napt-get update failed: {log_upd}"
    debs = sorted(dest.glob(f"{DEFAULT_PACKAGE}_*.deb"))
    if not ok or not debs:
        raise CorpusUnavailableError(
            f"`apt-get download {DEFAULT_PACKAGE}` failed:\n{log}\n{_HOW_TO_FIX}"
        )
    return debs[-1]


def _extract_deb(deb: Path, dest: Path) -> None:
    """``dpkg -x deb dest``, or a pure-Python reader of the ar/tar layout."""
    if shutil.which("dpkg-deb"):
        ok, log = _run(["dpkg-deb", "-x", str(deb), str(dest)])
        if ok:
            return
        raise CorpusUnavailableError(f"dpkg-deb -x {deb} failed:\n{log}\n{_HOW_TO_FIX}")
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise CorpusUnavailableError(f"{deb} is not a Debian package.\n{_HOW_TO_FIX}")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
                    tf.extractall(dest, filter="data")
            except tarfile.TarError as e:
                raise CorpusUnavailableError(
                    f"cannot unpack {name} from {deb} without dpkg ({e}).\n{_HOW_TO_FIX}"
                ) from e
            return
    raise CorpusUnavailableError(f"{deb} has no data.tar member.\n{_HOW_TO_FIX}")


def _deb_version(deb: Path) -> str:
    parts = deb.name.split("_")
    return parts[1] if len(parts) >= 3 else "unknown"


def _installed_version() -> str:
    ok, out = _run(["dpkg-query", "-W", "-f=${Version}", DEFAULT_PACKAGE], timeout=30)
    return out if ok and out else "unknown"


def _write_corpus(package_root: Path, root: Path, origin: str, version: str) -> Path:
    """Copy the ``.rst.txt`` sources below ``package_root`` into ``root/text``."""
    sources = package_root / _SOURCES_REL
    files = sorted(sources.rglob(f"*{_SUFFIX}")) if sources.is_dir() else []
    if not files:
        raise CorpusUnavailableError(
            f"no {_SUFFIX} files under {sources} ({origin}).\n{_HOW_TO_FIX}"
        )
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".text-", dir=root))
    n_bytes = 0
    for f in files:
        rel = f.relative_to(sources)
        out = staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        blob = f.read_bytes().replace(b"\x00", b"")  # NUL is the byte tokenizer's separator
        out.write_bytes(blob)
        n_bytes += len(blob)
    text_dir = root / "text"
    if text_dir.exists():
        shutil.rmtree(text_dir)
    staging.rename(text_dir)

    copyright_file = package_root / _COPYRIGHT_REL
    debian_copyright = (
        copyright_file.read_text(encoding="utf-8", errors="replace")
        if copyright_file.is_file()
        else "(Debian copyright file not found; see https://docs.python.org/3/license.html)\n"
    )
    (root / "LICENSE").write_text(
        "The documents under text/ are the reStructuredText sources of the Python 3.11\n"
        "documentation, Copyright (c) 2001-2023 Python Software Foundation, distributed\n"
        "under the Python Software Foundation License Version 2 (PSF-2.0); the full\n"
        "licence text is text/license.rst.txt. They were taken unmodified (except\n"
        f"for removing NUL bytes) from Debian's {DEFAULT_PACKAGE} package, version {version}.\n"
        "Debian's copyright file for that package follows.\n\n" + debian_copyright,
        encoding="utf-8",
    )
    (root / "README.md").write_text(
        "# Default pre-training corpus of lowrank-jax\n\n"
        f"- Source: Debian package `{DEFAULT_PACKAGE}` {version} ({origin}), directory\n"
        f"  `/{_SOURCES_REL}`.\n"
        "- Content: the reStructuredText sources of the Python 3.11 documentation,\n"
        f"  {len(files)} documents, {n_bytes} bytes, one document per file under `text/`.\n"
        "- Licence: Python Software Foundation License Version 2 (see `LICENSE`).\n"
        "- Held-out split: ~2% of the documents, chosen by a hash of the relative path\n"
        "  (`train.data.textfiles.split_of`).\n"
        "- Recreate with `python -c \"from train.data import prepare_default_corpus as p; "
        "p(__import__('pathlib').Path('DIR'))\"`.\n",
        encoding="utf-8",
    )
    return text_dir


def prepare_default_corpus(
    root: Path | str,
    *,
    source_tree: Path | str | None = None,
    deb_path: Path | str | None = None,
    use_system: bool = True,
) -> Path:
    """Make the Python 3.11 documentation available as plain-text files under ``root``.

    Idempotent: when ``root/.prepared.json`` exists the call returns at once.

    Args:
      root: output directory (created).
      source_tree: an already extracted ``python3.11-doc`` package (holds ``usr/``).
      deb_path: a downloaded ``python3.11-doc_*.deb`` (default: ``$LOWRANK_JAX_DOC_DEB``).
      use_system: read ``/usr/share/doc/python3.11`` if the package is installed.

    Returns:
      ``root/"text"``, a directory with one ``.rst.txt`` file per document.

    Raises:
      CorpusUnavailableError: the package cannot be found or downloaded; the
        message lists the commands that fix it.
    """
    root = Path(root).expanduser()
    text_dir = root / "text"
    marker = root / MARKER_NAME
    if marker.is_file() and text_dir.is_dir():
        return text_dir

    t0 = time.perf_counter()
    deb = deb_path or os.environ.get("LOWRANK_JAX_DOC_DEB")
    with tempfile.TemporaryDirectory(prefix="lowrank_jax_doc_") as tmp:
        tmp_path = Path(tmp)
        if source_tree is not None:
            package_root, origin, version = Path(source_tree), f"extracted at {source_tree}", "?"
        elif deb:
            deb = Path(deb).expanduser()
            if not deb.is_file():
                raise CorpusUnavailableError(f"{deb} does not exist.\n{_HOW_TO_FIX}")
            _extract_deb(deb, tmp_path / "pkg")
            package_root, origin, version = tmp_path / "pkg", deb.name, _deb_version(deb)
        elif use_system and (Path("/") / _SOURCES_REL).is_dir():
            package_root, origin, version = Path("/"), "installed", _installed_version()
        else:
            deb = _apt_download(tmp_path)
            _extract_deb(deb, tmp_path / "pkg")
            package_root, origin, version = tmp_path / "pkg", deb.name, _deb_version(deb)
        text_dir = _write_corpus(package_root, root, origin, version)

    files = sorted(text_dir.rglob(f"*{_SUFFIX}"))
    info = {
        "package": DEFAULT_PACKAGE,
        "version": version,
        "origin": origin,
        "documents": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "license": "PSF-2.0",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    marker.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return text_dir
