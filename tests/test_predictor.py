"""analysis.predictor on synthetic tables with known answers, folds against a NumPy re-statement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.predictor import (
    GEOMETRY_FEATURES,
    PREDICTORS,
    Predictor,
    fit_predictors,
    format_table,
    plot_predictions,
)

SCALES = ("20m", "35m", "60m")
METHODS = ("adamw", "galore", "fira", "sara", "cola", "sltrain", "relora")


def _table(seed: int = 0, exact: str | None = None, noise: float = 0.02) -> list[dict]:
    """7 methods x 3 scales; ``exact`` names a feature the accuracy is a linear function of."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, scale in enumerate(SCALES):
        for j, method in enumerate(METHODS):
            row = {"run": f"{method}-{scale}", "scale": scale, "method": method,
                   "val_loss": 3.5 - 0.3 * i + 0.05 * j + 0.02 * rng.normal()}
            for f in GEOMETRY_FEATURES:
                row[f] = float(rng.normal())
            if exact is None:
                row["accuracy"] = 0.9 - 0.15 * row["val_loss"] + noise * rng.normal()
            else:
                row["accuracy"] = 0.4 + 0.03 * row[exact]
            rows.append(row)
    return rows


def test_exact_linear_relations_give_perfect_scores():
    by_name = {r.predictor.name: r for r in fit_predictors(_table(exact="val_loss"))}
    vl = by_name["val loss only"]
    assert vl.in_sample_r2.value == pytest.approx(1.0, abs=1e-12)
    assert vl.loso_pearson.value == pytest.approx(1.0, abs=1e-12)
    assert vl.lomo_pearson.value == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(vl.loso, vl.measured, atol=1e-12)
    assert by_name["geometry only"].in_sample_r2.value < 0.9       # unrelated features
    geo = {r.predictor.name: r for r in fit_predictors(_table(exact="w_stable_rank"))}
    assert geo["geometry only"].in_sample_r2.value == pytest.approx(1.0, abs=1e-12)
    assert geo["geometry only"].lomo_pearson.value == pytest.approx(1.0, abs=1e-12)
    assert geo["val loss + geometry"].in_sample_r2.value == pytest.approx(1.0, abs=1e-12)
    assert abs(geo["val loss only"].in_sample_r2.value) < 0.5


def _np_ols_predict(x_train, y_train, x_test):
    """Least squares with an intercept column (np.linalg.lstsq)."""
    a = np.c_[np.ones(len(x_train)), x_train]
    coef = np.linalg.lstsq(a, y_train, rcond=None)[0]
    return np.c_[np.ones(len(x_test)), x_test] @ coef


def _np_ridge_predict(x_train, y_train, x_test, alpha):
    """Ridge on features standardised with the training mean and population std,
    unpenalised intercept: beta = (Z'Z + alpha I)^-1 Z'(y - mean y)."""
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (x_train - mu) / sd
    beta = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y_train - y_train.mean()))
    return y_train.mean() + ((x_test - mu) / sd) @ beta


@pytest.mark.parametrize("model,alpha", [("linear", 0.0), ("ridge", 3.0)])
def test_leave_one_group_out_matches_a_numpy_restatement(model, alpha):
    rows = _table(seed=1)
    results = fit_predictors(rows, model=model, alpha=alpha)
    for res in results:
        feats = res.predictor.features
        x = np.asarray([[r[f] for f in feats] for r in rows])
        y = np.asarray([r["accuracy"] for r in rows])
        fit = (_np_ols_predict if model == "linear"
               else lambda a, b, c: _np_ridge_predict(a, b, c, alpha))
        for key, preds, score in (("scale", res.loso, res.loso_pearson),
                                  ("method", res.lomo, res.lomo_pearson)):
            labels = np.asarray([r[key] for r in rows])
            want = np.empty(len(rows))
            for g in np.unique(labels):
                held = labels == g
                want[held] = fit(x[~held], y[~held], x[held])
            np.testing.assert_allclose(preds, want, rtol=1e-7, atol=1e-9)
            assert score.value == pytest.approx(np.corrcoef(want, y)[0, 1], abs=1e-9)
        inside = fit(x, y, x)
        np.testing.assert_allclose(res.in_sample, inside, rtol=1e-7, atol=1e-9)
        r2 = 1 - np.sum((y - inside) ** 2) / np.sum((y - y.mean()) ** 2)
        assert res.in_sample_r2.value == pytest.approx(r2, abs=1e-9)


def test_too_few_runs_are_reported_not_scored():
    rows = _table()[:9]                              # 7 runs of scale 20m, 2 of 35m
    res = {r.predictor.name: r for r in fit_predictors(rows)}
    both = res["val loss + geometry"]                # 9 features need 11 runs
    for score in (both.in_sample_r2, both.loso_pearson, both.lomo_pearson):
        assert score.value is None and "9 runs for 9 feature(s)" in score.reason
    assert both.in_sample is None and "n/a (9 runs for 9 feature(s)" in format_table([both])
    # enough runs in total, but the scale folds train on too few
    geo = res["geometry only"]                       # 8 features: 10 runs needed
    assert geo.in_sample_r2.value is None
    vl = res["val loss only"]
    assert vl.in_sample_r2.value is not None
    assert vl.loso_pearson.value is None             # holding out 20m leaves 2, need 3
    assert "a fold trains on 2 runs, fewer than the 3" in vl.loso_pearson.reason
    assert vl.lomo_pearson.value is not None         # method folds train on 7 or 8
    one_scale = fit_predictors([r for r in _table() if r["scale"] == "20m"],
                               predictors=PREDICTORS[:1])[0]
    assert one_scale.loso_pearson.value is None
    assert "one scale only" in one_scale.loso_pearson.reason
    assert one_scale.lomo_pearson.value is not None
    small_fold = fit_predictors(_table()[:12], predictors=[Predictor("g", GEOMETRY_FEATURES)])
    assert small_fold[0].in_sample_r2.value is not None          # 12 >= 10
    assert "a fold trains on 5 runs" in small_fold[0].loso_pearson.reason


def test_missing_values_leave_runs_out_and_are_named():
    rows = _table(seed=2)
    rows[0]["ccbh"] = float("nan")
    rows[1]["accuracy"] = None
    del rows[2]["sharpness"]
    res = {r.predictor.name: r for r in fit_predictors(rows)}
    assert res["val loss only"].dropped == [rows[1]["run"]]
    assert sorted(res["geometry only"].dropped) == sorted(r["run"] for r in rows[:3])
    assert len(res["geometry only"].runs) == 18
    assert "Left out for a missing value" in format_table(list(res.values()))


def test_constant_accuracy_is_not_a_correlation():
    rows = _table(exact="val_loss")
    for r in rows:
        r["accuracy"] = 0.5
    res = fit_predictors(rows, predictors=PREDICTORS[:1])[0]
    assert res.in_sample_r2.value is None and res.loso_pearson.value is None
    assert "all equal" in res.loso_pearson.reason
    with pytest.raises(ValueError, match="model must be"):
        fit_predictors(rows, model="lasso")


def test_table_and_scatter(tmp_path):
    results = fit_predictors(_table(seed=3))
    text = format_table(results)
    assert text.count("\n| (paper)") == 3 and "0.913" in text
    assert not math.isnan(results[0].loso_pearson.value)
    path = plot_predictions(results, tmp_path / "figs" / "predictor.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    few = fit_predictors(_table()[:5])                # nothing to plot: reasons instead
    assert plot_predictions(few, tmp_path / "few.png").is_file()
