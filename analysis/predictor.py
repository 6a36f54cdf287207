"""Predicting downstream accuracy from validation loss and geometry ("Beyond Perplexity", Fig. 5).

The paper fits three linear predictors of a run's mean zero-shot accuracy from
measurements of its final checkpoint and reports, for each, the Pearson
correlation between predicted and measured accuracy under leave-one-scale-out
(LOSO) and leave-one-method-out (LOMO) cross-validation and the in-sample R^2:

=============================  ===========  ===========  ============
predictor                      LOSO Pearson LOMO Pearson in-sample R^2
=============================  ===========  ===========  ============
val loss only                  0.873        0.864        0.841
geometry only (8 features)     0.498        0.431        0.558
val loss + geometry (9)        0.913        0.895        0.907
=============================  ===========  ===========  ============

The authors' repository does not contain the predictor (only these numbers), so
the procedure here is ours, stated exactly:

* model: ``StandardScaler`` then ``LinearRegression`` (ordinary least squares with
  an intercept), or ``Ridge(alpha)`` with ``model="ridge"`` (scikit-learn);
* LOSO / LOMO: ``LeaveOneGroupOut`` over the runs' scale / method labels; each run's
  accuracy is predicted by the model fitted on the other groups, and the Pearson
  correlation is taken once over all runs' out-of-fold predictions (pooled; a
  held-out group of one method has only as many runs as there are scales, too few
  for a per-fold correlation);
* in-sample R^2: ``r2_score`` of the model fitted on every run.

A number is printed only where it means something; otherwise the report says why
(:attr:`Score.reason`): a linear fit with ``p`` features needs at least ``p + 2``
runs (``p + 1`` points are fitted exactly, so R^2 = 1 by construction), also in
every training fold; cross-validation needs two groups; a correlation needs three
predictions that are not all equal. Runs with a missing value of a predictor's
features or of the accuracy are left out of that predictor, and named.

Geometry features (:data:`GEOMETRY_FEATURES`, 8 as the paper's), the names of
``lowrank-analyze``'s metrics at the final checkpoint (spectra: mean over the
attention/MLP matrices):

* ``sharpness`` -- expected sharpness along random directions (curvature: the
  paper's central flatness measure);
* ``direction_variance`` -- spread of the random-direction loss curves (how
  anisotropic the basin is);
* ``w_effective_rank``, ``w_stable_rank``, ``w_spectral_gap``, ``w_top_singular`` --
  how spread, how concentrated, how dominated by one direction and how large the
  weight spectra are (what low-rank training changes directly);
* ``dw_effective_rank`` -- the dimensionality of the last update ``dW`` (low-rank
  updates are the methods' defining property);
* ``ccbh`` -- the loss barrier between the last two checkpoints (whether training
  still crosses barriers at the end).

Each is defined for every method, full rank and CoLA included, and needs no
second run. Left out: activation similarity to the full-rank run (degenerate for
the full-rank run itself), IMBH (undefined for CoLA, which has no dense weights),
projector overlaps (undefined for methods without projectors) and the singular-
value counts (an integer that depends on a fixed threshold and on the width).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GEOMETRY_FEATURES",
    "PAPER_FIGURE5",
    "PREDICTORS",
    "Predictor",
    "PredictorResult",
    "Score",
    "fit_predictors",
    "format_table",
    "plot_predictions",
]

GEOMETRY_FEATURES = ("sharpness", "direction_variance", "w_effective_rank", "w_stable_rank",
                     "w_spectral_gap", "w_top_singular", "dw_effective_rank", "ccbh")


@dataclass(frozen=True)
class Predictor:
    """A named feature set."""

    name: str
    features: tuple[str, ...]


PREDICTORS = (
    Predictor("val loss only", ("val_loss",)),
    Predictor("geometry only", GEOMETRY_FEATURES),
    Predictor("val loss + geometry", ("val_loss", *GEOMETRY_FEATURES)),
)

#: The paper's Figure 5: (LOSO Pearson, LOMO Pearson, in-sample R^2) per predictor.
PAPER_FIGURE5 = {"val loss only": (0.873, 0.864, 0.841),
                 "geometry only": (0.498, 0.431, 0.558),
                 "val loss + geometry": (0.913, 0.895, 0.907)}


@dataclass(frozen=True)
class Score:
    """A number, or the reason there is none.

    Attributes:
      value: the statistic (``None`` when it cannot be computed meaningfully).
      reason: why ``value`` is ``None`` (empty otherwise).
    """

    value: float | None
    reason: str = ""

    def text(self, digits: int = 3) -> str:
        """``"0.873"`` or ``"n/a (reason)"``."""
        return f"{self.value:.{digits}f}" if self.value is not None else f"n/a ({self.reason})"


@dataclass
class PredictorResult:
    """One predictor's fit and cross-validation.

    Attributes:
      predictor: its name and features.
      runs: the runs used (names), in table order.
      dropped: runs left out for a missing value.
      measured: their accuracies ``(n,)``.
      in_sample: predictions of the model fitted on every run ``(n,)`` (or ``None``).
      loso / lomo: out-of-fold predictions ``(n,)`` (or ``None``).
      loso_pearson / lomo_pearson / in_sample_r2: the three scores.
    """

    predictor: Predictor
    runs: list[str]
    dropped: list[str]
    measured: np.ndarray
    in_sample: np.ndarray | None
    loso: np.ndarray | None
    lomo: np.ndarray | None
    loso_pearson: Score
    lomo_pearson: Score
    in_sample_r2: Score
    notes: list[str] = field(default_factory=list)


def _model(kind: str, alpha: float) -> Any:
    from sklearn.linear_model import LinearRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "linear":
        return make_pipeline(StandardScaler(), LinearRegression())
    if kind == "ridge":
        return make_pipeline(StandardScaler(), Ridge(alpha=alpha))
    raise ValueError(f"model must be 'linear' or 'ridge', got {kind!r}")


def _pearson(pred: np.ndarray, y: np.ndarray) -> Score:
    from scipy.stats import pearsonr

    if y.size < 3:
        return Score(None, f"{y.size} predictions; a correlation needs at least 3")
    if np.ptp(pred) == 0 or np.ptp(y) == 0:
        return Score(None, "predicted or measured accuracies are all equal")
    return Score(float(pearsonr(pred, y).statistic))


def _cross_validate(x: np.ndarray, y: np.ndarray, groups: Sequence[str], label: str,
                    kind: str, alpha: float, min_train: int
                    ) -> tuple[np.ndarray | None, Score]:
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict

    names = sorted(set(groups))
    if len(names) < 2:
        return None, Score(None, f"one {label} only; leave-one-{label}-out needs two")
    smallest = min(sum(g != name for g in groups) for name in names)
    if smallest < min_train:
        return None, Score(None, f"a fold trains on {smallest} runs, fewer than the "
                                 f"{min_train} that {x.shape[1]} feature(s) need")
    pred = cross_val_predict(_model(kind, alpha), x, y, groups=np.asarray(groups),
                             cv=LeaveOneGroupOut())
    return pred, _pearson(pred, y)


def _fit_one(pred_spec: Predictor, rows: Sequence[Mapping[str, Any]], target: str,
             run_key: str, scale_key: str, method_key: str, kind: str, alpha: float
             ) -> PredictorResult:
    from sklearn.metrics import r2_score

    used, dropped = [], []
    for i, r in enumerate(rows):
        name = str(r.get(run_key, i))
        values = [r.get(f) for f in (*pred_spec.features, target)]
        ok = all(v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
                 for v in values)
        (used if ok else dropped).append((name, r))
    x = np.asarray([[float(r[f]) for f in pred_spec.features] for _, r in used],
                   np.float64).reshape(len(used), len(pred_spec.features))
    y = np.asarray([float(r[target]) for _, r in used], np.float64)
    p = len(pred_spec.features)
    min_train = p + 2
    if len(used) < min_train:
        why = (f"{len(used)} runs for {p} feature(s); a linear fit needs at least {min_train} "
               "(fewer are fitted exactly)")
        none = Score(None, why)
        return PredictorResult(pred_spec, [n for n, _ in used], [n for n, _ in dropped], y,
                               None, None, None, none, none, none)
    model = _model(kind, alpha).fit(x, y)
    fitted = model.predict(x)
    r2 = Score(float(r2_score(y, fitted))) if np.ptp(y) > 0 else \
        Score(None, "the measured accuracies are all equal")
    scales = [str(r[scale_key]) for _, r in used]
    methods = [str(r[method_key]) for _, r in used]
    loso, loso_r = _cross_validate(x, y, scales, "scale", kind, alpha, min_train)
    lomo, lomo_r = _cross_validate(x, y, methods, "method", kind, alpha, min_train)
    return PredictorResult(pred_spec, [n for n, _ in used], [n for n, _ in dropped], y, fitted,
                           loso, lomo, loso_r, lomo_r, r2)


def fit_predictors(rows: Sequence[Mapping[str, Any]], target: str = "accuracy",
                   predictors: Sequence[Predictor] = PREDICTORS, model: str = "linear",
                   alpha: float = 1.0, run_key: str = "run", scale_key: str = "scale",
                   method_key: str = "method") -> list[PredictorResult]:
    """Fit every predictor on a per-run table and cross-validate it by scale and by method.

    Args:
      rows: one mapping per run with ``run_key``, ``scale_key``, ``method_key``, the
        ``target`` accuracy and the features (missing/NaN values leave the run out of
        the predictors that need them).
      target: the column to predict (the mean downstream accuracy).
      predictors: the feature sets (default :data:`PREDICTORS`, the paper's three).
      model: ``"linear"`` (default) or ``"ridge"`` (``alpha``).
      alpha: ridge penalty on the standardised features.

    Returns:
      One :class:`PredictorResult` per predictor, in order.

    >>> rows = [{"run": f"r{i}", "scale": "s" if i < 3 else "l", "method": f"m{i % 3}",
    ...          "val_loss": 3.0 - 0.1 * i, "accuracy": 0.3 + 0.02 * i} for i in range(6)]
    >>> res = fit_predictors(rows, predictors=PREDICTORS[:1])[0]
    >>> res.in_sample_r2.text(), res.loso_pearson.text(), res.lomo_pearson.text()
    ('1.000', '1.000', '1.000')
    """
    if model not in ("linear", "ridge"):
        raise ValueError(f"model must be 'linear' or 'ridge', got {model!r}")
    return [_fit_one(p, rows, target, run_key, scale_key, method_key, model, alpha)
            for p in predictors]


def format_table(results: Sequence[PredictorResult], paper: bool = True) -> str:
    """The Figure-5 table as Markdown (the paper's numbers next to ours when ``paper``)."""
    head = "| predictor | features | runs | LOSO Pearson | LOMO Pearson | in-sample R^2 |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.predictor.name} | {len(r.predictor.features)} | {len(r.runs)} | "
                     f"{r.loso_pearson.text()} | {r.lomo_pearson.text()} | "
                     f"{r.in_sample_r2.text()} |")
        if paper and r.predictor.name in PAPER_FIGURE5:
            a, b, c = PAPER_FIGURE5[r.predictor.name]
            lines.append(f"| (paper) {r.predictor.name} | | | {a:.3f} | {b:.3f} | {c:.3f} |")
    dropped = sorted({d for r in results for d in r.dropped})
    if dropped:
        lines.append("")
        lines.append(f"Left out for a missing value: {', '.join(dropped)}.")
    return "\n".join(lines)


def plot_predictions(results: Sequence[PredictorResult], path: str | Path,
                     title: str = "Predicted vs measured downstream accuracy") -> Path:
    """One panel per predictor: measured accuracy against the LOSO out-of-fold and the
    in-sample predictions, with the identity line; saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.0),
                             squeeze=False)
    for ax, r in zip(axes[0], results):
        y = r.measured
        shown = []
        for pred, label, marker in ((r.loso, f"LOSO (r = {r.loso_pearson.text(2)})", "o"),
                                    (r.in_sample, f"in-sample (R² = {r.in_sample_r2.text(2)})",
                                     "x")):
            if pred is not None:
                ax.scatter(y, pred, marker=marker, label=label, alpha=0.8)
                shown.append(pred)
        if shown:
            lo = float(min(y.min(), *(p.min() for p in shown)))
            hi = float(max(y.max(), *(p.max() for p in shown)))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
            ax.legend(fontsize=8, loc="upper left")
        else:
            ax.text(0.5, 0.5, textwrap.fill(r.in_sample_r2.reason or "no prediction", 36),
                    ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_title(f"{r.predictor.name} ({len(r.predictor.features)} features)", fontsize=10)
        ax.set_xlabel("measured accuracy")
        ax.set_ylabel("predicted accuracy")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
