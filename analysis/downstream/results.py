"""Downstream results on disk: ``<run_dir>/downstream/step_<N>.json``, written and read.

One file per evaluated checkpoint step of a run (a seed group's members each
have their own)::

    {"format": 1, "run": "galore", "step": 1000,
     "tasks": {"heldout_cloze": {"acc": 0.41, "acc_stderr": 0.016,
                                 "acc_norm": 0.41, "acc_norm_stderr": 0.016,
                                 "acc_stderr_closed_form": 0.016, "acc_norm_stderr_closed_form": ...,
                                 "metric": "acc", "chance": 0.25, "n": 1000,
                                 "fingerprint": "...",
                                 "source": "builtin", "bootstrap_iters": 1000, "seed": 0,
                                 "settings": {...}}, ...}}

Evaluating more tasks at the same step adds them to the file (a task evaluated
again replaces its entry); files are replaced atomically. :func:`read_downstream`
is what ``lowrank-analyze`` calls; it imports neither JAX nor the model.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "RESULTS_DIR",
    "DownstreamResultsError",
    "mean_accuracy",
    "read_downstream",
    "result_path",
    "write_step_results",
]

RESULTS_DIR = "downstream"
FORMAT = 1
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")
_REQUIRED = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "chance", "n")


class DownstreamResultsError(ValueError):
    """Downstream results that are missing or unreadable; one-line message."""


def result_path(run_dir: str | Path, step: int) -> Path:
    """``<run_dir>/downstream/step_<step>.json``."""
    return Path(run_dir) / RESULTS_DIR / f"step_{int(step)}.json"


def write_step_results(run_dir: str | Path, step: int, run: str,
                       tasks: Mapping[str, Mapping[str, Any]]) -> Path:
    """Merge ``tasks`` (name -> result dict) into the step's file; atomic replace.

    Returns:
      The file written.
    """
    path = result_path(run_dir, step)
    record: dict[str, Any] = {"format": FORMAT, "run": run, "step": int(step), "tasks": {}}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and isinstance(old.get("tasks"), dict):
                record["tasks"].update(old["tasks"])
        except (OSError, ValueError):
            pass                                    # a damaged file is rewritten
    record["tasks"].update({k: dict(v) for k, v in tasks.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check(path: Path, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("tasks"), dict):
        raise DownstreamResultsError(f"{path}: not a downstream results file (no 'tasks'); "
                                     "re-run lowrank-eval on the run")
    for name, res in record["tasks"].items():
        missing = [k for k in _REQUIRED if not isinstance(res, dict) or k not in res]
        if missing:
            raise DownstreamResultsError(f"{path}: task {name!r} lacks {', '.join(missing)}; "
                                         "re-run lowrank-eval on the run")
    return record


def read_downstream(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every downstream result of a run: ``{step: {"run", "step", "tasks": {name: result}}}``.

    Args:
      run_dir: a run directory written by ``lowrank-train`` (one seed of a group).

    Returns:
      Steps ascending; ``{}`` when the run has not been evaluated.

    Raises:
      DownstreamResultsError: a results file that is not JSON or lacks fields.
    """
    directory = Path(run_dir) / RESULTS_DIR
    if not directory.is_dir():
        return {}
    found = sorted((int(m.group(1)), p) for p in directory.iterdir()
                   if (m := _STEP_FILE.match(p.name)))
    out = {}
    for step, path in found:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DownstreamResultsError(f"{path}: unreadable ({str(err).splitlines()[0]}); "
                                         "delete it and re-run lowrank-eval") from None
        out[step] = _check(path, record)
    return out


def mean_accuracy(record: Mapping[str, Any], tasks: Iterable[str] | None = None,
                  metric: str = "acc") -> float:
    """Mean of ``metric`` over ``tasks`` (default: all tasks of the record), the paper's summary.

    ``metric="headline"`` takes each task's own headline metric (its ``"metric"``
    field, ``acc`` when absent). Returns NaN when a requested task is missing, so a
    partial evaluation is never averaged silently.

    >>> mean_accuracy({"tasks": {"a": {"acc": 0.5}, "b": {"acc": 0.7}}})
    0.6
    >>> mean_accuracy({"tasks": {"a": {"acc": 0.5}}}, ["a", "b"])
    nan
    >>> mean_accuracy({"tasks": {"a": {"acc": 0.5, "x": 0.9, "metric": "x"}}}, metric="headline")
    0.9
    """
    results = record["tasks"]
    names = list(results) if tasks is None else list(tasks)
    if not names or any(n not in results for n in names):
        return math.nan
    keys = [results[n].get("metric", "acc") if metric == "headline" else metric for n in names]
    if any(k not in results[n] for n, k in zip(names, keys)):
        return math.nan
    return sum(float(results[n][k]) for n, k in zip(names, keys)) / len(names)
