"""Where analysis work is kept between calls: unit results on disk, checkpoints in memory."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

from analysis import runs as R

__all__ = ["CheckpointLoader", "UnitCache"]


class CheckpointLoader:
    """Restores checkpoints on demand and keeps the last ``size`` (least recently used out)."""

    def __init__(self, size: int = 6):
        self.size = size
        self.items: OrderedDict[tuple[str, int], R.Checkpoint] = OrderedDict()
        self.loads = 0

    def __call__(self, run: R.RunInfo, step: int) -> R.Checkpoint:
        key = (str(run.path), step)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        ckpt = R.load_checkpoint(run, step)
        self.loads += 1
        self.items[key] = ckpt
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return ckpt


class UnitCache:
    """One JSON file per unit result under ``directory`` (``None``: no cache)."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached result of ``key``, or ``None`` (absent or unreadable)."""
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store ``value`` under ``key`` (written to a temporary file, then renamed)."""
        if self.directory is None:
            return
        path = self.directory / f"{key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, allow_nan=True), encoding="utf-8")
        tmp.replace(path)
