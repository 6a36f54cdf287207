"""The one metric table: every metric the analysis writes, read by the report, the
findings and the plots.

The rows are declared by the units that compute them
(:attr:`analysis.units.base.Unit.metrics`), in unit order.

>>> [m.name for m in summary_metrics()][:3]
['val_loss', 'sharpness', 'direction_variance']
"""

from __future__ import annotations

from analysis.units import UNITS, Metric

__all__ = ["METRICS", "by_name", "for_finding", "for_plot", "seed_test_metrics",
           "summary_metrics"]

METRICS: tuple[Metric, ...] = tuple(m for unit in UNITS for m in unit.metrics)


def by_name(name: str) -> Metric:
    """The table row of metric ``name``."""
    for m in METRICS:
        if m.name == name:
            return m
    raise KeyError(f"no metric {name!r} in the table")


def summary_metrics() -> tuple[Metric, ...]:
    """The columns of the report's summary tables, in order."""
    return tuple(m for m in METRICS if m.summary)


def seed_test_metrics() -> tuple[Metric, ...]:
    """The metrics compared with the baseline group in the seed-noise finding."""
    return tuple(m for m in METRICS if m.seed_test)


def for_plot(plot: str) -> tuple[Metric, ...]:
    """The metrics drawn by the figure ``plot`` (an :mod:`analysis.plots` function name)."""
    return tuple(m for m in METRICS if plot in m.plots)


def for_finding(finding: str) -> tuple[Metric, ...]:
    """The metrics read by the finding ``finding`` (an :mod:`analysis.findings` function)."""
    return tuple(m for m in METRICS if finding in m.findings)
