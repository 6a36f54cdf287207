"""One self-contained HTML report: tables, findings, problems and base64-embedded figures.

The summary tables have one column per metric of the metric table marked
``summary`` (:func:`analysis.metric_table.summary_metrics`).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from analysis.metric_table import summary_metrics
from analysis.stats import ALPHA
from analysis.table import groups, layers_of, lookup

__all__ = ["write_report"]

CAPTIONS = {
    "landscape_profiles": "Mean random 1-D loss profile L(theta + a d) - L(theta) around each "
                          "checkpoint (the same Gaussian directions for every run); a steeper "
                          "bowl is a sharper minimum.",
    "sharpness_over_steps": "Expected sharpness (mean symmetric rise of the mean profile; bars: "
                            "standard error over directions), the across-direction variance, "
                            "and the loss at the centre, per checkpoint.",
    "barrier_matrices": "Loss barriers on straight paths: CCBH between consecutive checkpoints "
                        "of one run, IMBH between a run and the baseline at the same step "
                        "(dense-equivalent weights), and IMBH between every two runs at their "
                        "latest common step. Negative: no barrier.",
    "spectra_over_steps": "Singular-value statistics of the attention/MLP matrices (W) and of "
                          "their change between consecutive checkpoints (dW), averaged over "
                          "matrices.",
    "activation_heatmaps": "Per-layer similarity of each run's residual stream to the "
                           "baseline's on the same validation tokens (embed, each block, the "
                           "final norm).",
    "subspace_overlap": "Projector subspace overlap ||U^T V||_F^2 / r: at every refresh against "
                        "the previous projector (training telemetry), between checkpoints, and "
                        "against the first checkpoint's projector (frozen-subspace diagnostic). "
                        "About r/d for unrelated random subspaces.",
    "interpolation_paths": "Loss along the straight paths behind the last CCBH and IMBH values.",
    "topk_profiles": "Loss along the top-k \"PCA\" directions (the k-th rank-1 SVD term "
                     "sigma_k u_k v_k^T of every matrix, k = 1..K), centred at the checkpoint, "
                     "for the last checkpoints of each run (the lowest seed of a group).",
    "topk_over_steps": "Expected sharpness of the mean curve over components 1..K and the "
                       "mean across-component variance, against the step (the reference's "
                       "aggregation for K in {1, 5, 10, 20}).",
    "topk_components": "Expected sharpness along each component k at the last checkpoint "
                       "(symmetric-log scale).",
    "rank_table": "The reference's rank table (rank, rank ratio, effective rank / min dim, "
                  "s2/s1, count ratio; mean over attention/MLP matrices) of W and of dW, and "
                  "the update norms ||dW||_F and ||dW||_F / ||W_prev||_F.",
    "downstream_over_steps": "Zero-shot accuracy of lowrank-eval's tasks per evaluated "
                             "checkpoint (bars: bootstrap standard error, or +-1 std over "
                             "seeds); dashed: chance.",
    "predictor_scatter": "Measured mean downstream accuracy against the leave-one-scale-out "
                         "and in-sample predictions of each predictor (dashed: identity).",
}

STYLE = """body{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td.l{text-align:left}img{max-width:100%;border:1px solid #ddd}
.reproduced{color:#17692f}.not{color:#a02020}.partly{color:#8a6d00}.nt{color:#666}
.problems li{color:#a02020}figure{margin:1.5em 0}figcaption{font-size:13px;color:#444}
.wide{overflow-x:auto}"""


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.4g}"


def _status_class(status: str) -> str:
    return {"reproduced": "reproduced", "not reproduced": "not",
            "partly reproduced": "partly"}.get(status, "nt")


def _summary_row(item: dict[str, Any], numbers: list[str], values: list[str]) -> str:
    """One table row: a run's or group's name (marked if baseline), method and layer type,
    then plain ``numbers`` (step, seeds) and the already formatted metric ``values``."""
    tag = " (baseline)" if item["baseline"] else ""
    names = (f"<td class=l>{html.escape(item['name'])}{tag}</td>"
             f"<td class=l>{html.escape(item['method'])}</td>"
             f"<td class=l>{html.escape(item['linear'])}</td>")
    return f"<tr>{names}{''.join(f'<td>{v}</td>' for v in numbers + values)}</tr>"


def _head() -> str:
    """The metric columns' headers (the unit, when there is one, on hover)."""
    return "".join(f"<th title='{html.escape(m.unit)}'>{html.escape(m.label)}</th>"
                   if m.unit else f"<th>{html.escape(m.label)}</th>" for m in summary_metrics())


def _summary_table(res: Any) -> str:
    lines = [f"<table><tr><th>run</th><th>method</th><th>layers</th><th>step</th>{_head()}</tr>"]
    for run in res.runs:
        steps = sorted({r["step"] for r in res.rows
                        if r["run"] == run["name"] and r["metric"] == "val_loss"})
        for step in steps:
            values = [_fmt(lookup(res.rows, run["name"], step, m.name, m.layer))
                      for m in summary_metrics()]
            lines.append(_summary_row(run, [str(step)], values))
    lines.append("</table>")
    return "\n".join(lines)


def _pm(a: dict[str, Any] | None) -> str:
    """``mean +- std`` and the significance mark of one aggregated row."""
    if a is None or not math.isfinite(a["mean"]):
        return "–"
    text = _fmt(a["mean"])
    if math.isfinite(a["std"]):
        text += f" ± {a['std']:.2g}"
    if a["significant"]:
        text += f"<sup title='p={a['p_welch']:.3g}'>{html.escape(a['significant'])}</sup>"
    return text


def _group_table(res: Any, agg: list[dict[str, Any]]) -> str:
    """One line per group x step: mean +- std over seeds, ``*`` where Welch p < ALPHA."""
    index = {(a["group"], a["step"], a["metric"], a["layer"]): a for a in agg}
    lines = [(f"<table class=groups><tr><th>method group</th><th>method</th><th>layers</th>"
              f"<th>seeds</th><th>step</th>{_head()}</tr>")]
    for g in groups(res.runs):
        steps = sorted({a["step"] for a in agg if a["group"] == g["name"]
                        and a["metric"] == "val_loss"})
        for step in steps:
            values = [_pm(index.get((g["name"], step, m.name, m.layer)))
                      for m in summary_metrics()]
            lines.append(_summary_row(g, [str(len(g["members"])), str(step)], values))
    lines.append("</table>")
    return "\n".join(lines)


SEED_NOTE = ("<p>Cells: mean ± standard deviation over seeds (ddof=1). <b>*</b>: the "
             "per-seed values differ from the baseline group's at the same step with "
             f"Welch's t-test p &lt; {ALPHA:g} (hover for p; every p-value, the exact "
             "permutation test and 95% Student-t intervals are in metrics_by_method.csv). "
             "With 3 seeds per group the test has little power: a missing mark is no "
             "evidence of equality, and an exact permutation test on 3 + 3 values cannot "
             "go below p = 0.1. Metrics measured against the baseline (IMBH, CKA) have no "
             "test. Seed k of a method is compared with seed k of the baseline.</p>")


def _loss_note(settings: dict[str, Any]) -> str:
    """What the loss column measures, and why it is not the run's logged ``val_loss``."""
    n = settings.get("sequences", "--sequences")
    return ("<p><b>loss</b>: mean next-token loss of each checkpoint on the analysis batch, "
            f"the first {n} validation sequences of the run's data (every metric here uses "
            "that batch). It is not the <code>val_loss</code> that lowrank-train logs in "
            "metrics.jsonl (and the demo's table shows), which averages eval.batches "
            "validation batches: the two differ by the sampling of the smaller batch.</p>")


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(CAPTIONS.get(path.stem, ""))
    return (f"<figure><img alt='{path.stem}' src='data:image/png;base64,{data}'>"
            f"<figcaption><b>{path.name}</b>: {caption}</figcaption></figure>")


def _downstream_section(res: Any, agg: list[dict[str, Any]] | None) -> str:
    """Per run (and per group, over seeds): each task's accuracy ± s.e. and the mean."""
    tasks = [t for t in layers_of(res.rows, "downstream")]
    if not tasks:
        return ("<h2>Downstream accuracy</h2><p>No downstream results: run "
                "<code>lowrank-eval RUN_DIR...</code> on the runs (the problems above name "
                "them).</p>")
    chance = {t: lookup(res.rows, r["run"], r["step"], "downstream_chance", t)
              for t in tasks for r in res.rows
              if r["metric"] == "downstream_chance" and r["layer"] == t}
    head = "".join(f"<th>{html.escape(t)}<br><small>chance {_fmt(chance.get(t, math.nan))}"
                   f"</small></th>" for t in tasks)
    lines = [("<h2>Downstream accuracy</h2><p>Zero-shot multiple-choice accuracy from "
             "<code>lowrank-eval</code> at each run's last analysed checkpoint: ± the "
             "bootstrap standard error (the mean over tasks: ± sqrt(sum se^2) / tasks).</p>"),
             (f"<table><tr><th>run</th><th>method</th><th>layers</th><th>step</th>{head}"
             "<th>mean</th></tr>")]
    for run in res.runs:
        steps = sorted({r["step"] for r in res.rows
                        if r["run"] == run["name"] and r["metric"] == "downstream"})
        if not steps:
            continue
        t = steps[-1]
        cells = [_se(lookup(res.rows, run["name"], t, "downstream", k),
                     lookup(res.rows, run["name"], t, "downstream_se", k)) for k in tasks]
        cells.append(_se(lookup(res.rows, run["name"], t, "downstream_mean"),
                         lookup(res.rows, run["name"], t, "downstream_mean_se")))
        lines.append(_summary_row({**run, "method": run.get("method_label") or run["method"]},
                                  [str(t)], cells))
    lines.append("</table>")
    if agg is not None and any(len(g["members"]) > 1 for g in groups(res.runs)):
        index = {(a["group"], a["step"], a["metric"], a["layer"]): a for a in agg}
        lines.append("<p>Over seeds (mean ± std, * Welch p &lt; 0.05 against the baseline "
                     f"group):</p><table><tr><th>group</th><th>method</th><th>layers</th>"
                     f"<th>seeds</th><th>step</th>{head}<th>mean</th></tr>")
        for g in groups(res.runs):
            steps = sorted({a["step"] for a in agg if a["group"] == g["name"]
                            and a["metric"] == "downstream"})
            if not steps:
                continue
            t = steps[-1]
            cells = [_pm(index.get((g["name"], t, "downstream", k))) for k in tasks]
            cells.append(_pm(index.get((g["name"], t, "downstream_mean", "all"))))
            lines.append(_summary_row(g, [str(len(g["members"])), str(t)], cells))
        lines.append("</table>")
    return "\n".join(lines)


def _wide(table: str) -> str:
    """A table that scrolls sideways instead of widening the page."""
    return f"<div class=wide>{table}</div>"


def _se(value: float, se: float) -> str:
    if not math.isfinite(value):
        return "–"
    return _fmt(value) + (f" ± {se:.2g}" if math.isfinite(se) else "")


def _predictor_section(section: Any) -> str:
    """Figure 5: the predictor table next to the paper's, the features, the note, the scatter."""
    from analysis.predictor import GEOMETRY_FEATURES, PAPER_FIGURE5

    parts = ["<h2>Predicting downstream accuracy (Figure 5)</h2>"]
    if section is None or not section.results:
        note = section.note if section is not None else "Not computed."
        return parts[0] + f"<p>{html.escape(note)}</p>"
    parts.append("<p>Linear predictors of each run's mean downstream accuracy from its "
                 "measurements at the last analysed checkpoint (scikit-learn, standardised "
                 "features): leave-one-scale-out and leave-one-method-out Pearson correlation "
                 "of the out-of-fold predictions, and the in-sample R². Geometry features: "
                 f"{html.escape(', '.join(GEOMETRY_FEATURES))} (why: docs/downstream.md).</p>")
    parts.append("<table><tr><th>predictor</th><th>features</th><th>runs</th><th>LOSO Pearson"
                 "</th><th>LOMO Pearson</th><th>in-sample R²</th><th>paper (LOSO / LOMO / R²)"
                 "</th></tr>")
    for r in section.results:
        paper = PAPER_FIGURE5.get(r.predictor.name)
        ptext = " / ".join(f"{v:.3f}" for v in paper) if paper else "–"
        parts.append(f"<tr><td class=l>{html.escape(r.predictor.name)}</td>"
                     f"<td>{len(r.predictor.features)}</td><td>{len(r.runs)}</td>"
                     + "".join(f"<td class=l>{html.escape(sc.text())}</td>"
                               for sc in (r.loso_pearson, r.lomo_pearson, r.in_sample_r2))
                     + f"<td>{ptext}</td></tr>")
    parts.append("</table>")
    dropped = sorted({d for r in section.results for d in r.dropped})
    if dropped:
        parts.append(f"<p>Left out for a missing value: {html.escape(', '.join(dropped))}.</p>")
    parts.append(f"<p><b>What this shows here:</b> {html.escape(section.note)}</p>")
    if section.image is not None and Path(section.image).is_file():
        parts.append(_image(Path(section.image)))
    return "\n".join(parts)


def write_report(res: Any, findings: list[dict[str, str]], images: list[Path],
                 settings: dict[str, Any], path: Path, seconds: float | None = None,
                 agg: list[dict[str, Any]] | None = None, predictor: Any = None,
                 intro: str = "", figure_groups: dict[str, list[Path]] | None = None) -> Path:
    """Write ``path`` (HTML, no external files) and return it.

    ``agg``: :func:`analysis.stats.aggregate` rows; when a group has more than one
    seed the summary is one line per group (mean ± std, significance marks) and
    the per-run table follows it. ``predictor``: an
    :class:`analysis.accuracy.PredictorSection` (the Figure-5 section). ``intro``: HTML put
    under the title (``lowrank-study``: the study's plan and times). ``figure_groups``:
    figures under sub-headings (one per scale of a study) instead of ``images``.
    """
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>lowrank-analyze report"
             f"</title><style>{STYLE}</style></head><body>"),
             "<h1>Geometry and spectra of low-rank pre-training</h1>",
             (f"<p>Baseline (full rank): <b>{html.escape(str(res.baseline))}</b>. "
             f"Runs: {', '.join(html.escape(r['name']) for r in res.runs) or 'none'}.</p>"),
             intro]
    parts.append("<h2>Findings</h2><p>Each of the paper's qualitative findings that this "
                 "data can test, with the verdict computed from the numbers below. Small "
                 "models and short runs: a finding that does not reproduce here may still "
                 "hold at scale, and one that does may not be significant.</p><ul>")
    for f in findings:
        parts.append(f"<li><b>{html.escape(f['claim'])}</b> — <span class="
                     f"'{_status_class(f['status'])}'><b>{html.escape(f['status'])}</b></span>"
                     f"<br><small>{html.escape(f['evidence'])}</small></li>")
    parts.append("</ul>")
    parts.append("<h2>Problems</h2>")
    if res.problems:
        parts.append("<ul class=problems>" + "".join(
            f"<li>{html.escape(p)}</li>" for p in res.problems) + "</ul>")
    else:
        parts.append("<p>None: every run, step and comparison was analysed.</p>")
    if agg is not None and any(len(g["members"]) > 1 for g in groups(res.runs)):
        parts.append("<h2>Summary per method and checkpoint (over seeds)</h2>" + SEED_NOTE
                     + _loss_note(settings) + _wide(_group_table(res, agg)))
        parts.append("<h2>Summary per run and checkpoint</h2>" + _wide(_summary_table(res)))
    else:
        parts.append("<h2>Summary per checkpoint</h2>" + _loss_note(settings)
                     + _wide(_summary_table(res)))
    parts.append(_downstream_section(res, agg))
    parts.append(_predictor_section(predictor))
    parts.append("<h2>Figures</h2>")
    if figure_groups:
        for label, group in figure_groups.items():
            parts.append(f"<h3>{html.escape(label)}</h3>")
            parts += [_image(p) for p in group]
    else:
        parts += [_image(p) for p in images]
    rows = "".join(f"<tr><td class=l>{html.escape(k)}</td><td class=l>{html.escape(str(v))}"
                   f"</td></tr>" for k, v in settings.items())
    took = f" Computed in {seconds:.1f} s." if seconds is not None else ""
    parts.append(f"<h2>Settings</h2><table>{rows}</table><p>Units computed: "
                 f"{res.computed_units}, read from the cache: {res.cached_units}.{took} "
                 "All metric rows are in metrics.csv / metrics.json next to this file.</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
