"""Units of analysis work and the metric table they declare.

A :class:`Unit` is one small typed piece of work: its fields say what it needs
(a run and a step; a previous step, a baseline run, another run, ...), its
:meth:`~Unit.key_parts` what its cached result depends on besides that, and
:meth:`~Unit.compute` produces metric rows (``run, method, step, metric, layer,
value``) and curves for the plots. :meth:`~Unit.plan` lists every instance a
study needs. A unit class registers itself on definition (in definition order,
which is also the order of the metric table and of the report's columns).

Each unit declares the :class:`Metric` rows it writes; together they are the one
metric table (:mod:`analysis.metric_table`) that the report, the findings and the
plots read. Adding a metric is one unit (or one more row in a unit's compute)
and one :class:`Metric` entry next to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from analysis import runs as R
from analysis.settings import Settings

__all__ = ["CheckpointUnit", "Metric", "RunPlan", "Study", "Unit", "UnitContext", "row"]


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: a metric the analysis writes, and who reads it.

    Attributes:
      name: the ``metric`` field of its rows, e.g. ``"sharpness"``.
      label: short human name (table headers, plot titles, findings' evidence).
      layer: the ``layer`` of its summary value (``"all"``, ``"mean"``, ``"final_norm"``).
      unit: what it is measured in (``"nats"``, ``"ratio"``, ``""`` for counts and ranks).
      summary: a column of the report's summary tables.
      seed_test: tested against the baseline group in the seed-noise finding.
      geometry: a significant difference there counts as "differs from full rank".
      plots: the figures (:mod:`analysis.plots` function names) that draw it.
      findings: the findings (:mod:`analysis.findings` function names) that read it.
    """

    name: str
    label: str
    layer: str = "all"
    unit: str = ""
    summary: bool = False
    seed_test: bool = False
    geometry: bool = False
    plots: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()


def row(run: R.RunInfo, step: int, metric: str, layer: str, value: float) -> dict[str, Any]:
    """One metric row of ``run``."""
    return {"run": run.name, "method": run.method, "step": int(step), "metric": metric,
            "layer": layer, "value": float(value)}


@dataclass
class RunPlan:
    """What the study does with one run.

    Attributes:
      run: the run.
      steps: its checkpoint steps to analyse (``Settings.steps`` applied).
      base: the baseline run it is compared with (``None``: none).
      imbh_skip: why IMBH against the baseline is not computed (``None``: it is).
    """

    run: R.RunInfo
    steps: list[int]
    base: R.RunInfo | None = None
    imbh_skip: str | None = None


@dataclass
class Study:
    """Everything :meth:`Unit.plan` may read: the runs, the baseline and the settings.

    Attributes:
      plans: one :class:`RunPlan` per run (the baseline's runs first).
      base_run: the baseline (its first seed for a group), or ``None``.
      settings: the analysis settings.
      problem: report a one-line problem (the rest of the study goes on).
    """

    plans: list[RunPlan]
    base_run: R.RunInfo | None
    settings: Settings
    problem: Callable[[str], None]


@dataclass
class UnitContext:
    """What :meth:`Unit.compute` gets: settings, a checkpoint loader, evaluation batches."""

    settings: Settings
    load: Callable[[R.RunInfo, int], R.Checkpoint]
    batch: Callable[[R.RunInfo], dict[str, Any]]


@dataclass(frozen=True)
class Unit:
    """One cached piece of analysis work on ``run`` at checkpoint ``step``.

    Subclasses set ``kind`` (its name in cache keys and messages), ``settings_used``
    (the :class:`Settings` fields its result depends on) and ``metrics`` (the
    table rows it writes), add the fields they need, and implement :meth:`plan`
    and :meth:`compute`.
    """

    run: R.RunInfo
    step: int

    kind: ClassVar[str] = ""
    #: part of the cache key: raise it when ``compute`` changes what it returns
    version: ClassVar[int] = 1
    settings_used: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[Metric, ...]] = ()
    #: ``False``: recomputed every time (cheap, e.g. read from the run's own files)
    cached: ClassVar[bool] = True
    #: units of phase 1 run after every per-run unit (cross-run work)
    phase: ClassVar[int] = 0
    registry: ClassVar[list[type[Unit]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Unit.registry.append(cls)

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        """Every instance of this unit the study needs."""
        raise NotImplementedError

    def key_parts(self, settings: Settings) -> dict[str, Any]:
        """What the result depends on besides the run, the step and ``settings_used``."""
        return {}

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        """``{"rows": [metric rows], "curves": {curve name: JSON-able curve}}``."""
        raise NotImplementedError


@dataclass(frozen=True)
class CheckpointUnit(Unit):
    """A unit on one checkpoint: one instance per analysed step of every run."""

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        for p in study.plans:
            for step in p.steps:
                yield cls(p.run, step)
