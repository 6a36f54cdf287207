"""``lowrank-analyze`` over seed groups: statistics against NumPy/scipy, groups end to end."""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps
from train_support import analysis_run_overrides, write_corpus

from analysis import plots
from analysis import stats as S
from analysis.cli import main as analyze
from rundir import groups as G
from train.cli import main as train

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "low", "rank",
         "gradient", "projection", "keeps", "optimizer", "memory", "small", "and"]
FAST = ["--directions", "2", "--alpha-points", "5", "--interp-points", "3", "--sequences", "4",
        "--topk", "2", "--topk-steps", "final", "--no-progress"]


# ----------------------------------------------------------------------------- statistics

def _welch_by_hand(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return 2 * sps.t.sf(abs(t), df)


def _perm_by_hand(a, b):
    pooled = np.concatenate([a, b])
    n, k = pooled.size, len(a)
    obs = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for mask in itertools.product([0, 1], repeat=n):       # every subset of size k
        m = np.asarray(mask, bool)
        if m.sum() != k:
            continue
        total += 1
        hits += abs(pooled[m].mean() - pooled[~m].mean()) >= obs - 1e-12
    return hits / total


def test_summary_and_tests_match_numpy_scipy():
    a = [1.0, 1.3, 0.8, 1.1]
    b = [2.0, 2.4, 1.7]
    got = S.summarize(a)
    x = np.asarray(a)
    sd = math.sqrt(((x - x.mean()) ** 2).sum() / 3)
    half = sps.t.ppf(0.975, 3) * sd / 2
    assert got["n"] == 4
    assert got["mean"] == pytest.approx(x.mean())
    assert got["std"] == pytest.approx(sd)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((x.mean() - half, x.mean() + half))
    assert S.welch_p(a, b) == pytest.approx(_welch_by_hand(a, b), rel=1e-10)
    assert S.permutation_p(a, b) == pytest.approx(_perm_by_hand(a, b))
    # fully separated 3 + 3: 2 of the 20 splits reach the observed difference
    assert S.permutation_p([1, 2, 3], [10, 11, 12]) == pytest.approx(0.1)
    assert S.welch_p([1, 2, 3], [10, 11, 12]) < 0.05
    # one value: no spread, no interval, no test; nan values are left out
    one = S.summarize([2.5, math.nan])
    assert one["n"] == 1 and one["mean"] == 2.5 and math.isnan(one["std"])
    assert math.isnan(S.welch_p([1.0], b)) and math.isnan(S.welch_p([1, 1], [2, 2]))
    assert S.mark(0.01) == "*" and S.mark(0.2) == "" and S.mark(math.nan) == ""


def test_aggregate_groups_and_marks():
    runs = [{"name": f"base/seed_{s}", "group": "base", "method": "adamw", "baseline": True}
            for s in range(3)]
    runs += [{"name": f"m/seed_{s}", "group": "m", "method": "galore", "baseline": False}
             for s in range(3)]
    runs += [{"name": "plain", "group": "plain", "method": "sara", "baseline": False}]
    vals = {"base": [1.0, 1.1, 0.9], "m": [2.0, 2.2, 1.9], "plain": [1.05]}
    rows = [{"run": f"{g}/seed_{i}" if g != "plain" else g, "method": "x", "step": 4,
             "metric": "sharpness", "layer": "all", "value": v}
            for g, vs in vals.items() for i, v in enumerate(vs)]
    rows.append({"run": "m/seed_0", "method": "x", "step": 4, "metric": "imbh_pair",
                 "layer": "plain", "value": 1.0})
    agg = {a["group"]: a for a in S.aggregate(rows, runs)}
    assert set(agg) == {"base", "m", "plain"}                       # imbh_pair not aggregated
    m = agg["m"]
    assert m["n"] == 3 and m["mean"] == pytest.approx(np.mean(vals["m"]))
    assert m["std"] == pytest.approx(np.std(vals["m"], ddof=1))
    assert m["p_welch"] == pytest.approx(_welch_by_hand(vals["m"], vals["base"]))
    assert m["p_perm"] == pytest.approx(_perm_by_hand(vals["m"], vals["base"]))
    assert m["significant"] == ("*" if m["p_welch"] < 0.05 else "")
    assert m["baseline_mean"] == pytest.approx(1.0) and m["baseline_n"] == 3
    assert math.isnan(agg["base"]["p_welch"]) and agg["base"]["significant"] == ""
    assert agg["plain"]["n"] == 1 and math.isnan(agg["plain"]["p_welch"])


def test_group_discovery(tmp_path):
    (tmp_path / "g" / "seed_2").mkdir(parents=True)
    (tmp_path / "g" / "seed_10").mkdir()
    (tmp_path / "g" / "notes").mkdir()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "seed_0").mkdir()
    members = G.expand(tmp_path / "g")
    assert [(m.seed, m.name, m.group) for m in members] == \
        [(2, "g/seed_2", "g"), (10, "g/seed_10", "g")]
    assert not G.is_group(tmp_path / "run")           # checkpoints of its own: a plain run
    plain = G.expand(tmp_path / "run")
    assert len(plain) == 1 and plain[0].seed is None and plain[0].name is None


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> dict[str, Path]:
    """Two groups of two seeds (adamw, sara) and one plain run, trained for 4 steps."""
    root = tmp_path_factory.mktemp("seeds")
    corpus = write_corpus(root / "corpus", WORDS, docs=16, seed=0, words_per_doc=160)
    common = [*analysis_run_overrides(root, corpus), "steps=4", "checkpoint.every=2"]
    specs = {"adamw": ["optimizer.name=adamw", "optimizer.lr=0.003"],
             "sara": ["optimizer.name=sara_adamw", "optimizer.lr=0.01"]}
    for name, args in specs.items():
        for seed in (0, 1):
            assert train([*common, *args, f"seed={seed}",
                          f"run_dir={root / name / f'seed_{seed}'}"]) == 0
    shutil.copytree(root / "sara" / "seed_1", root / "plain")       # a plain (ungrouped) run
    return {"root": root, "adamw": root / "adamw", "sara": root / "sara", "plain": root / "plain"}


