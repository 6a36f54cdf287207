"""Tokenizers for pre-training data.

Two implementations of the :class:`Tokenizer` protocol:

* :class:`ByteTokenizer` (the default, ``tokenizer="byte"``): UTF-8 bytes are the
  token ids ``0..255``; ``vocab_size == 256`` exactly. Byte ``0`` (NUL, which never
  occurs in prose) is reused as the document *separator* and as the *padding*
  id, so no extra id is needed.
* :class:`SentencePieceTokenizer` (``tokenizer="/path/to/model.model"``): wraps a
  trained SentencePiece model (``sentencepiece`` PyPI package, imported lazily).
  The separator is the model's EOS id (falling back to BOS, then 0); padding
  uses the model's PAD id (falling back to the separator). Padding is always
  masked out, so its value only matters for readability.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "BYTE_SEPARATOR_ID",
    "ByteTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "get_tokenizer",
]

#: Id used by the byte tokenizer to separate documents (and to pad).
BYTE_SEPARATOR_ID = 0


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Number of token ids; every id is in ``[0, vocab_size)``."""
        ...

    @property
    def separator_id(self) -> int:
        """Id appended after every document (end-of-document)."""
        ...

    @property
    def pad_id(self) -> int:
        """Id used to fill padded positions (always masked out)."""
        ...

    @property
    def fingerprint(self) -> str:
        """Short string identifying the vocabulary, used as a cache key."""
        ...

    def encode(self, text: str) -> np.ndarray:
        """``str -> (n,) int32`` ids, without separator."""
        ...

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """``(n,)`` ids -> text (inverse of :meth:`encode`)."""
        ...


class ByteTokenizer:
    """UTF-8 byte tokenizer: ``vocab_size == 256``, separator/pad id ``0``.

    ``decode(encode(s)) == s`` for every string. Decoding uses
    ``errors="replace"`` so a window cut in the middle of a multi-byte character
    still decodes.
    """

    vocab_size: int = 256
    separator_id: int = BYTE_SEPARATOR_ID
    pad_id: int = BYTE_SEPARATOR_ID
    fingerprint: str = "byte256"

    def encode(self, text: str) -> np.ndarray:
        """``str -> (len(text.encode('utf-8')),) int32``."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """``(n,)`` ids in ``0..255`` -> text."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("byte tokenizer ids must lie in 0..255")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256, separator_id=0)"


class SentencePieceTokenizer:
    """A trained SentencePiece model (``.model`` file).

    Args:
      model_path: path to the serialized SentencePiece model.

    Raises:
      ValueError: the file does not exist, cannot be read or is not a SentencePiece model.
      ImportError: the ``sentencepiece`` package is not installed.
    """

    def __init__(self, model_path: str | Path):
        path = Path(model_path).expanduser()
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ValueError(
                f"data.tokenizer: SentencePiece model file {str(path)!r} {what}; "
                "set data.tokenizer to 'byte' or to the path of a trained .model file"
            )
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "data.tokenizer points at a SentencePiece model but the 'sentencepiece' "
                "package is not installed; run `pip install 'sentencepiece>=0.2,<0.3'` "
                "or use data.tokenizer='byte'"
            ) from e
        self.model_path = path
        try:
            blob = path.read_bytes()
            self._sp = spm.SentencePieceProcessor(model_proto=blob)
        except (RuntimeError, OSError, TypeError) as e:  # sentencepiece: RuntimeError
            detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            if "ParseFromArray" in detail:  # sentencepiece's C++ location, not a reason
                detail = "its bytes do not parse as a model"
            raise ValueError(
                f"data.tokenizer: {str(path)!r} is not a SentencePiece model ({detail}); set "
                "data.tokenizer to 'byte' or to the path of a trained .model file"
            ) from e
        self._fingerprint = "spm-" + hashlib.sha256(blob).hexdigest()[:16]
        eos, bos, pad = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()
        self._sep = eos if eos >= 0 else max(bos, 0)
        self._pad = pad if pad >= 0 else self._sep

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def separator_id(self) -> int:
        return int(self._sep)

    @property
    def pad_id(self) -> int:
        return int(self._pad)

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> np.ndarray:
        """``str -> (n,) int32`` SentencePiece ids (no BOS/EOS added)."""
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """``(n,)`` ids -> text."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def get_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a path -> :class:`SentencePieceTokenizer`.

    Raises:
      ValueError: ``spec`` is neither ``"byte"`` nor an existing file.
    """
    if spec == "byte":
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)
