"""PNG figures of the study (matplotlib, Agg backend); each function returns its file or ``None``.

Every figure takes the metric rows / curves of :class:`analysis.compute.Results`
and writes one PNG; a figure with nothing to show is not written. A seed group
(``rundir.groups``) is drawn as one line: the mean over its seeds with error
bars of +-1 standard deviation over seeds (``n=<seeds>`` in the legend); a plain
run is drawn as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from analysis.metric_table import for_plot
from analysis.table import group_lookup, group_series, groups, layers_of, series

__all__ = ["all_plots"]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _label(group: dict[str, Any]) -> str:
    n = len(group["members"])
    return f"{group['name']} ({group['method']}{f', n={n}' if n > 1 else ''})"


def _line(ax: Any, group: dict[str, Any], rows: list, metric: str, layer: str = "all",
          marker: str = "o") -> None:
    """The group's mean against the step, with +-1 std error bars over seeds when n > 1."""
    t, m, sd = group_series(rows, group["members"], metric, layer)
    if not t:
        return
    if len(group["members"]) > 1:
        ax.errorbar(t, m, yerr=np.nan_to_num(np.asarray(sd)), marker=marker, capsize=3,
                    label=_label(group))
    else:
        ax.plot(t, m, marker=marker, label=_label(group))


def landscape_profiles(res: Any, out: Path) -> Path | None:
    """Centred mean 1-D profile ``L(theta + a d) - L(theta)`` per run, one panel per step."""
    curves = res.curves.get("landscape", {})
    steps = sorted({int(t) for c in curves.values() for t in c})
    if not steps:
        return None
    steps = steps[-4:]
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 3.4), squeeze=False,
                             sharey=True)
    for ax, step in zip(axes[0], steps):
        for group in groups(res.runs):
            cs = [c for m in group["members"]
                  if (c := curves.get(m, {}).get(str(step))) is not None]
            if not cs:
                continue
            a = np.asarray(cs[0]["alphas"])
            if len(cs) > 1:      # mean over seeds, band: std over seeds
                stack = np.asarray([c["centered"] for c in cs])
                y, sd = stack.mean(0), stack.std(0, ddof=1)
            else:
                y, sd = np.asarray(cs[0]["centered"]), np.asarray(cs[0]["centered_std"])
            line, = ax.plot(a, y, marker=".", label=_label(group))
            ax.fill_between(a, y - sd, y + sd, color=line.get_color(), alpha=0.12)
        ax.set_title(f"step {step}")
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("L(theta + alpha d) - L(theta)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Random 1-D loss landscape (mean over directions; band: +-1 std over "
                 "directions, or over seeds for a seed group)")
    return _save(fig, out / "landscape_profiles.png")


def sharpness_over_steps(res: Any, out: Path) -> Path | None:
    """Expected sharpness (with standard error) and direction variance against the step."""
    if not any(r["metric"] == "sharpness" for r in res.rows):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for group in groups(res.runs):
        if len(group["members"]) > 1:
            for ax, metric in zip(axes, ("sharpness", "direction_variance", "val_loss")):
                _line(ax, group, res.rows, metric)
            continue
        name = group["members"][0]
        t, s = series(res.rows, name, "sharpness")
        _, se = series(res.rows, name, "sharpness_se")
        axes[0].errorbar(t, s, yerr=se if len(se) == len(s) else None, marker="o", capsize=3,
                         label=_label(group))
        axes[1].plot(*series(res.rows, name, "direction_variance"), marker="o")
        axes[2].plot(*series(res.rows, name, "val_loss"), marker="o")
    for ax, title in zip(axes, ("expected sharpness", "direction variance",
                                "loss at the centre (analysis batch)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, out / "sharpness_over_steps.png")


def _heat(ax: Any, mat: np.ndarray, xlabels: list, ylabels: list, title: str,
          cmap: str = "viridis") -> None:
    masked = np.ma.masked_invalid(mat)
    im = ax.imshow(masked, aspect="auto", cmap=cmap)
    ax.set_xticks(range(len(xlabels)), [str(x) for x in xlabels], fontsize=7, rotation=45)
    ax.set_yticks(range(len(ylabels)), [str(y) for y in ylabels], fontsize=7)
    ax.set_title(title, fontsize=9)
    finite = mat[np.isfinite(mat)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for (i, j), v in np.ndenumerate(mat):
        if np.isfinite(v):
            bright = (v - lo) / (hi - lo) > 0.6 if hi > lo else False
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6,
                    color="k" if bright else "w")
    plt.colorbar(im, ax=ax, fraction=0.046)


def barrier_matrices(res: Any, out: Path) -> Path | None:
    """Heat maps run x step of CCBH and IMBH (vs the baseline), and the run x run IMBH matrix."""
    panels = []
    for metric, title in (("ccbh", "CCBH: barrier from the previous checkpoint"),
                          ("imbh", "IMBH: barrier to the baseline at the same step")):
        gs = [g for g in groups(res.runs) if group_series(res.rows, g["members"], metric)[0]]
        names = [g["name"] for g in gs]
        steps = sorted({r["step"] for r in res.rows if r["metric"] == metric})
        if names and steps:
            mat = np.array([[group_lookup(res.rows, g["members"], t, metric) for t in steps]
                            for g in gs])
            seeds = " (mean over seeds)" if any(len(g["members"]) > 1 for g in gs) else ""
            panels.append((mat, steps, names, title + seeds))
    pairs = [r for r in res.rows if r["metric"] == "imbh_pair"]
    if pairs:
        names = [r["name"] for r in res.runs
                 if any(p["run"] == r["name"] or p["layer"] == r["name"] for p in pairs)]
        mat = np.zeros((len(names), len(names)))
        for p in pairs:
            i, j = names.index(p["run"]), names.index(p["layer"])
            mat[i, j] = mat[j, i] = p["value"]
        steps = sorted({p["step"] for p in pairs})
        panels.append((mat, names, names, f"IMBH between runs (step {', '.join(map(str, steps))})"))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.5 * max(
        len(p[2]) for p in panels) + 2.2), squeeze=False)
    for ax, (mat, xs, names, title) in zip(axes[0], panels):
        _heat(ax, mat, xs, names, title, cmap="magma")
        ax.set_xlabel("run" if title.startswith("IMBH between") else "step")
    return _save(fig, out / "barrier_matrices.png")


