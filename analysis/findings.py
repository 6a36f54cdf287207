"""The paper's qualitative findings, checked against the measured numbers.

Each finding is ``{"claim", "status", "evidence"}`` with ``status`` one of
``"reproduced"``, ``"not reproduced"``, ``"partly reproduced"`` or
``"not testable"``; the verdicts are computed from the rows, never assumed.

With seed groups (``rundir.groups``) the paper's findings are checked on the
means over seeds, and one more finding lists which differences from the
baseline group are beyond seed noise (Welch's t-test on the per-seed values,
``p < 0.05``; see :mod:`analysis.stats`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from analysis.metric_table import seed_test_metrics
from analysis.stats import ALPHA
from analysis.table import groups, latest_common_step, lookup, series

__all__ = ["findings"]

SHARPNESS_Z = 2.0        # |difference| / combined standard error to call sharpness different
SPECTRUM_REL = 0.01      # relative difference of mean effective rank to call spectra different


def _finding(claim: str, status: str, evidence: str) -> dict[str, str]:
    return {"claim": claim, "status": status, "evidence": evidence}


def _verdict(hits: int, total: int) -> str:
    if total == 0:
        return "not testable"
    if hits == total:
        return "reproduced"
    return "partly reproduced" if hits else "not reproduced"


def landscape_differs(rows: list[dict], base: str, others: list[str]) -> dict[str, str]:
    """Each method's expected sharpness differs from the baseline's beyond sampling noise."""
    claim = "Each low-rank method's loss landscape (expected sharpness) differs from full rank."
    parts, hits, total = [], 0, 0
    for name in others:
        step = latest_common_step(rows, [base, name], "sharpness")
        if step is None:
            continue
        sm, sb = lookup(rows, name, step, "sharpness"), lookup(rows, base, step, "sharpness")
        em, eb = (lookup(rows, name, step, "sharpness_se"),
                  lookup(rows, base, step, "sharpness_se"))
        se = math.sqrt(em ** 2 + eb ** 2) if math.isfinite(em + eb) else math.nan
        z = (sm - sb) / se if se and math.isfinite(se) and se > 0 else math.inf
        total += 1
        differs = abs(z) > SHARPNESS_Z
        hits += differs
        parts.append(f"{name} at step {step}: {sm:.4g} vs {sb:.4g} ({(sm - sb) / abs(sb):+.0%}, "
                     f"{z:+.1f} standard errors: {'different' if differs else 'within noise'})")
    return _finding(claim, _verdict(hits, total),
                    "; ".join(parts) or "no run shares a step with the baseline")


def spectra_differ(rows: list[dict], base: str, others: list[str]) -> dict[str, str]:
    """Mean effective rank of W or of dW differs from the baseline's by more than 1%."""
    claim = ("Each low-rank method's spectra differ from full rank (mean effective rank of the "
             "weights W or of their change dW between checkpoints, by more than 1%).")
    parts, hits, total = [], 0, 0
    for name in others:
        step = latest_common_step(rows, [base, name], "w_effective_rank", "mean")
        if step is None:
            continue
        total += 1
        texts, differs = [], False
        for prefix, label in (("w_", "W"), ("dw_", "dW")):
            em = lookup(rows, name, step, f"{prefix}effective_rank", "mean")
            eb = lookup(rows, base, step, f"{prefix}effective_rank", "mean")
            if not math.isfinite(em + eb):
                continue
            rel = (em - eb) / eb
            differs |= abs(rel) > SPECTRUM_REL
            texts.append(f"{label} {em:.1f} vs {eb:.1f} ({rel:+.1%})")
        hits += differs
        parts.append(f"{name} at step {step}: effective rank {', '.join(texts)}"
                     f"{'' if differs else ' (within 1%)'}")
    return _finding(claim, _verdict(hits, total),
                    "; ".join(parts) or "no run shares a step with the baseline")


def _mean_overlap(rows: list[dict], name: str) -> tuple[float, int]:
    _, v = series(rows, name, "telemetry_overlap", "mean")
    valid = [x for x in v if x >= 0]
    return (float(np.mean(valid)) if valid else math.nan), len(valid)


