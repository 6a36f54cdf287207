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


def findings(res: Any, agg: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """All findings for a :class:`analysis.compute.Results`.

    ``agg``: its :func:`analysis.stats.aggregate` rows; when any group has more than
    one seed, the paper's findings are checked on the group means and the
    seed-noise finding is added.
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
        out.append(landscape_differs(rows, base, others))
        out.append(spectra_differ(rows, base, others))
        out.append(same_loss_different_solutions(rows, base, others))
    out.append(sara_overlap_lower(rows, runs))
    if seeded:
        out.append(beyond_seed_noise(agg, res.runs))
    return out
