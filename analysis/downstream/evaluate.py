"""Score a task with a restored model: per-question acc/acc_norm, means and standard errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from analysis.downstream.scoring import (
    ScoringModel,
    bootstrap_stderr,
    choice_metrics,
    encode_pair,
    loglikelihoods,
)
from analysis.downstream.tasks import Task

__all__ = ["evaluate_task", "task_requests"]


def task_requests(task: Task, encode: Callable[[str], Any], separator_id: int
                  ) -> list[tuple[list[int], list[int]]]:
    """The ``(context ids, choice ids)`` of every choice of every question, in order."""
    return [encode_pair(encode, ex.context, choice, separator_id)
            for ex in task.examples for choice in ex.choices]


def _closed_form(values: np.ndarray) -> float:
    """lm-eval's ``mean_stderr``: sample standard deviation / sqrt(n)."""
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def evaluate_task(model: ScoringModel, tokenizer: Any, task: Task, batch_size: int = 32,
                  bootstrap_iters: int = 1000, seed: int = 0,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``task``.

    Args:
      model: the restored model.
      tokenizer: the run's tokenizer (``encode(str) -> ids``).
      task: the questions.
      batch_size: rows per compiled call.
      bootstrap_iters: resamples for the standard errors (the paper: 1000).
      seed: bootstrap seed.
      progress: called with the number of scored choices after each batch.

    Returns:
      ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_stderr_closed_form",
      "acc_norm_stderr_closed_form", "metric", "chance", "n", "choices", "fingerprint",
      "source", "bootstrap_iters", "seed", "max_length"}`` plus ``acc_mutual_info`` and its
      errors for a task with ``mutual_info``; ``*_stderr`` are bootstrap standard errors
      of the mean over questions, ``*_closed_form`` lm-eval's ``std(ddof=1) / sqrt(n)``;
      ``metric`` names the task's headline metric.
    """
    requests = task_requests(task, tokenizer.encode, model.separator_id)
    if task.mutual_info:
        requests += [encode_pair(tokenizer.encode, "", choice, model.separator_id)
                     for ex in task.examples for choice in ex.choices]
    try:
        scored = loglikelihoods(model, requests, batch_size=batch_size, progress=progress)
    except ValueError as err:
        raise ValueError(f"task {task.name!r}: {err}") from None
    scores = np.asarray([s for s, _ in scored])
    n_choices = sum(len(ex.choices) for ex in task.examples)
    per_question: dict[str, list[float]] = {"acc": [], "acc_norm": []}
    if task.mutual_info:
        per_question["acc_mutual_info"] = []
    i = 0
    for ex in task.examples:
        k = len(ex.choices)
        unconditional = scores[n_choices + i:n_choices + i + k] if task.mutual_info else None
        m = choice_metrics(scores[i:i + k], ex.choices, ex.gold, unconditional)
        i += k
        for key, values in per_question.items():
            values.append(m[key])
    out: dict[str, Any] = {}
    for key, values in per_question.items():
        v = np.asarray(values)
        out[key] = float(v.mean())
        out[f"{key}_stderr"] = bootstrap_stderr(v, bootstrap_iters, seed)
        out[f"{key}_stderr_closed_form"] = _closed_form(v)
    return {
        **out,
        "metric": task.metric,
        "chance": float(task.chance),
        "n": len(task.examples),
        "choices": n_choices,
        "fingerprint": task.fingerprint,
        "source": task.source,
        "bootstrap_iters": int(bootstrap_iters),
        "seed": int(seed),
        "max_length": int(model.max_length),
    }
