"""Every metric of the study for every checkpoint of every run, cached on disk.

:func:`analyse` opens the runs (and the baseline), plans the units of work that
each registered unit class asks for (:mod:`analysis.units`: one checkpoint,
consecutive checkpoints, the trajectory, the baseline, pairs of runs, the
training telemetry), then computes each unit or reads it from the cache: one
JSON file per unit under ``cache_dir``, keyed by (unit, run directory, step,
checkpoint fingerprints, the settings it depends on, what else it needs).

A second call with the same runs and settings reads every unit from the cache
and restores no checkpoint. Problems (missing baseline step, mismatched
architecture, CoLA without dense weights) are collected as one-line messages
and the rest of the work goes on.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from analysis import runs as R
from analysis.cache import CheckpointLoader, UnitCache
from analysis.settings import Settings
from analysis.units import UNITS, RunPlan, Study, Unit, UnitContext
from analysis.units.comparison import imbh_skip_reason
from rundir import groups as G

__all__ = ["Results", "Settings", "analyse"]

log = logging.getLogger(__name__)


@dataclass
class Results:
    """Rows (``run, method, step, metric, layer, value``), curves for plots, problems."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    baseline: str | None = None
    computed_units: int = 0
    cached_units: int = 0

    def add(self, unit: Unit, out: dict[str, Any]) -> None:
        """Take in one unit's rows and curves."""
        self.rows.extend(out["rows"])
        for name, curve in out["curves"].items():
            self.curves.setdefault(name, {}).setdefault(unit.run.name, {})[str(unit.step)] = curve


def _open_member(m: G.Member) -> R.RunInfo:
    """Open one run directory of an argument and attach its group label and seed."""
    run = R.open_run(m.path)
    if m.name is not None:
        run.name = m.name
    run.group, run.seed = m.group, m.seed
    return run


def _open_all(paths: list[str | Path], problem: Callable[[str], None],
              template: str = "{}") -> list[R.RunInfo]:
    """The runs behind ``paths`` (groups expanded); each unreadable one is a problem."""
    runs = []
    for d in paths:
        for m in G.expand(d):
            try:
                runs.append(_open_member(m))
            except R.AnalysisInputError as err:
                problem(template.format(err))
    return runs


def _label_uniquely(runs: list[R.RunInfo]) -> None:
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.name}"
        if r.seed is None:
            r.group = r.name


class _Baseline:
    """The baseline run(s) and which of them each run is compared with."""

    def __init__(self, runs: list[R.RunInfo]):
        self.runs = runs
        self.by_seed = {r.seed: r for r in runs}
        self.ids = {id(r) for r in runs}

    def is_baseline(self, run: R.RunInfo) -> bool:
        return id(run) in self.ids

    def of(self, run: R.RunInfo) -> R.RunInfo | None:
        """Seed k of the baseline for seed k of a run; a one-run baseline for every run."""
        if not self.runs or self.is_baseline(run):
            return None
        if len(self.runs) == 1 or run.seed is None:
            return self.runs[0]
        return self.by_seed.get(run.seed)


def _plan_run(run: R.RunInfo, baseline: _Baseline, s: Settings, res: Results,
              problem: Callable[[str], None]) -> RunPlan:
    """What to analyse of one run (its steps, its baseline), with its entry in ``res.runs``."""
    steps = run.steps if s.steps is None else [t for t in run.steps if t in s.steps]
    missing = [] if s.steps is None else [t for t in s.steps if t not in run.steps]
    if missing:
        problem(f"run {run.name!r} has no checkpoint at step(s) {missing} (it has "
                f"{run.steps}); those steps are skipped for it")
    base = baseline.of(run)
    if base is None and baseline.runs and not baseline.is_baseline(run):
        problem(f"run {run.name!r} (seed {run.seed}) has no baseline run of the same seed "
                f"(baseline seeds {sorted(baseline.by_seed)}); its comparisons with the "
                "baseline are skipped — train the baseline with the same seeds")
    mismatch = None if base is None else R.architecture_mismatch(run, base)
    if mismatch:
        problem(mismatch)
    skip = None if base is None or mismatch else imbh_skip_reason(run, base)
    if skip:
        problem(skip)
    res.runs.append({"name": run.name, "method": run.method, "linear": run.linear,
                     "method_label": R.method_label(run.config),
                     "path": str(run.path), "steps": steps,
                     "baseline": baseline.is_baseline(run), "architecture": R.architecture(run),
                     "group": run.group, "seed": run.seed,
                     "compared_with": None if base is None else base.name})
    return RunPlan(run, steps, None if mismatch else base, skip)


