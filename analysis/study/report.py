"""The study's one report: every scale analysed against its own full-rank run, then merged.

Each scale is one :func:`analysis.compute.analyse` call (its methods against its
baseline; the cache is shared). The results are merged with the runs renamed
``<scale>/<method>`` (``<scale>/<method>/seed_<s>`` for seeds), so the report's tables,
statistics and the predictor see every run once. The paper's claims that compare a
method with full rank are checked per scale and combined (:func:`combine`); those over
all runs (perplexity vs downstream, the predictor) on the merged results. Figures are
drawn per scale.
"""

from __future__ import annotations

import html
from dataclasses import asdict
from pathlib import Path
from typing import Any

from analysis.compute import Results
from analysis.study.config import Study

__all__ = ["GLOBAL_CLAIMS", "combine", "merge", "rename", "write_study_report"]

#: findings computed over all runs of the study, not per scale
GLOBAL_CLAIMS = ("Validation perplexity", "Adding geometric")


def _name(scale: str, name: str | None) -> str | None:
    return None if name is None else f"{scale}/{name}"


def rename(res: Results, scale: str) -> Results:
    """``res`` with every run called ``<scale>/<name>`` (rows, curves, runs, baseline)."""
    out = Results(problems=[f"{scale}: {p}" for p in res.problems],
                  baseline=_name(scale, res.baseline),
                  computed_units=res.computed_units, cached_units=res.cached_units)
    out.rows = [{**r, "run": f"{scale}/{r['run']}",
                 "layer": f"{scale}/{r['layer']}" if r["metric"] == "imbh_pair" else r["layer"]}
                for r in res.rows]
    out.curves = {kind: {f"{scale}/{run}": c for run, c in by_run.items()}
                  for kind, by_run in res.curves.items()}
    for r in res.runs:
        out.runs.append({**r, "name": f"{scale}/{r['name']}", "group": _name(scale, r["group"]),
                         "compared_with": _name(scale, r["compared_with"]), "scale": scale})
    return out


def merge(parts: list[Results]) -> Results:
    """One :class:`Results` of several (already renamed) ones."""
    out = Results()
    for res in parts:
        out.rows += res.rows
        out.problems += res.problems
        out.runs += res.runs
        out.computed_units += res.computed_units
        out.cached_units += res.cached_units
        for kind, by_run in res.curves.items():
            out.curves.setdefault(kind, {}).update(by_run)
    out.baseline = ", ".join(r.baseline for r in parts if r.baseline) or None
    return out


def combine(per_scale: dict[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    """One finding per claim from the per-scale findings.

    The verdict: ``not testable`` when no scale can test it, ``reproduced`` / ``not
    reproduced`` when every scale that can agrees, ``partly reproduced`` otherwise; the
    evidence lists each scale's.
    """
    claims: dict[str, list[tuple[str, dict[str, str]]]] = {}
    for scale, found in per_scale.items():
        for f in found:
            claims.setdefault(f["claim"], []).append((scale, f))
    out = []
    for claim, items in claims.items():
        tested = [f["status"] for _, f in items if f["status"] != "not testable"]
        if not tested:
            status = "not testable"
        elif all(s == "reproduced" for s in tested):
            status = "reproduced"
        elif all(s == "not reproduced" for s in tested):
            status = "not reproduced"
        else:
            status = "partly reproduced"
        evidence = " | ".join(f"{scale} [{f['status']}]: {f['evidence']}" for scale, f in items)
        out.append({"claim": claim, "status": status, "evidence": evidence})
    return out


def _intro(study: Study, timings: dict[str, float]) -> str:
    times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
    return (f"<p>Study <b>{html.escape(study.name)}</b> "
            f"({html.escape(str(study.source or ''))}): methods "
            f"{html.escape(', '.join(study.methods))} at scales "
            f"{html.escape(', '.join(study.scales))}, {study.seeds} seed(s) each; full rank: "
            f"{html.escape(study.baseline)} of each scale. Wall time: {html.escape(times)}.</p>")


def write_study_report(study: Study, settings: Any, parts: dict[str, Results],
                       problems: list[str], timings: dict[str, float],
                       predictor_model: str = "linear", ridge_alpha: float = 1.0) -> Path:
    """Analyse-merge-report: ``<out>/analysis/report.html`` (and metrics files); its path."""
    from analysis import accuracy, plots
    from analysis.findings import findings
    from analysis.report import write_report
    from analysis.stats import AGG_FIELDS, aggregate
    from analysis.table import write_csv, write_json

    out = study.out / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    renamed = {scale: rename(res, scale) for scale, res in parts.items()}
    merged = merge(list(renamed.values()))
    merged.problems = list(problems) + merged.problems
    agg = aggregate(merged.rows, merged.runs)
    section = accuracy.fit(merged.rows, merged.runs, out, predictor_model, ridge_alpha)
    per_scale = {}
    for scale, res in renamed.items():
        found = findings(res, aggregate(res.rows, res.runs))
        per_scale[scale] = [f for f in found if not f["claim"].startswith(GLOBAL_CLAIMS)]
    global_found = [f for f in findings(merged, agg, section.results)
                    if f["claim"].startswith(GLOBAL_CLAIMS)]
    found = combine(per_scale)
    found[1:1] = global_found                    # after the random-vs-PCA claim
    groups = {scale: plots.all_plots(res, out / scale) for scale, res in renamed.items()}
    images = [p for g in groups.values() for p in g]
    settings_dict = asdict(settings)
    write_csv(merged.rows, out / "metrics.csv")
    write_csv(agg, out / "metrics_by_method.csv", AGG_FIELDS)
    write_json({"study": study.name, "baseline": merged.baseline, "runs": merged.runs,
                "settings": settings_dict, "problems": merged.problems, "findings": found,
                "rows": merged.rows, "by_method": agg, "curves": merged.curves,
                "predictor": accuracy.as_json(section), "timings_s": timings},
               out / "metrics.json")
    return write_report(merged, found, images, settings_dict, out / "report.html",
                        sum(timings.values()), agg, section, intro=_intro(study, timings),
                        figure_groups={f"Scale {s}": g for s, g in groups.items()})
