"""Run logs: ``metrics.jsonl``, TensorBoard event files and the subspace-overlap telemetry.

``<run_dir>/metrics.jsonl`` holds one JSON object per line:

* train lines ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "opt_state_bytes"}``,
  written every ``log_every`` optimizer steps; for projection methods, a line is
  also written at each step where the projectors' overlaps changed (a refresh), with
  ``"overlap_mean"`` and ``"overlap": {layer path: value}`` (SARA's
  ``||P_old^T P_new||_F^2 / r``, from ``lowrank_jax.find_lowrank_states``);
* eval lines ``{"step", "val_loss", "val_ppl"}``.

When a run resumes from step ``s``, lines with ``step > s`` (written after the
checkpoint by the interrupted process) are dropped first, so the file reads as
one uninterrupted run. TensorBoard events go to ``<run_dir>/tb`` through
``tensorboardX`` when it is installed (``purge_step`` hides the same stale
events); ``flax.metrics.tensorboard`` is not used because it needs TensorFlow.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lowrank_jax as lj

__all__ = ["MetricsLog", "overlap_values", "read_metrics"]


def overlap_values(opt_state: Any) -> dict[str, float]:
    """``{layer path: overlap}`` of every projected leaf (``-1`` before the second refresh).

    Paths look like ``layers/0/attn/q_proj/kernel``; with several low-rank states
    in one optimizer the path is prefixed by ``<index>:``.
    """
    out: dict[str, float] = {}
    states = lj.find_lowrank_states(opt_state)
    for i, st in enumerate(states):
        leaves, _ = jax.tree_util.tree_flatten_with_path(st.overlap)
        for path, value in leaves:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            name = name.removesuffix("/value")
            if len(states) > 1:
                name = f"{i}:{name}"
            out[name] = float(np.asarray(value))
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The parsed lines of a ``metrics.jsonl`` (a torn last line is skipped)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _truncate_after(path: Path, step: int) -> None:
    """Keep only the complete lines of ``path`` with ``step <= step``."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)


def _summary_writer(logdir: Path, purge_step: int | None):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        warnings.warn("tensorboardX is not installed: no TensorBoard event files "
                      "(pip install tensorboardX, or set tensorboard=false)", stacklevel=3)
        return None
    return SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=30)


class MetricsLog:
    """Appends to ``metrics.jsonl`` (flushed per line) and TensorBoard.

    Args:
      run_dir: the run directory.
      start_step: the step the run starts from (``0`` or the restored step); lines
        after it are removed.
      tensorboard: write event files under ``run_dir/tb``.

    In a multi-process run only process 0 writes; the others keep the overlap
    bookkeeping and write nothing.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self._last_overlap: dict[str, float] | None = None
        if jax.process_index() != 0:
            self._file, self._tb = None, None
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if start_step > 0:
            _truncate_after(self.path, start_step)
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = (_summary_writer(self.run_dir / "tb", start_step + 1 if start_step else None)
                    if tensorboard else None)

    def write(self, row: dict[str, Any]) -> None:
        """Append one line (``row["step"]`` required) and mirror numbers to TensorBoard."""
        if self._file is None:
            return
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key == "step":
                    continue
                if key == "overlap" and isinstance(value, dict):
                    for name, v in value.items():
                        self._tb.add_scalar(f"overlap/{name}", v, step)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    tag = key if key.startswith("val_") else f"train/{key}"
                    self._tb.add_scalar(tag.replace("val_", "eval/"), value, step)

    def overlap_update(self, opt_state: Any) -> dict[str, Any]:
        """Fields to add to a line if the projectors' overlaps changed since last call.

        Returns ``{}`` when nothing changed (or before any valid overlap), else
        ``{"overlap_mean": float, "overlap": {path: float}}``.
        """
        values = overlap_values(opt_state)
        if not values or values == self._last_overlap:
            return {}
        self._last_overlap = values
        valid = [v for v in values.values() if v >= 0]
        if not valid:
            return {}
        return {"overlap_mean": float(np.mean(valid)), "overlap": values}

    def prime_overlap(self, opt_state: Any) -> None:
        """Remember the current overlaps (after a restore) so they are not logged again."""
        self._last_overlap = overlap_values(opt_state) or None

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
