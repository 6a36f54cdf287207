"""Look-ups on the metric rows (``run, method, step, metric, layer, value``) and CSV/JSON output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["FIELDS", "group_lookup", "group_series", "groups", "latest_common_step", "lookup",
           "series", "write_csv", "write_json"]

FIELDS = ("run", "method", "step", "metric", "layer", "value")


def series(rows: list[dict[str, Any]], run: str, metric: str, layer: str = "all"
           ) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one run's metric at one layer, by ascending step."""
    pts = sorted((r["step"], r["value"]) for r in rows
                 if r["run"] == run and r["metric"] == metric and r["layer"] == layer)
    return [p[0] for p in pts], [p[1] for p in pts]


def lookup(rows: list[dict[str, Any]], run: str, step: int, metric: str, layer: str = "all"
           ) -> float:
    """The value of one row, ``nan`` when absent."""
    for r in rows:
        if (r["run"] == run and r["step"] == step and r["metric"] == metric
                and r["layer"] == layer):
            return float(r["value"])
    return math.nan


def layers_of(rows: list[dict[str, Any]], metric: str) -> list[str]:
    """Layers that ``metric`` has rows for, in first-seen order."""
    out: list[str] = []
    for r in rows:
        if r["metric"] == metric and r["layer"] not in out:
            out.append(r["layer"])
    return out


def latest_common_step(rows: list[dict[str, Any]], runs: list[str], metric: str,
                       layer: str = "all") -> int | None:
    """The largest step at which every run in ``runs`` has ``metric``; ``None`` if none."""
    sets = [set(series(rows, r, metric, layer)[0]) for r in runs]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def groups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed groups of ``Results.runs`` in first-seen order.

    Returns ``[{"name", "method", "linear", "baseline", "members": [run names], "seeds"}]``;
    a plain run is a group of one named as the run.
    """
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        g = r.get("group") or r["name"]
        entry = out.setdefault(g, {"name": g, "method": r["method"], "linear": r["linear"],
                                   "baseline": r["baseline"], "members": [], "seeds": []})
        entry["members"].append(r["name"])
        entry["seeds"].append(r.get("seed"))
    return list(out.values())


def _mean_std(vals: list[float]) -> tuple[float, float]:
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)
    return mean, math.sqrt(var)


def group_series(rows: list[dict[str, Any]], members: list[str], metric: str,
                 layer: str = "all") -> tuple[list[int], list[float], list[float]]:
    """``(steps, mean, std)`` over the members of a group (std ``ddof=1``; ``nan`` for one value).

    For a one-member group the means are that run's :func:`series`.
    """
    by_step: dict[int, list[float]] = {}
    names = set(members)
    for r in rows:
        if r["run"] in names and r["metric"] == metric and r["layer"] == layer:
            by_step.setdefault(int(r["step"]), []).append(float(r["value"]))
    steps = sorted(by_step)
    stats = [_mean_std(by_step[t]) for t in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def group_lookup(rows: list[dict[str, Any]], members: list[str], step: int, metric: str,
                 layer: str = "all") -> float:
    """Mean over the group's members of one metric at one step; ``nan`` when absent."""
    vals = [lookup(rows, m, step, metric, layer) for m in members]
    return _mean_std(vals)[0]


def write_csv(rows: list[dict[str, Any]], path: Path,
              fields: tuple[str, ...] = FIELDS) -> None:
    """One line per row, columns ``fields`` (default :data:`FIELDS`)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})


def write_json(payload: dict[str, Any], path: Path) -> None:
    """``payload`` as JSON (non-finite floats as ``null``)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(payload), indent=1), encoding="utf-8")