def sara_overlap_lower(rows: list[dict], runs: list[dict]) -> dict[str, str]:
    """SARA's consecutive-projector overlap (telemetry) is lower than GaLore's."""
    claim = "SARA's consecutive-projector overlap is lower than GaLore's (less frozen subspace)."
    sara = [r["name"] for r in runs if r["method"].startswith("sara")]
    galore = [r["name"] for r in runs if r["method"].startswith("galore")]
    if not sara or not galore:
        return _finding(claim, "not testable", "needs one SARA and one GaLore run")
    parts, hits, total = [], 0, 0
    for s_name in sara:
        so, sn = _mean_overlap(rows, s_name)
        for g_name in galore:
            go, gn = _mean_overlap(rows, g_name)
            if not (math.isfinite(so) and math.isfinite(go)):
                continue
            total += 1
            hits += so < go
            parts.append(f"{s_name} {so:.3f} (mean of {sn} refreshes) vs {g_name} {go:.3f} "
                         f"(mean of {gn})")
    return _finding(claim, _verdict(hits, total),
                    "; ".join(parts) or "no overlap telemetry in metrics.jsonl")


def same_loss_different_solutions(rows: list[dict], base: str, others: list[str]
                                  ) -> dict[str, str]:
    """Methods at similar loss sit in different places: IMBH > 0 or final-layer CKA < 0.99."""
    claim = ("Methods with similar loss reach different solutions (a loss barrier on the "
             "straight path to full rank, or final-layer CKA below 0.99).")
    parts, hits, total = [], 0, 0
    for name in others:
        step = latest_common_step(rows, [name], "act_cka", "final_norm")
        if step is None:
            continue
        total += 1
        lm, lb = lookup(rows, name, step, "val_loss"), lookup(rows, base, step, "val_loss")
        barrier = lookup(rows, name, step, "imbh")
        cka = lookup(rows, name, step, "act_cka", "final_norm")
        different = (math.isfinite(barrier) and barrier > 0) or cka < 0.99
        hits += different
        parts.append(f"{name} at step {step}: loss {lm:.3f} vs {lb:.3f}, IMBH "
                     f"{barrier:.3g}, final-layer CKA {cka:.3f}")
    return _finding(claim, _verdict(hits, total),
                    "; ".join(parts) or "no activations compared with a baseline")


def random_vs_pca_sharpness(rows: list[dict], base: str, others: list[str]) -> dict[str, str]:
    """Full rank is sharper along random directions, low rank sharper along the top-1 PCA
    direction (the paper's Figure 1; Figures 12-14 for the top-k subsets)."""
    claim = ("Full rank is sharper than each low-rank method along random directions, and "
             "the low-rank method is sharper along the top-1 PCA direction (Figure 1).")
    parts, hits, total = [], 0, 0
    for name in others:
        step = latest_common_step(rows, [base, name], "pca_sharpness", "top1")
        if step is None or step not in latest_steps(rows, [base, name], "sharpness"):
            continue
        total += 1
        rm, rb = lookup(rows, name, step, "sharpness"), lookup(rows, base, step, "sharpness")
        em, eb = (lookup(rows, name, step, "sharpness_se"),
                  lookup(rows, base, step, "sharpness_se"))
        se = math.sqrt(em ** 2 + eb ** 2) if math.isfinite(em + eb) else math.nan
        z = (rb - rm) / se if math.isfinite(se) and se > 0 else math.nan
        pm, pb = (lookup(rows, name, step, "pca_sharpness", "top1"),
                  lookup(rows, base, step, "pca_sharpness", "top1"))
        random_ok, pca_ok = rb > rm, pm > pb
        hits += random_ok and pca_ok
        tops = [t for t in ("top20", "top10", "top5")
                if math.isfinite(lookup(rows, name, step, "pca_sharpness", t))]
        extra = ""
        if tops:
            tm, tb = (lookup(rows, name, step, "pca_sharpness", tops[0]),
                      lookup(rows, base, step, "pca_sharpness", tops[0]))
            extra = (f"; components 1..{tops[0][3:]}: {tm:.3g} vs {tb:.3g} "
                     f"({'low rank' if tm > tb else 'full rank'} sharper)")
        noise = "" if not math.isfinite(z) or abs(z) > SHARPNESS_Z else ", within noise"
        parts.append(f"{name} at step {step}: random {rm:.3g} vs full rank {rb:.3g} "
                     f"({'full rank' if random_ok else 'low rank'} sharper, {z:+.1f} s.e."
                     f"{noise}); top-1 PCA {pm:.3g} vs {pb:.3g} "
                     f"({'low rank' if pca_ok else 'full rank'} sharper){extra}")
    return _finding(claim, _verdict(hits, total),
                    "; ".join(parts) or "no top-k landscapes shared with the baseline "
                                        "(--topk 0, or no common step)")


