"""Statistics over seeds: mean, standard deviation, Student-t interval, Welch and permutation tests.

Pure functions on plain Python/NumPy numbers; :func:`aggregate` turns the
per-run metric rows of :class:`analysis.compute.Results` into one row per
group (method) x step x metric x layer and tests every group against the
baseline group.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

__all__ = ["AGG_FIELDS", "ALPHA", "aggregate", "mark", "permutation_p", "summarize", "welch_p"]

ALPHA = 0.05             # significance level of the marks
CONFIDENCE = 0.95        # level of the Student-t interval
PERMUTATION_EXACT = 5000  # enumerate every split up to this many, else sample that many

AGG_FIELDS = ("group", "method", "step", "metric", "layer", "n", "mean", "std", "ci_low",
              "ci_high", "baseline_mean", "baseline_n", "p_welch", "p_perm", "significant")


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, float]:
    """``{"n", "mean", "std", "ci_low", "ci_high"}`` of ``values`` (shape ``(n,)``).

    ``std`` uses ``ddof=1``; the interval is ``mean -+ t_{(1+confidence)/2, n-1} std / sqrt(n)``.
    With ``n = 1`` the standard deviation and the interval are ``nan``. Non-finite
    values are left out (``n`` counts the finite ones).
    """
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "ci_low": math.nan,
                "ci_high": math.nan}
    mean = float(x.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) of ``a`` vs ``b``.

    ``nan`` when either sample has fewer than 2 finite values, or both have zero variance.
    """
    x = np.asarray([v for v in a if math.isfinite(v)], np.float64)
    y = np.asarray([v for v in b if math.isfinite(v)], np.float64)
    if x.size < 2 or y.size < 2 or (np.ptp(x) == 0 and np.ptp(y) == 0):
        return math.nan
    with warnings.catch_warnings():     # nearly equal values: scipy warns, the p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(x, y, equal_var=False).pvalue)


def permutation_p(a: Sequence[float], b: Sequence[float], seed: int = 0) -> float:
    """Two-sided permutation p-value of the difference of means of ``a`` and ``b``.

    Every split of the pooled values into groups of the original sizes is
    enumerated when there are at most :data:`PERMUTATION_EXACT` of them (else that
    many random splits); ``p`` is the fraction of splits whose ``|mean difference|``
    reaches the observed one (the observed split included), so with 3 + 3 values
    it can never be below ``2 / 20 = 0.1``. ``nan`` when a sample is empty.
    """
    x = np.asarray([v for v in a if math.isfinite(v)], np.float64)
    y = np.asarray([v for v in b if math.isfinite(v)], np.float64)
    if x.size == 0 or y.size == 0:
        return math.nan
    pooled = np.concatenate([x, y])
    n, k = pooled.size, x.size
    observed = abs(x.mean() - y.mean())
    total = math.comb(n, k)
    if total <= PERMUTATION_EXACT:
        splits = [np.asarray(c) for c in itertools.combinations(range(n), k)]
    else:
        rng = np.random.default_rng(seed)
        splits = [rng.permutation(n)[:k] for _ in range(PERMUTATION_EXACT)]
    total_sum = pooled.sum()
    diffs = []
    for idx in splits:
        s = pooled[idx].sum()
        diffs.append(abs(s / k - (total_sum - s) / (n - k)))
    tol = 1e-12 * max(1.0, observed)
    return float(np.mean(np.asarray(diffs) >= observed - tol))


def mark(p: float, alpha: float = ALPHA) -> str:
    """``"*"`` when ``p < alpha``, else ``""`` (also for ``nan``)."""
    return "*" if math.isfinite(p) and p < alpha else ""


def aggregate(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group x step x metric x layer: seed statistics and tests against the baseline.

    Args:
      rows: per-run metric rows (``run, method, step, metric, layer, value``).
      runs: ``Results.runs`` entries (``name``, ``group``, ``method``, ``baseline``).

    Returns:
      rows with the fields :data:`AGG_FIELDS`. ``p_welch``/``p_perm`` compare the
      group's per-seed values with the baseline group's at the same step, metric
      and layer (``nan`` for the baseline itself and where the baseline has no
      such row); ``significant`` is ``"*"`` when ``p_welch < 0.05``. ``imbh_pair``
      rows (one value per pair of runs) are not aggregated.
    """
    group_of = {r["name"]: r.get("group", r["name"]) for r in runs}
    method_of = {r.get("group", r["name"]): r["method"] for r in runs}
    base_groups = {r.get("group", r["name"]) for r in runs if r.get("baseline")}
    order = list(dict.fromkeys(r.get("group", r["name"]) for r in runs))
    values: dict[tuple[str, int, str, str], list[float]] = {}
    for r in rows:
        if r["metric"] == "imbh_pair" or r["run"] not in group_of:
            continue
        key = (group_of[r["run"]], int(r["step"]), r["metric"], r["layer"])
        values.setdefault(key, []).append(float(r["value"]))
    base = next(iter(base_groups), None)
    out = []
    for key in sorted(values, key=lambda k: (order.index(k[0]), k[1], k[2], k[3])):
        group, step, metric, layer = key
        ref = values.get((base, step, metric, layer)) if base and group != base else None
        p_w = welch_p(values[key], ref) if ref else math.nan
        p_p = permutation_p(values[key], ref) if ref else math.nan
        ref_sum = summarize(ref) if ref else {"mean": math.nan, "n": 0}
        out.append({"group": group, "method": method_of[group], "step": step, "metric": metric,
                    "layer": layer, **summarize(values[key]),
                    "baseline_mean": ref_sum["mean"], "baseline_n": ref_sum["n"],
                    "p_welch": p_w, "p_perm": p_p, "significant": mark(p_w)})
    return out
