"""Downstream results as metric rows (``analysis.units.downstream``), the predictor table, and
how ``lowrank-study`` merges scales and combines per-scale verdicts; no training needed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from analysis import runs as R
from analysis.accuracy import predictor_table
from analysis.compute import Results
from analysis.downstream.results import write_step_results
from analysis.settings import Settings
from analysis.study.report import combine, merge, rename
from analysis.units.base import RunPlan, Study, UnitContext
from analysis.units.downstream import Downstream


def _result(acc: float, se: float, headline: float | None = None) -> dict:
    out = {"acc": acc, "acc_stderr": se, "acc_norm": acc, "acc_norm_stderr": se,
           "chance": 0.25, "n": 100}
    if headline is not None:
        out.update(metric="acc_mutual_info", acc_mutual_info=headline,
                   acc_mutual_info_stderr=2 * se)
    return out


def _run(path: Path, name: str) -> R.RunInfo:
    path.mkdir(parents=True, exist_ok=True)
    return R.RunInfo(path, name, "adamw", {}, [2, 4], None)


@pytest.fixture
def study(tmp_path):
    a, b, c, d = (_run(tmp_path / n, n) for n in "abcd")
    write_step_results(a.path, 4, "a", {"cloze": _result(0.4, 0.02),
                                        "cont": _result(0.3, 0.03, headline=0.5)})
    write_step_results(a.path, 2, "a", {"cloze": _result(0.3, 0.02),
                                        "cont": _result(0.2, 0.03, headline=0.4)})
    write_step_results(b.path, 4, "b", {"cloze": _result(0.6, 0.01)})   # one task only
    (d.path / "downstream").mkdir()
    (d.path / "downstream" / "step_4.json").write_text("{not json")
    problems: list[str] = []
    plans = [RunPlan(r, r.steps) for r in (a, b, c, d)]
    return Study(plans, a, Settings(), problems.append), problems


def test_rows_problems_and_the_mean_over_common_tasks(study):
    st, problems = study
    units = list(Downstream.plan(st))
    assert [u.run.name for u in units] == ["a", "b"]
    assert len(problems) == 3
    assert "'c' has no downstream results" in problems[0] and "lowrank-eval" in problems[0]
    assert "'d'" in problems[1] and "unreadable" in problems[1]
    assert "different downstream tasks" in problems[2] and "cont" in problems[2]
    ctx = UnitContext(Settings(), None, None)
    rows = {(r["step"], r["metric"], r["layer"]): r["value"]
            for r in units[0].compute(ctx)["rows"]}
    # headline: acc_mutual_info for "cont"; the mean is over the common task only
    assert rows[(4, "downstream", "cont")] == 0.5 and rows[(4, "downstream_se", "cont")] == 0.06
    assert rows[(4, "downstream_mean", "all")] == 0.4
    assert rows[(2, "downstream_mean", "all")] == 0.3
    assert rows[(4, "downstream_mean_se", "all")] == pytest.approx(0.02)
    acc = {(r["step"], r["metric"], r["layer"]): r["value"] for r in units[0].compute(
        UnitContext(Settings(downstream_metric="acc"), None, None))["rows"]}
    assert acc[(4, "downstream", "cont")] == 0.3


def test_mean_standard_error_of_independent_tasks(tmp_path):
    a = _run(tmp_path / "a", "a")
    write_step_results(a.path, 4, "a", {"x": _result(0.4, 0.03), "y": _result(0.6, 0.04)})
    st = Study([RunPlan(a, [4])], a, Settings(), lambda m: None)
    unit = next(iter(Downstream.plan(st)))
    rows = {(r["metric"], r["layer"]): r["value"]
            for r in unit.compute(UnitContext(Settings(), None, None))["rows"]}
    assert rows[("downstream_mean", "all")] == pytest.approx(0.5)
    assert rows[("downstream_mean_se", "all")] == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2)
                                                                / 2)


def test_predictor_table_takes_the_last_step_and_the_study_method():
    runs = [{"name": "d64/cola", "method": "adamw", "method_label": "cola",
             "architecture": {"hidden_size": 64, "num_layers": 2}}]
    rows = [{"run": "d64/cola", "step": s, "metric": m, "layer": layer, "value": v}
            for s, m, layer, v in ((2, "downstream_mean", "all", 0.3),
                                   (4, "downstream_mean", "all", 0.5),
                                   (4, "val_loss", "all", 2.0),
                                   (4, "w_effective_rank", "mean", 9.0))]
    (t,) = predictor_table(rows, runs)
    assert (t["scale"], t["method"], t["step"], t["accuracy"], t["val_loss"]) == \
        ("d64-L2", "cola", 4, 0.5, 2.0)
    assert t["w_effective_rank"] == 9.0 and math.isnan(t["sharpness"])


def test_rename_and_merge_scales():
    res = Results(baseline="adamw", problems=["p"])
    res.runs = [{"name": "adamw", "group": "adamw", "compared_with": None},
                {"name": "galore", "group": "galore", "compared_with": "adamw"}]
    res.rows = [{"run": "adamw", "step": 2, "metric": "imbh_pair", "layer": "galore",
                 "value": 1.0, "method": "adamw"}]
    res.curves = {"landscape": {"galore": {"2": {}}}}
    a, b = rename(res, "d64"), rename(res, "d128")
    assert a.runs[1] == {"name": "d64/galore", "group": "d64/galore",
                         "compared_with": "d64/adamw", "scale": "d64"}
    assert a.rows[0]["run"] == "d64/adamw" and a.rows[0]["layer"] == "d64/galore"
    m = merge([a, b])
    assert m.baseline == "d64/adamw, d128/adamw" and m.problems == ["d64: p", "d128: p"]
    assert set(m.curves["landscape"]) == {"d64/galore", "d128/galore"}


@pytest.mark.parametrize("statuses, verdict", [
    (["reproduced", "reproduced"], "reproduced"),
    (["reproduced", "not testable"], "reproduced"),
    (["not reproduced", "not reproduced"], "not reproduced"),
    (["reproduced", "not reproduced"], "partly reproduced"),
    (["partly reproduced", "reproduced"], "partly reproduced"),
    (["not testable", "not testable"], "not testable"),
])
def test_combining_verdicts_over_scales(statuses, verdict):
    per = {f"s{i}": [{"claim": "c", "status": st, "evidence": f"e{i}"}]
           for i, st in enumerate(statuses)}
    (f,) = combine(per)
    assert f["status"] == verdict
    assert f["evidence"] == f"s0 [{statuses[0]}]: e0 | s1 [{statuses[1]}]: e1"


def test_lm_eval_results_become_downstream_results(tmp_path):
    import json

    from analysis.downstream import read_downstream
    from analysis.downstream.lm_eval_import import import_lm_eval, records_from_lm_eval

    payload = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.61, "acc_stderr,none": 0.011,
                                    "acc_norm,none": 0.63, "acc_norm_stderr,none": 0.012},
                           "blimp": {"alias": "blimp", "acc,none": 0.7,
                                     "acc_stderr,none": "N/A"},
                           "wikitext": {"word_perplexity,none": 40.0}},
               "n-samples": {"piqa": {"original": 1838, "effective": 1838}},
               "config": {"model_args": "run_dir=/x,step=2"}}
    rec = records_from_lm_eval(payload)
    assert set(rec) == {"piqa", "blimp"}                    # no acc: not a choice task
    assert rec["piqa"]["acc_norm_stderr"] == 0.012 and rec["piqa"]["n"] == 1838
    assert rec["blimp"]["acc_norm"] == 0.7 and math.isnan(rec["blimp"]["acc_stderr"])
    with pytest.raises(ValueError, match="no acc for copa"):
        records_from_lm_eval(payload, ["piqa", "copa"])
    path = tmp_path / "results_2026.json"
    path.write_text(json.dumps(payload))
    run = tmp_path / "run"
    import_lm_eval(run, path, [2, 4], tasks=["piqa"])
    payload["config"]["model_args"] = {"run_dir": "/x", "step": "final"}
    path.write_text(json.dumps(payload))
    import_lm_eval(run, path, [2, 4], tasks=["blimp"])
    got = read_downstream(run)
    assert set(got) == {2, 4} and set(got[2]["tasks"]) == {"piqa"}
    assert got[4]["tasks"]["blimp"]["source"] == "lm-eval"