def latest_steps(rows: list[dict], runs: list[str], metric: str) -> set[int]:
    """Steps at which every run in ``runs`` has ``metric`` (layer ``all``)."""
    sets = [set(series(rows, r, metric)[0]) for r in runs]
    return set.intersection(*sets) if sets else set()


def perplexity_vs_downstream(rows: list[dict], runs: list[dict]) -> dict[str, str]:
    """Validation loss does not order downstream accuracy: two methods at one scale where the
    lower loss has the lower accuracy, by more than two combined standard errors."""
    claim = ("Validation perplexity does not fully predict downstream accuracy: at one scale, a "
             "method with lower validation loss can have lower zero-shot accuracy.")
    from analysis.accuracy import scale_label

    by_scale: dict[str, list[tuple[str, str, float, float, float]]] = {}
    for r in runs:
        name = r["name"]
        steps = series(rows, name, "downstream_mean")[0]
        if not steps:
            continue
        t = steps[-1]
        by_scale.setdefault(scale_label(r["architecture"]), []).append(
            (name, r.get("method_label") or r["method"], lookup(rows, name, t, "val_loss"),
             lookup(rows, name, t, "downstream_mean"),
             lookup(rows, name, t, "downstream_mean_se")))
    pairs, found = 0, []
    for scale, entries in sorted(by_scale.items()):
        for i, a in enumerate(entries):
            for b in entries[i + 1:]:
                if a[1] == b[1] or not all(map(math.isfinite, (*a[2:], *b[2:]))):
                    continue
                pairs += 1
                lo, hi = (a, b) if a[2] < b[2] else (b, a)
                gap = hi[3] - lo[3]
                if gap > SHARPNESS_Z * math.hypot(lo[4], hi[4]):
                    found.append(f"{scale}: {lo[0]} loss {lo[2]:.3f} accuracy {lo[3]:.3f}"
                                 f"±{lo[4]:.3f} vs {hi[0]} loss {hi[2]:.3f} accuracy "
                                 f"{hi[3]:.3f}±{hi[4]:.3f}")
    if pairs == 0:
        return _finding(claim, "not testable", "needs two methods with downstream results at "
                                               "one scale")
    status = "reproduced" if found else "not reproduced"
    evidence = (f"{len(found)} of {pairs} method pairs at equal scale are ordered against "
                f"their validation loss beyond 2 standard errors" +
                (": " + "; ".join(found[:6]) if found else
                 " (lower loss never has clearly lower accuracy here)"))
    return _finding(claim, status, evidence)


def geometry_improves_prediction(results: list[Any] | None) -> dict[str, str]:
    """Adding geometry to val loss raises the LOSO and LOMO Pearson correlation (Figure 5)."""
    from analysis.predictor import PAPER_FIGURE5

    claim = ("Adding geometric and spectral metrics to validation loss improves the prediction "
             "of downstream accuracy (Figure 5: LOSO 0.873 -> 0.913, LOMO 0.864 -> 0.895).")
    if not results:
        return _finding(claim, "not testable", "no downstream results to predict")
    by = {r.predictor.name: r for r in results}
    vl, both = by.get("val loss only"), by.get("val loss + geometry")
    if vl is None or both is None:
        return _finding(claim, "not testable", "the two predictors were not fitted")
    texts, hits, total = [], 0, 0
    for label, attr, i in (("LOSO Pearson", "loso_pearson", 0),
                           ("LOMO Pearson", "lomo_pearson", 1),
                           ("in-sample R^2", "in_sample_r2", 2)):
        a, b = getattr(vl, attr), getattr(both, attr)
        paper = (f"paper {PAPER_FIGURE5['val loss only'][i]:.3f} -> "
                 f"{PAPER_FIGURE5['val loss + geometry'][i]:.3f}")
        if a.value is None or b.value is None:
            texts.append(f"{label}: {a.text()} -> {b.text()} ({paper})")
            continue
        if attr != "in_sample_r2":          # R^2 cannot fall when features are added
            total += 1
            hits += b.value > a.value
        texts.append(f"{label}: {a.value:.3f} -> {b.value:.3f} ({paper})")
    return _finding(claim, _verdict(hits, total), "; ".join(texts))


