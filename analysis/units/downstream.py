"""Downstream zero-shot accuracy of each run, read from ``lowrank-eval``'s results.

``lowrank-eval`` writes ``<run>/downstream/step_<N>.json``
(:mod:`analysis.downstream.results`); this unit turns them into metric rows at the
checkpoint steps the analysis covers:

* ``downstream`` (layer: the task): the task's accuracy, ``Settings.downstream_metric``
  (``headline``: the task's own headline metric, e.g. ``acc_mutual_info`` for the
  built-in continuation task; ``acc``: the paper's metric);
* ``downstream_se`` (layer: the task): its bootstrap standard error;
* ``downstream_chance`` (layer: the task): the accuracy of guessing;
* ``downstream_mean`` / ``downstream_mean_se``: the mean over the tasks every evaluated
  run has (the paper's summary, mean over tasks) and its standard error
  ``sqrt(sum se_t^2) / n_tasks`` (tasks scored on independent questions).

A run without results, a damaged results file and runs evaluated on different
tasks are one problem line each; the rest of the report is produced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from analysis.downstream import DownstreamResultsError, read_downstream
from analysis.units.base import Metric, Study, Unit, UnitContext, row

__all__ = ["Downstream", "task_value"]

_PLOTS = ("downstream_over_steps",)


def task_value(result: dict[str, Any], metric: str) -> tuple[float, float]:
    """``(accuracy, standard error)`` of one task result for ``metric`` (``headline``/``acc``)."""
    key = result.get("metric", "acc") if metric == "headline" else metric
    if key not in result:
        key = "acc"
    return float(result[key]), float(result.get(f"{key}_stderr", math.nan))


@dataclass(frozen=True)
class Downstream(Unit):
    """Rows of a run's downstream results at its analysed steps (read, not cached)."""

    steps: tuple[int, ...] = ()
    tasks: tuple[str, ...] = field(default=())

    kind = "downstream"
    cached = False
    metrics = (
        Metric("downstream_mean", "downstream accuracy (mean over tasks)", unit="accuracy",
               summary=True, seed_test=True, plots=_PLOTS,
               findings=("perplexity_vs_downstream",)),
        Metric("downstream_mean_se", "downstream accuracy s.e.", unit="accuracy"),
        Metric("downstream", "downstream accuracy per task", "(task)", unit="accuracy",
               plots=_PLOTS),
        Metric("downstream_se", "downstream s.e. per task", "(task)", unit="accuracy"),
        Metric("downstream_chance", "chance accuracy per task", "(task)", unit="accuracy"),
    )

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        found: dict[int, dict[int, dict[str, Any]]] = {}
        for p in study.plans:
            try:
                results = read_downstream(p.run.path)
            except DownstreamResultsError as err:
                study.problem(f"run {p.run.name!r}: downstream results skipped: {err}")
                continue
            results = {t: r for t, r in results.items() if t in p.steps}
            if not results:
                study.problem(
                    f"run {p.run.name!r} has no downstream results at its analysed steps "
                    f"({p.run.path}/downstream/ is missing or empty); run `lowrank-eval "
                    f"{p.run.path}` to add them")
                continue
            found[id(p)] = results
        task_sets = [set(rec["tasks"]) for results in found.values() for rec in results.values()]
        common = sorted(set.intersection(*task_sets)) if task_sets else []
        every = sorted(set.union(*task_sets)) if task_sets else []
        if task_sets and common != every:
            study.problem(f"runs were evaluated on different downstream tasks; the mean is "
                          f"taken over the {len(common)} task(s) all have ({', '.join(common)}"
                          f"), not over {', '.join(sorted(set(every) - set(common)))}")
        for p in study.plans:
            if id(p) in found and common:
                yield cls(p.run, p.steps[-1], tuple(sorted(found[id(p)])), tuple(common))

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        metric = ctx.settings.downstream_metric
        rows = []
        for step, record in sorted(read_downstream(self.run.path).items()):
            if step not in self.steps:
                continue
            values, errors = [], []
            for task, result in sorted(record["tasks"].items()):
                acc, se = task_value(result, metric)
                rows += [row(self.run, step, "downstream", task, acc),
                         row(self.run, step, "downstream_se", task, se),
                         row(self.run, step, "downstream_chance", task,
                             float(result["chance"]))]
                if task in self.tasks:
                    values.append(acc)
                    errors.append(se)
            if len(values) == len(self.tasks):
                rows.append(row(self.run, step, "downstream_mean", "all",
                                sum(values) / len(values)))
                rows.append(row(self.run, step, "downstream_mean_se", "all",
                                math.sqrt(sum(e * e for e in errors)) / len(errors)))
        return {"rows": rows, "curves": {}}
