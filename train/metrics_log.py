"""Run logs: ``metrics.jsonl`` and TensorBoard event files.

``<run_dir>/metrics.jsonl`` holds one JSON object per line, each written by a
hook of the training loop (:mod:`train.hooks`):

* train lines ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "opt_state_bytes"}``,
  written every ``log_every`` optimizer steps;
* telemetry lines ``{"step", "overlap_mean", "overlap": {layer path: value}}`` at each
  projector refresh of a projection method (SARA's ``||P_old^T P_new||_F^2 / r``);
* eval lines ``{"step", "val_loss", "val_ppl"}``;
* ``{"step", "relora_reset": 1}`` after each ReLoRA reset;
* ``{"step", "nonfinite_skipped", "nonfinite_total", "nonfinite_updates"}`` on a
  ``log_every`` step after steps were skipped for a NaN/inf loss or gradient
  (:class:`train.hooks.NonFiniteSteps`).

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

from rundir import layout
from rundir.layout import read_metrics

__all__ = ["MetricsLog"]


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

    In a multi-process run only process 0 writes.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        if jax.process_index() != 0:
            self._file, self._tb = None, None
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / layout.METRICS
        if start_step > 0:
            _truncate_after(self.path, start_step)
        else:
            self.path.unlink(missing_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = (_summary_writer(self.run_dir / layout.TENSORBOARD, start_step + 1 if start_step else None)
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

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