def _pm(mean: float, std: float) -> str:
    return f"{mean:.4g}" if not math.isfinite(std) else f"{mean:.4g} +- {std:.2g}"


def beyond_seed_noise(agg: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, str]:
    """Which differences of each method group from the baseline group exceed seed noise.

    Uses the aggregated rows of :func:`analysis.stats.aggregate` at each group's latest
    step shared with the baseline, for the metrics the table marks ``seed_test``; a
    method "differs" when one marked ``geometry`` (sharpness, mean effective rank of W
    or dW) differs with Welch ``p < 0.05``.
    """
    claim = (f"Low-rank methods differ from full rank beyond seed noise (Welch's t-test on "
             f"the per-seed values, * p < {ALPHA:g}; sharpness or effective rank of W or dW).")
    gs = groups(runs)
    base = next((g for g in gs if g["baseline"]), None)
    if base is None or len(base["members"]) < 2:
        return _finding(claim, "not testable", "needs a baseline with 2 or more seeds")
    index = {(a["group"], a["step"], a["metric"], a["layer"]): a for a in agg}
    parts, hits, total = [], 0, 0
    for g in gs:
        if g["baseline"] or len(g["members"]) < 2:
            continue
        steps = [a["step"] for a in agg if a["group"] == g["name"] and a["metric"] == "val_loss"
                 and math.isfinite(a["p_welch"])]
        if not steps:
            continue
        step = max(steps)
        total += 1
        texts, differs = [], False
        for m in seed_test_metrics():
            a = index.get((g["name"], step, m.name, m.layer))
            b = index.get((base["name"], step, m.name, m.layer))
            if a is None or b is None or not math.isfinite(a["p_welch"]):
                continue
            sig = a["significant"]
            differs |= bool(sig) and m.geometry
            texts.append(f"{m.label} {_pm(a['mean'], a['std'])} vs {_pm(b['mean'], b['std'])} "
                         f"(p={a['p_welch']:.2g}{sig})")
        hits += differs
        parts.append(f"{g['name']} (n={len(g['members'])} vs {len(base['members'])}) at step "
                     f"{step}: {', '.join(texts)}")
    return _finding(claim, _verdict(hits, total),
                    "; ".join(parts) or "no method group with 2 or more seeds shares a step "
                                        "with the baseline")


def _mean_rows(agg: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregated rows as metric rows of one run per group (value: the mean over seeds)."""
    return [{"run": a["group"], "method": a["method"], "step": a["step"], "metric": a["metric"],
             "layer": a["layer"], "value": a["mean"]} for a in agg]


def findings(res: Any, agg: list[dict[str, Any]] | None = None,
             predictor: list[Any] | None = None) -> list[dict[str, str]]:
    """All findings for a :class:`analysis.compute.Results`.

    ``agg``: its :func:`analysis.stats.aggregate` rows; when any group has more than
    one seed, the paper's findings are checked on the group means and the
    seed-noise finding is added. ``predictor``: the fitted predictors
    (:attr:`analysis.accuracy.PredictorSection.results`) for the Figure-5 finding.
    """
    gs = groups(res.runs)
    seeded = agg is not None and any(len(g["members"]) > 1 for g in gs)
    rows = _mean_rows(agg) if seeded else res.rows
    runs = ([{"name": g["name"], "method": g["method"], "baseline": g["baseline"]} for g in gs]
            if seeded else res.runs)
    base = res.baseline
    out = []
    others = [r["name"] for r in runs if not r["baseline"]]
    if base is None:
        out.append(_finding("Comparisons with full rank", "not testable",
                            "no baseline run was given (--baseline)"))
    else:
        out.append(random_vs_pca_sharpness(rows, base, others))
        out.append(landscape_differs(rows, base, others))
        out.append(spectra_differ(rows, base, others))
        out.append(same_loss_different_solutions(rows, base, others))
    out.append(perplexity_vs_downstream(res.rows, res.runs))
    out.append(geometry_improves_prediction(predictor))
    out.append(sara_overlap_lower(rows, runs))
    if seeded:
        out.append(beyond_seed_noise(agg, res.runs))
    return out
