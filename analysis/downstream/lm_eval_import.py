"""lm-evaluation-harness results as downstream results of a run (what ``lowrank-analyze`` reads).

``lowrank-lm-eval --model lowrank-jax --model_args run_dir=R,step=S ... --output_path O``
writes lm-eval's ``results_<time>.json`` under ``O``; :func:`import_lm_eval` turns each
task's ``acc`` / ``acc_norm`` and their standard errors (for these means lm-eval gives
the closed form ``std(ddof=1) / sqrt(n)``) into ``<R>/downstream/step_<S>.json`` entries, so
the paper's tasks (piqa, copa, ...) appear in the report and feed the predictor next to
(or instead of) the built-in suite. ``step=final`` is the run's newest checkpoint.

lm-eval does not report a task's chance level; it is stored as NaN (shown as "–"). A
task group (e.g. ``blimp``) is imported as the entry lm-eval reports for the group
(its mean over subtasks, the paper's summary).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from analysis.downstream.results import DownstreamResultsError, write_step_results

__all__ = ["import_lm_eval", "lm_eval_step", "records_from_lm_eval"]


def _get(values: Mapping[str, Any], key: str) -> float | None:
    v = values.get(f"{key},none", values.get(key))
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):          # lm-eval writes "N/A" for a missing stderr
        return None


def records_from_lm_eval(payload: Mapping[str, Any], tasks: Iterable[str] | None = None
                         ) -> dict[str, dict[str, Any]]:
    """Our task results from an lm-eval results payload (``results_*.json``).

    Args:
      payload: the JSON lm-eval wrote (``{"results": {task: {"acc,none": ...}}, ...}``).
      tasks: the tasks to take (default: every entry with an ``acc``).

    Returns:
      ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "metric": "acc",
      "chance": nan, "n", "source": "lm-eval"}}``.

    >>> rec = records_from_lm_eval({"results": {"copa": {"acc,none": 0.6,
    ...     "acc_stderr,none": 0.05}}, "n-samples": {"copa": {"effective": 100}}})
    >>> rec["copa"]["acc"], rec["copa"]["acc_norm"], rec["copa"]["n"]
    (0.6, 0.6, 100)
    """
    results = payload.get("results")
    if not isinstance(results, Mapping):
        raise DownstreamResultsError("not an lm-eval results file (no 'results')")
    samples = payload.get("n-samples", {}) or {}
    wanted = None if tasks is None else list(tasks)
    out = {}
    for task, values in results.items():
        if wanted is not None and task not in wanted:
            continue
        acc = _get(values, "acc")
        if acc is None:
            continue
        se = _get(values, "acc_stderr")
        norm = _get(values, "acc_norm")
        norm_se = _get(values, "acc_norm_stderr")
        n = samples.get(task, {}).get("effective", 0) if isinstance(samples, Mapping) else 0
        out[task] = {"acc": acc, "acc_stderr": math.nan if se is None else se,
                     "acc_norm": acc if norm is None else norm,
                     "acc_norm_stderr": (math.nan if se is None else se) if norm is None
                     else (math.nan if norm_se is None else norm_se),
                     "metric": "acc", "chance": math.nan, "n": int(n), "source": "lm-eval",
                     "alias": str(values.get("alias", task)).strip()}
    missing = [] if wanted is None else [t for t in wanted if t not in out]
    if missing:
        raise DownstreamResultsError(f"the lm-eval results have no acc for {', '.join(missing)}")
    return out


def lm_eval_step(payload: Mapping[str, Any], steps: list[int]) -> int:
    """The checkpoint step an lm-eval run scored (its ``step=`` model argument; ``final``
    or absent: the newest of ``steps``)."""
    args = (payload.get("config") or {}).get("model_args", "")
    if isinstance(args, str):
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    step = str(args.get("step", "final"))
    return max(steps) if step == "final" else int(step)


def import_lm_eval(run_dir: str | Path, results_file: str | Path, steps: list[int],
                   name: str | None = None, tasks: Iterable[str] | None = None) -> Path:
    """Write the tasks of an lm-eval results file into ``run_dir``'s downstream results.

    Returns:
      The step file written (:func:`analysis.downstream.results.write_step_results`).

    Raises:
      DownstreamResultsError: an unreadable file or a requested task without ``acc``.
    """
    path = Path(results_file)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DownstreamResultsError(f"{path}: unreadable ({str(err).splitlines()[0]})") \
            from None
    records = records_from_lm_eval(payload, tasks)
    step = lm_eval_step(payload, steps)
    return write_step_results(run_dir, step, name or Path(run_dir).name, records)