@pytest.fixture(scope="module")
def grouped(seeded, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeds_out")
    code = analyze([str(seeded["sara"]), str(seeded["plain"]), "--baseline",
                    str(seeded["adamw"]), "--out", str(out), *FAST])
    return code, out


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_groups_end_to_end(grouped):
    code, out = grouped
    assert code == 0
    payload = json.loads((out / "metrics.json").read_text())
    runs = {r["name"]: r for r in payload["runs"]}
    assert set(runs) == {"adamw/seed_0", "adamw/seed_1", "sara/seed_0", "sara/seed_1", "plain"}
    assert payload["baseline"] == "adamw"
    # seed k against baseline seed k; the plain run against the baseline's first seed
    assert runs["sara/seed_1"]["compared_with"] == "adamw/seed_1"
    assert runs["sara/seed_0"]["compared_with"] == "adamw/seed_0"
    assert runs["plain"]["compared_with"] == "adamw/seed_0"
    assert runs["plain"]["group"] == "plain" and runs["sara/seed_1"]["seed"] == 1

    per_run = [dict(r, value=float(r["value"]), step=int(r["step"]))
               for r in _csv(out / "metrics.csv")]
    agg = _csv(out / "metrics_by_method.csv")
    assert len(agg) == len(payload["by_method"])
    checked = 0
    for a in agg:
        if a["group"] != "sara" or a["layer"] not in ("all", "mean"):
            continue
        mine = [r["value"] for r in per_run if r["run"].startswith("sara/")
                and (r["step"], r["metric"], r["layer"]) == (int(a["step"]), a["metric"],
                                                             a["layer"])]
        base = [r["value"] for r in per_run if r["run"].startswith("adamw/")
                and (r["step"], r["metric"], r["layer"]) == (int(a["step"]), a["metric"],
                                                             a["layer"])]
        assert int(a["n"]) == len(mine) == 2
        assert float(a["mean"]) == pytest.approx(np.mean(mine), rel=1e-9)
        assert float(a["std"]) == pytest.approx(np.std(mine, ddof=1), rel=1e-9, abs=1e-12)
        if len(base) == 2 and np.ptp(mine) + np.ptp(base) > 0:
            p = _welch_by_hand(mine, base)
            assert float(a["p_welch"]) == pytest.approx(p, rel=1e-6)
            assert a["significant"] == ("*" if p < 0.05 else "")
            checked += 1
    assert checked >= 5
    plain = [a for a in agg if a["group"] == "plain"]
    assert plain and all(a["n"] == "1" for a in plain)

    html = (out / "report.html").read_text()
    assert "Summary per method and checkpoint (over seeds)" in html
    assert "Welch" in html and " ± " in html
    # one mark per significant cell of the group table (and only there)
    table = html.split("<table class=groups>")[1].split("</table>")[0]
    from analysis.metric_table import summary_metrics
    wanted = {(m.name, m.layer) for m in summary_metrics()}
    sig = [a for a in payload["by_method"] if a["significant"] == "*"
           and (a["metric"], a["layer"]) in wanted]
    assert table.count("<sup") == len(sig)
    names = [f["claim"] for f in payload["findings"]]
    assert any("beyond seed noise" in c for c in names)
    for name in ("sharpness_over_steps.png", "spectra_over_steps.png", "landscape_profiles.png"):
        assert (out / name).is_file()


@pytest.mark.slow
def test_group_plots_have_error_bars(grouped, tmp_path, monkeypatch):
    _, out = grouped
    payload = json.loads((out / "metrics.json").read_text())
    res = SimpleNamespace(rows=payload["rows"], runs=payload["runs"], curves=payload["curves"],
                          baseline=payload["baseline"])
    labels = []
    real = plots.plt.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        if kwargs.get("yerr") is not None:
            labels.append(kwargs.get("label"))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "errorbar", spy)
    assert plots.spectra_over_steps(res, tmp_path) is not None
    assert any(lab and lab.startswith("sara (sara_adamw, n=2)") for lab in labels)
    assert any(lab and lab.startswith("adamw (adamw, n=2)") for lab in labels)
    assert not any(lab and lab.startswith("plain") for lab in labels)   # one seed: a line


@pytest.mark.slow
def test_single_seed_path_has_no_seed_sections(seeded, tmp_path):
    out = tmp_path / "o"
    assert analyze([str(seeded["plain"]), "--baseline", str(seeded["adamw"] / "seed_0"),
                    "--out", str(out), "--steps", "4", *FAST]) == 0
    html = (out / "report.html").read_text()
    assert "<h2>Summary per checkpoint</h2>" in html and "over seeds" not in html
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["baseline"] == "seed_0"
    assert not any("beyond seed noise" in f["claim"] for f in payload["findings"])
    agg = _csv(out / "metrics_by_method.csv")
    assert agg and all(a["n"] == "1" and a["significant"] == "" for a in agg)
