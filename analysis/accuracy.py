"""Section 3 of the report: predicting downstream accuracy from val loss and geometry.

:func:`predictor_table` builds the per-run table the paper's Figure 5 is fitted on
(one row per run: its scale, its method, the mean downstream accuracy and the
features at its last analysed checkpoint) from the analysis rows, and
:func:`fit` runs :func:`analysis.predictor.fit_predictors` on it. A run's scale is its
model shape (``d<hidden>-L<layers>``), its method the training method as the study
names it (:func:`analysis.runs.method_label`: ``relora``, ``cola``, ``sltrain``, ``lora``
or the optimizer), so CoLA trained with AdamW is not grouped with full rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.metric_table import by_name
from analysis.predictor import (
    GEOMETRY_FEATURES,
    PAPER_FIGURE5,
    PredictorResult,
    fit_predictors,
    plot_predictions,
)
from analysis.table import lookup

__all__ = ["PredictorSection", "as_json", "fit", "honest_sentence", "predictor_table",
           "scale_label"]

FEATURES = ("val_loss", *GEOMETRY_FEATURES)


def scale_label(architecture: dict[str, int]) -> str:
    """``"d<hidden>-L<layers>"`` of a run's model shape.

    >>> scale_label({"hidden_size": 128, "num_layers": 4})
    'd128-L4'
    """
    return f"d{architecture['hidden_size']}-L{architecture['num_layers']}"


def predictor_table(rows: list[dict[str, Any]], runs: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """One row per run with downstream results: ``run``, ``scale``, ``method``, ``step``,
    ``accuracy`` (``downstream_mean``) and :data:`FEATURES` at the run's last analysed step
    (NaN where a feature is missing)."""
    out = []
    for run in runs:
        name = run["name"]
        steps = sorted({r["step"] for r in rows if r["run"] == name
                        and r["metric"] == "downstream_mean"})
        if not steps:
            continue
        step = steps[-1]
        entry: dict[str, Any] = {"run": name, "scale": scale_label(run["architecture"]),
                                 "method": run.get("method_label") or run["method"],
                                 "step": step,
                                 "accuracy": lookup(rows, name, step, "downstream_mean")}
        for f in FEATURES:
            entry[f] = lookup(rows, name, step, f, by_name(f).layer)
        out.append(entry)
    return out


@dataclass
class PredictorSection:
    """What the report shows of the predictor.

    Attributes:
      table: the per-run table (:func:`predictor_table`).
      results: one :class:`analysis.predictor.PredictorResult` per predictor (empty when
        no run has downstream results).
      note: one line on what the fit can and cannot show here.
      image: the predicted-vs-measured scatter (``None`` without results).
    """

    table: list[dict[str, Any]]
    results: list[PredictorResult] = field(default_factory=list)
    note: str = ""
    image: Path | None = None


def honest_sentence(table: Sequence[dict[str, Any]], results: Sequence[PredictorResult],
                    se: float) -> str:
    """One or two sentences on what the fitted predictors show at this scale."""
    n = len(table)
    scales = len({r["scale"] for r in table})
    methods = len({r["method"] for r in table})
    accs = [r["accuracy"] for r in table if math.isfinite(r["accuracy"])]
    spread = (max(accs) - min(accs)) if accs else math.nan
    need = len(FEATURES) + 2
    head = (f"{n} runs ({scales} scale(s) x {methods} method(s)); the mean downstream "
            f"accuracies span {spread:.3f} with a typical standard error of {se:.3f}.")
    if n < need:
        return (head + f" Fewer runs than the {need} that the 9-feature predictor needs: its "
                "scores are not reported, and no conclusion about Figure 5 can be drawn here.")
    by = {r.predictor.name: r for r in results}
    vl, both = by.get("val loss only"), by.get("val loss + geometry")
    parts = [head]
    if vl and both and vl.loso_pearson.value is not None and both.loso_pearson.value is not None:
        gain = both.loso_pearson.value - vl.loso_pearson.value
        paper_gain = PAPER_FIGURE5["val loss + geometry"][0] - PAPER_FIGURE5["val loss only"][0]
        parts.append(f"Adding the 8 geometry features changes the LOSO Pearson correlation by "
                     f"{gain:+.3f} (paper: {paper_gain:+.3f}).")
    if math.isfinite(spread) and se > 0 and spread < 4 * se:
        parts.append("The accuracies differ by less than about four standard errors, so the "
                     "correlations mostly fit noise: read them as a check of the pipeline, not "
                     "as evidence for or against the paper's claim.")
    else:
        parts.append(f"With {n} runs and 9 features a linear fit has few degrees of freedom; "
                     "small models trained briefly are not the paper's regime, so the numbers "
                     "test the procedure more than the claim.")
    return " ".join(parts)


def fit(rows: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path,
        model: str = "linear", alpha: float = 1.0) -> PredictorSection:
    """Fit the paper's three predictors on the analysed runs and draw the scatter.

    Returns a :class:`PredictorSection` whose ``note`` says why nothing was fitted when no
    run has downstream results.
    """
    table = predictor_table(rows, runs)
    if not table:
        return PredictorSection(table, note="No run has downstream results: run lowrank-eval "
                                            "on the runs to fit the accuracy predictors.")
    results = fit_predictors(table, model=model, alpha=alpha)
    ses = [lookup(rows, r["run"], r["step"], "downstream_mean_se") for r in table]
    ses = [s for s in ses if math.isfinite(s)]
    se = sum(ses) / len(ses) if ses else math.nan
    image = plot_predictions(results, out / "predictor_scatter.png")
    return PredictorSection(table, results, honest_sentence(table, results, se), image)


def as_json(section: PredictorSection) -> dict[str, Any]:
    """The section as plain data (``metrics.json["predictor"]``)."""
    def score(sc: Any) -> dict[str, Any]:
        return {"value": sc.value, "reason": sc.reason}

    return {"table": section.table, "note": section.note,
            "results": [{"predictor": r.predictor.name, "features": list(r.predictor.features),
                         "runs": r.runs, "dropped": r.dropped,
                         "loso_pearson": score(r.loso_pearson),
                         "lomo_pearson": score(r.lomo_pearson),
                         "in_sample_r2": score(r.in_sample_r2)} for r in section.results]}
