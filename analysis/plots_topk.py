"""Figures of the top-k PCA landscapes (:mod:`analysis.units.topk`), the rank table and
downstream accuracy; each function returns its PNG or ``None`` when it has nothing to draw.

A seed group is drawn as the mean over its seeds (error bars: +-1 std over seeds), as in
:mod:`analysis.plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from analysis.metric_table import for_plot
from analysis.plots import _label, _line, _save
from analysis.table import group_series, groups, layers_of

__all__ = ["FIGURES", "downstream_over_steps", "rank_table", "topk_components",
           "topk_over_steps", "topk_profiles"]

_MAX_STEPS = 3


def topk_profiles(res: Any, out: Path) -> Path | None:
    """Centred loss along each top-k direction, ``L(theta + a d_k) - L(theta)``: one row per
    run (the lowest seed of a group), one column per checkpoint (the last three), one line
    per component ``k`` (dark: k = 1)."""
    curves = res.curves.get("topk", {})
    gs = [g for g in groups(res.runs) if curves.get(g["members"][0])]
    if not gs:
        return None
    steps = sorted({int(t) for g in gs for t in curves[g["members"][0]]})[-_MAX_STEPS:]
    fig, axes = plt.subplots(len(gs), len(steps), figsize=(3.6 * len(steps), 2.5 * len(gs)),
                             squeeze=False, sharex=True)
    cmap = plt.get_cmap("viridis")
    for i, group in enumerate(gs):
        by_step = curves[group["members"][0]]
        for j, step in enumerate(steps):
            ax = axes[i][j]
            c = by_step.get(str(step))
            if c is None:
                ax.set_axis_off()
                continue
            ks, a = c["ks"], np.asarray(c["alphas"])
            for k, y in zip(ks, c["centered"]):
                ax.plot(a, y, color=cmap((k - 1) / max(len(ks) - 1, 1)),
                        lw=2.0 if k == 1 else 0.8, label=f"k={k}" if k in (1, ks[-1]) else None)
            ax.set_title(f"{group['members'][0]} @ {step}", fontsize=8)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("L(theta + a d_k) - L(theta)", fontsize=7)
        if axes[i][0].get_legend_handles_labels()[0]:
            axes[i][0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("alpha")
    fig.suptitle("Loss along the top-k rank-1 SVD directions sigma_k u_k v_k^T of every matrix "
                 "(one line per k)", fontsize=10)
    return _save(fig, out / "topk_profiles.png")


def _topk_layers(res: Any, metric: str) -> list[str]:
    return sorted(layers_of(res.rows, metric), key=lambda s: int(s.removeprefix("top")))


def topk_over_steps(res: Any, out: Path) -> Path | None:
    """Expected sharpness (top row) and direction variance (bottom row) of components 1..K
    against the step, one column per K."""
    tops = _topk_layers(res, "pca_sharpness")
    if not tops:
        return None
    fig, axes = plt.subplots(2, len(tops), figsize=(3.6 * len(tops), 6.0), squeeze=False)
    for j, top in enumerate(tops):
        for i, (metric, title) in enumerate((("pca_sharpness", "sharpness"),
                                             ("pca_variance", "direction variance"))):
            ax = axes[i][j]
            for group in groups(res.runs):
                _line(ax, group, res.rows, metric, top)
            ax.set_title(f"{title}, components 1..{top.removeprefix('top')}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Top-k PCA landscapes: expected sharpness of the mean curve over components "
                 "1..K and the mean across-component variance", fontsize=10)
    return _save(fig, out / "topk_over_steps.png")


def topk_components(res: Any, out: Path) -> Path | None:
    """Expected sharpness along each component ``k`` at each group's last step."""
    if not any(r["metric"] == "pca_component_sharpness" for r in res.rows):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for group in groups(res.runs):
        ks = sorted({int(r["layer"][1:]) for r in res.rows
                     if r["metric"] == "pca_component_sharpness"
                     and r["run"] in group["members"]})
        if not ks:
            continue
        last = max(group_series(res.rows, group["members"], "pca_component_sharpness",
                                f"k{ks[0]}")[0])
        means = []
        for k in ks:
            t, m, _ = group_series(res.rows, group["members"], "pca_component_sharpness", f"k{k}")
            means.append(m[t.index(last)] if last in t else np.nan)
        ax.plot(ks, means, marker="o", label=f"{_label(group)} @ {last}")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("component k")
    ax.set_ylabel("expected sharpness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("Sharpness along the k-th rank-1 SVD direction (last checkpoint)", fontsize=10)
    return _save(fig, out / "topk_components.png")


def rank_table(res: Any, out: Path) -> Path | None:
    """The reference's rank table of W and dW and the update norms against the step."""
    metrics = [m for m in for_plot("rank_table")
               if any(r["metric"] == m.name and r["layer"] == m.layer for r in res.rows)]
    if not metrics:
        return None
    cols = 5
    rows_n = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.3 * cols, 2.9 * rows_n), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for group in groups(res.runs):
            _line(ax, group, res.rows, m.name, m.layer)
        ax.set_title(m.label, fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_axis_off()
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Rank table of W and dW (mean over attention/MLP matrices) and update norms",
                 fontsize=10)
    return _save(fig, out / "rank_table.png")


def downstream_over_steps(res: Any, out: Path) -> Path | None:
    """Downstream accuracy per task and its mean against the step (error bars: the bootstrap
    standard error of a single run, or +-1 std over seeds), chance as a dashed line."""
    tasks = layers_of(res.rows, "downstream")
    if not tasks:
        return None
    panels = [("downstream_mean", "all", "mean over tasks")] + \
        [("downstream", t, t) for t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.4), squeeze=False)
    for ax, (metric, layer, title) in zip(axes[0], panels):
        for group in groups(res.runs):
            if len(group["members"]) > 1:
                _line(ax, group, res.rows, metric, layer)
                continue
            t, m, _ = group_series(res.rows, group["members"], metric, layer)
            se_metric = "downstream_mean_se" if metric == "downstream_mean" else "downstream_se"
            ts, se, _ = group_series(res.rows, group["members"], se_metric, layer)
            if t:
                ax.errorbar(t, m, yerr=se if ts == t else None, marker="o", capsize=3,
                            label=_label(group))
        if metric == "downstream":
            chance = [r["value"] for r in res.rows
                      if r["metric"] == "downstream_chance" and r["layer"] == layer]
            if chance:
                ax.axhline(chance[0], color="grey", ls="--", lw=1, label="chance")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=6)
    return _save(fig, out / "downstream_over_steps.png")


FIGURES = (topk_profiles, topk_over_steps, topk_components, rank_table, downstream_over_steps)