def spectra_over_steps(res: Any, out: Path) -> Path | None:
    """Mean over matrices of each spectral metric of W (top row) and dW (bottom row)."""
    metrics = for_plot("spectra_over_steps")
    rows = [[m for m in metrics if m.name.startswith(p)] for p in ("w_", "dw_")]
    if not any(r["metric"].startswith("w_") for r in res.rows):
        return None
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(2, cols, figsize=(3.4 * cols, 6.2), squeeze=False)
    for i, row_metrics in enumerate(rows):
        for j, m in enumerate(row_metrics):
            ax = axes[i][j]
            for group in groups(res.runs):
                _line(ax, group, res.rows, m.name, m.layer)
            ax.set_title(m.label, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Spectra of the attention/MLP matrices (mean over matrices)")
    return _save(fig, out / "spectra_over_steps.png")


def activation_heatmaps(res: Any, out: Path) -> Path | None:
    """Layer x step heat maps of each activation metric against the baseline, per run."""
    gs = [g for g in groups(res.runs)
          if group_series(res.rows, g["members"], "act_cka", "final_norm")[0]]
    if not gs:
        return None
    layers = layers_of(res.rows, "act_cka")
    metrics = for_plot("activation_heatmaps")
    fig, axes = plt.subplots(len(metrics), len(gs),
                             figsize=(3.8 * len(gs), 2.6 * len(metrics)), squeeze=False)
    for j, group in enumerate(gs):
        steps = group_series(res.rows, group["members"], "act_cka", layers[0])[0]
        n = len(group["members"])
        for i, m in enumerate(metrics):
            mat = np.array([[group_lookup(res.rows, group["members"], t, m.name, layer)
                             for t in steps] for layer in layers])
            title = m.label.removesuffix(" (final)")
            _heat(axes[i][j], mat, steps, layers,
                  f"{group['name']}: {title}{f' (mean of {n})' if n > 1 else ''}",
                  cmap="magma" if m.name == "act_l2" else "viridis")
    fig.suptitle(f"Activations against the baseline {res.baseline} (rows: layer, columns: step)")
    return _save(fig, out / "activation_heatmaps.png")


def subspace_overlap(res: Any, out: Path) -> Path | None:
    """Projector overlap at each refresh (telemetry) and between checkpoints (consecutive, anchor)."""
    panels = for_plot("subspace_overlap")
    if not any(r["metric"] in {m.name for m in panels} for r in res.rows):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 3.6), squeeze=False)
    for ax, m in zip(axes[0], panels):
        for group in groups(res.runs):
            _line(ax, group, res.rows, m.name, m.layer,
                  marker="." if m.name == "telemetry_overlap" else "o")
        ax.set_title(m.label, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("||U^T V||_F^2 / r (mean over layers)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, out / "subspace_overlap.png")


def interpolation_paths(res: Any, out: Path) -> Path | None:
    """Loss along the linear paths of the last CCBH and IMBH of each run."""
    panels = [(k, t) for k, t in (("ccbh", "previous checkpoint -> checkpoint"),
                                  ("imbh", "baseline -> run (dense weights)"))
              if res.curves.get(k)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.4), squeeze=False)
    for ax, (kind, title) in zip(axes[0], panels):
        for group in groups(res.runs):     # the lowest seed of a group
            name = group["members"][0]
            by_step = res.curves[kind].get(name)
            if not by_step:
                continue
            step = max(by_step, key=int)
            y = np.asarray(by_step[step])
            ax.plot(np.linspace(0, 1, len(y)), y, marker=".", label=f"{name} ({group['method']}) @ {step}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("a")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out / "interpolation_paths.png")


FIGURES = (landscape_profiles, sharpness_over_steps, barrier_matrices, spectra_over_steps,
           activation_heatmaps, subspace_overlap, interpolation_paths)


def all_plots(res: Any, out: Path) -> list[Path]:
    """Write every figure that has data into ``out`` (these and
    :data:`analysis.plots_topk.FIGURES`); returns the written files."""
    from analysis.plots_topk import FIGURES as MORE

    out.mkdir(parents=True, exist_ok=True)
    return [p for fn in (*FIGURES, *MORE) if (p := fn(res, out)) is not None]
