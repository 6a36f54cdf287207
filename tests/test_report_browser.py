"""The report opens in a real browser (headless Chromium): every figure decodes, no console
error. Built from a synthetic analysis (three runs, two checkpoints, every section), so no
training is needed; ``tests/test_study.py`` opens a report of real runs the same way."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from browser_support import open_in_browser

from analysis import accuracy, plots
from analysis.compute import Results
from analysis.findings import findings
from analysis.report import write_report
from analysis.stats import aggregate

STEPS = (2, 4)
RUNS = (("adamw", "adamw", "dense"), ("galore", "galore_adamw", "dense"),
        ("cola", "adamw", "cola"))
LAYERS = ("embed", "block_0", "final_norm")
TASKS = ("heldout_cloze", "heldout_word_order")


def _row(run: str, method: str, step: int, metric: str, layer: str, value: float) -> dict:
    return {"run": run, "method": method, "step": step, "metric": metric, "layer": layer,
            "value": float(value)}


def synthetic_results() -> Results:
    """Rows and curves of every unit for three runs (AdamW the baseline)."""
    rng = np.random.default_rng(0)
    res = Results(baseline="adamw")
    for i, (name, method, linear) in enumerate(RUNS):
        res.runs.append({"name": name, "method": method, "linear": linear,
                         "method_label": "cola" if linear == "cola" else method,
                         "path": f"/runs/{name}", "steps": list(STEPS), "baseline": i == 0,
                         "architecture": {"vocab_size": 256, "hidden_size": 64,
                                          "intermediate_size": 172, "num_heads": 4,
                                          "num_layers": 1},
                         "group": name, "seed": None, "compared_with": None if i == 0
                         else "adamw"})
        for step in STEPS:
            def add(metric: str, value: float, layer: str = "all", name: str = name,
                    method: str = method, step: int = step) -> None:
                res.rows.append(_row(name, method, step, metric, layer, value))

            add("val_loss", 3.0 - 0.1 * step - 0.05 * i)
            add("sharpness", 1e-3 * (3 - i))
            add("sharpness_se", 1e-4)
            add("direction_variance", 1e-6 * (1 + i))
            add("param_norm", 40.0 + i)
            for s in ("effective_rank", "stable_rank", "spectral_gap", "count_above",
                      "top_singular", "rank", "rank_ratio", "effective_rank_ratio",
                      "singular_value_ratio", "count_above_ratio"):
                add(f"w_{s}", rng.uniform(1, 10), "mean")
                if step > STEPS[0]:
                    add(f"dw_{s}", rng.uniform(1, 10), "mean")
            for k in range(1, 6):
                add("pca_component_sharpness", 1e-3 / k * (1 + i), f"k{k}")
            for top in (1, 5):
                add("pca_sharpness", 1e-3 * (1 + i) / top, f"top{top}")
                add("pca_variance", 0.0 if top == 1 else 1e-7 * (1 + i), f"top{top}")
            if step > STEPS[0]:
                add("ccbh", -0.01)
                add("dw_total_ratio", 0.1)
                add("dw_total_norm", 1.0)
                add("dw_norm", 0.1, "mean")
                add("dw_ratio", 0.1, "mean")
                res.curves.setdefault("ccbh", {}).setdefault(name, {})[str(step)] = [
                    2.9, 2.85, 2.8]
            if i > 0:
                if linear != "cola":
                    add("imbh", 0.02)
                for layer in LAYERS:
                    for metric in ("act_cka", "act_cka_debiased", "act_cosine", "act_l2",
                                   "act_rel_l2", "act_mean_norm", "act_base_mean_norm"):
                        add(metric, rng.uniform(0.3, 1.0), layer)
                add("act_cka", 0.8, "mean")
                add("act_rel_l2", 0.3, "mean")
            if method.startswith("galore"):
                add("proj_overlap_prev", 0.7, "mean")
                add("telemetry_overlap", 0.8, "mean")
            for t, task in enumerate(TASKS):
                add("downstream", 0.3 + 0.05 * i + 0.1 * t, task)
                add("downstream_se", 0.02, task)
                add("downstream_chance", 0.25 + 0.25 * t, task)
            add("downstream_mean", 0.35 + 0.05 * i)
            add("downstream_mean_se", 0.014)
            alphas = np.linspace(-0.003, 0.003, 5)
            res.curves.setdefault("landscape", {}).setdefault(name, {})[str(step)] = {
                "alphas": alphas.tolist(), "mean": (3 + alphas ** 2).tolist(),
                "centered": (alphas ** 2).tolist(), "centered_std": (0.1 * alphas ** 2).tolist()}
            pca = np.linspace(-0.048, 0.048, 25)
            res.curves.setdefault("topk", {}).setdefault(name, {})[str(step)] = {
                "alphas": pca.tolist(), "centre": 12, "ks": [1, 2, 3, 4, 5],
                "centered": [(pca ** 2 / k).tolist() for k in range(1, 6)]}
    return res


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[Path], accuracy.PredictorSection]:
    out = tmp_path_factory.mktemp("report")
    res = synthetic_results()
    agg = aggregate(res.rows, res.runs)
    section = accuracy.fit(res.rows, res.runs, out)
    found = findings(res, agg, section.results)
    images = plots.all_plots(res, out)
    path = write_report(res, found, images, {"topk": 5}, out / "report.html", 1.0, agg, section)
    return path, images, section


def test_every_figure_is_written_and_embedded(report):
    path, images, section = report
    names = {p.stem for p in images}
    assert {"landscape_profiles", "topk_profiles", "topk_over_steps", "topk_components",
            "rank_table", "downstream_over_steps", "spectra_over_steps"} <= names
    html = path.read_text()
    assert html.count("<img ") == len(images) + 1               # + the predictor scatter
    assert "Downstream accuracy" in html and "Figure 5" in html
    # three runs, nine features: the predictor says so in one line and the report goes on
    assert section.note.count("Fewer runs than the 11") == 1
    assert "n/a (3 runs for 9 feature(s)" in html


def test_report_opens_in_chromium_with_every_figure_and_no_console_error(report):
    path, images, _ = report
    probe = open_in_browser(path)
    assert probe["title"] == "lowrank-analyze report"
    assert probe["images"] == len(images) + 1
    assert probe["bad"] == [] and probe["errors"] == [] and probe["console"] == []


@pytest.mark.slow
def test_browser_check_catches_a_broken_figure(report, tmp_path):
    path, _, _ = report
    broken = tmp_path / "broken.html"
    broken.write_text(path.read_text().replace(
        "</body>", "<img alt='broken' src='data:image/png;base64,AAAA'>"
                   "<script>console.error('boom')</script></body>"))
    probe = open_in_browser(broken)
    assert probe["bad"] == ["broken"]
    assert any("boom" in e for e in probe["errors"]) and probe["console"]


def test_findings_state_the_papers_claims(report):
    path, _, _ = report
    html = path.read_text()
    for claim in ("along random directions", "top-1 PCA", "Validation perplexity",
                  "Adding geometric"):
        assert claim in html
    # galore: random 2e-3 < full rank 3e-3, top-1 PCA 2e-3 > 1e-3: agrees; CoLA likewise
    assert "full rank sharper, +7.1 s.e." in html and math.isfinite(1.0)
