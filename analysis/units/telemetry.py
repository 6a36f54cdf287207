"""Units read from a run's own logs (``metrics.jsonl``), not from its checkpoints."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from analysis import runs as R
from analysis.units.base import Metric, Study, Unit, UnitContext, row

__all__ = ["Telemetry"]


@dataclass(frozen=True)
class Telemetry(Unit):
    """The projector overlap logged by ``lowrank-train`` at each refresh (mean over layers)."""

    kind = "telemetry"
    cached = False
    metrics = (Metric("telemetry_overlap", "overlap at refresh", "mean", unit="ratio",
                      plots=("subspace_overlap",), findings=("sara_overlap_lower",)),)

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        for p in study.plans:
            yield cls(p.run, p.run.steps[-1])

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        rows = [row(self.run, t["step"], "telemetry_overlap", "mean", t["overlap_mean"])
                for t in R.telemetry_overlaps(self.run)]
        return {"rows": rows, "curves": {}}
