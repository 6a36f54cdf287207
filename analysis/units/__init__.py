"""The units of analysis work (:class:`~analysis.units.base.Unit` subclasses), in order.

Importing this package defines and registers every unit, module by module in the
order below (a unit's place there is its metrics' place in the table and the
report); :data:`UNITS` lists them.
"""
# ruff: noqa: I001  (the import order is the registration order)

from analysis.units.base import Metric, RunPlan, Study, Unit, UnitContext
from analysis.units import checkpoint  # noqa: F401  one checkpoint: landscape, spectra
from analysis.units import topk  # noqa: F401  one checkpoint: top-k PCA landscapes
from analysis.units import ranks  # noqa: F401  the rank table of W and dW, update norms
from analysis.units import consecutive  # noqa: F401  along a run: dW, CCBH, trajectory
from analysis.units import comparison  # noqa: F401  two runs: baseline, pairs
from analysis.units import telemetry  # noqa: F401  the run's own logs
from analysis.units import downstream  # noqa: F401  lowrank-eval's results

UNITS: tuple[type[Unit], ...] = tuple(Unit.registry)

__all__ = ["UNITS", "Metric", "RunPlan", "Study", "Unit", "UnitContext"]