def _cache_key(unit: Unit, s: Settings) -> str:
    settings = {k: v for k, v in asdict(s).items() if k in unit.settings_used}
    parts: dict[str, Any] = {"unit": unit.kind, "version": unit.version, "run": str(unit.run.path),
                             "step": unit.step, "fp": R.checkpoint_fingerprint(unit.run, unit.step),
                             "settings": settings, **unit.key_parts(s)}
    return f"{unit.run.name.replace('/', '_')}-{unit.step}-{unit.kind}-{R.settings_hash(parts)}"


def _run_unit(unit: Unit, ctx: UnitContext, cache: UnitCache, res: Results) -> None:
    if not unit.cached:
        res.add(unit, unit.compute(ctx))
        return
    key = _cache_key(unit, ctx.settings)
    out = cache.get(key)
    if out is None:
        out = unit.compute(ctx)
        cache.put(key, out)
        res.computed_units += 1
    else:
        res.cached_units += 1
    res.add(unit, out)


def _execute(units: list[Unit], ctx: UnitContext, cache: UnitCache, res: Results,
             problem: Callable[[str], None], progress: bool) -> None:
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(units), desc="analyse", dynamic_ncols=True, file=sys.stderr)
    try:
        for unit in units:
            if bar is not None:
                bar.set_postfix_str(f"{unit.run.name} {unit.kind} {unit.step}")
            try:
                _run_unit(unit, ctx, cache, res)
            except R.AnalysisInputError as err:
                problem(str(err))
            except Exception as err:  # noqa: BLE001 - one failed unit must not stop the report
                first = (str(err).strip().splitlines() or [""])[0][:200]
                problem(f"run {unit.run.name!r} step {unit.step}: {unit.kind} metrics failed "
                        f"({type(err).__name__}: {first})")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def plan_units(study: Study) -> list[Unit]:
    """Every registered unit's instances, ordered run by run and step by step (so that a
    checkpoint is restored once for all the units that read it), cross-run units last."""
    order = {id(p.run): i for i, p in enumerate(study.plans)}
    kinds = {cls: i for i, cls in enumerate(UNITS)}
    units = [u for cls in UNITS for u in cls.plan(study)]
    return sorted(units, key=lambda u: (u.phase, order.get(id(u.run), 0), u.step,
                                        kinds[type(u)]))


def analyse(run_dirs: list[str | Path], baseline: str | Path | None, settings: Settings,
            cache_dir: Path | None = None, progress: bool = True,
            warn: Callable[[str], None] | None = None) -> Results:
    """Compute every metric for every checkpoint of ``run_dirs`` (and of the baseline).

    Args:
      run_dirs: run directories written by ``lowrank-train`` (or seed groups of them).
      baseline: the full-rank reference run (activations, IMBH), or ``None``.
      settings: :class:`Settings`.
      cache_dir: where unit results are cached (``None``: no cache).
      progress: show a tqdm bar on stderr.
      warn: called with each problem (one line) as it is found (default: a
        ``logging`` warning).

    Returns:
      :class:`Results`; problems are also listed in ``results.problems``.
    """
    res = Results()
    say = warn or log.warning

    def problem(msg: str) -> None:
        res.problems.append(msg)
        say(msg)

    base_runs = [] if baseline is None else _open_all(
        [baseline], problem, "baseline: {}; comparisons with a baseline are skipped")
    if base_runs:
        res.baseline = base_runs[0].group if G.is_group(baseline) else base_runs[0].name
    seen = {str(r.path) for r in base_runs}
    runs = list(base_runs)
    for run in _open_all(list(run_dirs), problem):
        if str(run.path) not in seen:
            seen.add(str(run.path))
            runs.append(run)
    _label_uniquely(runs)
    if base_runs and base_runs[0].seed is None:
        res.baseline = base_runs[0].name
    base = _Baseline(base_runs)
    plans = [_plan_run(run, base, settings, res, problem) for run in runs]
    study = Study(plans, base_runs[0] if base_runs else None, settings, problem)

    batches: dict[str, dict[str, Any]] = {}

    def batch_of(run: R.RunInfo) -> dict[str, Any]:
        if str(run.path) not in batches:
            raw = R.validation_batch(run, settings.sequences)
            batches[str(run.path)] = {k: jnp.asarray(v) for k, v in raw.items()}
        return batches[str(run.path)]

    ctx = UnitContext(settings, CheckpointLoader(), batch_of)
    _execute(plan_units(study), ctx, UnitCache(cache_dir), res, problem, progress)
    return res
