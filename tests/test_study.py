"""``lowrank-study`` end to end on a small study (slow): 2 methods x 2 tiny scales, trained,
evaluated downstream, analysed and reported; a second call skips what is done and
resumes an interrupted run; the report opens in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from browser_support import open_in_browser
from train_support import write_corpus

from analysis.study.cli import main as study_main

pytestmark = pytest.mark.slow

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "low",
         "rank", "gradient", "projection", "keeps", "optimizer", "memory", "small", "and"]


def _task(path: Path, n: int = 24) -> Path:
    lines = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 5) % len(WORDS)]
        lines.append(json.dumps({"context": f"{WORDS[(i + 1) % 19]} {WORDS[(i + 2) % 19]}",
                                 "choices": [f" {a}", f" {b}x"], "gold": 0}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study")
    corpus = write_corpus(root / "corpus", WORDS, docs=24, seed=0, words_per_doc=200)
    good = _task(root / "words.jsonl")
    bad = root / "broken.jsonl"
    bad.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "a"}\n')
    cfg = {
        "name": "tiny",
        "out": str(root / "out"),
        "base": "base/demo",
        "overrides": ["data.source=text_dir", f"data.path={corpus}",
                      f"data.cache_dir={root / 'cache'}", "batch_size=4", "seq_len=16",
                      "steps=4", "eval.every=2", "eval.batches=1", "checkpoint.every=2",
                      "checkpoint.async_save=false", "log_every=1", "tensorboard=false",
                      "optimizer.update_proj_gap=2"],
        "scales": {"t32": {"preset": "presets/llama_demo",
                           "overrides": ["model.preset=llama_tiny",
                                         "model.overrides.hidden_size=32",
                                         "model.overrides.intermediate_size=88", "vars.rank=4"]},
                   "t64": {"preset": "presets/llama_demo",
                           "overrides": ["model.preset=llama_tiny", "vars.rank=4"]}},
        "methods": ["adamw", "galore"],
        "analysis": {"directions": 2, "alpha_points": 5, "interp_points": 3, "sequences": 4,
                     "topk": 3},
        "downstream": {"tasks": [str(good), str(bad)], "bootstrap_iters": 100},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": path, "out": root / "out"}


@pytest.fixture(scope="module")
def first(study):
    code = study_main(["--config", str(study["config"]), "--no-progress"])
    return code


def test_first_call_trains_evaluates_analyses_and_reports(study, first):
    out = study["out"]
    assert first == 1                                   # the malformed task file is a problem
    for scale in ("t32", "t64"):
        for method in ("adamw", "galore"):
            run = out / scale / method
            assert (run / "checkpoints" / "4").is_dir()
            res = json.loads((run / "downstream" / "step_4.json").read_text())
            assert set(res["tasks"]) == {"words"}
    report = out / "analysis" / "report.html"
    html = report.read_text()
    payload = json.loads((out / "analysis" / "metrics.json").read_text())
    names = {r["name"] for r in payload["runs"]}
    assert names == {"t32/adamw", "t32/galore", "t64/adamw", "t64/galore"}
    problems = payload["problems"]
    assert sum("broken.jsonl" in p for p in problems) == 1
    assert any("line 2" in p for p in problems if "broken.jsonl" in p)
    # the claims, each with a verdict
    statuses = {f["claim"][:40]: f["status"] for f in payload["findings"]}
    assert len(statuses) >= 6
    assert set(statuses.values()) <= {"reproduced", "not reproduced", "partly reproduced",
                                      "not testable"}
    assert any(c.startswith("Full rank is sharper") for c in statuses)
    # four runs, nine features: one line says so, the table is still there
    assert payload["predictor"]["note"].count("Fewer runs than the 11") == 1
    assert "Figure 5" in html and "Scale t32" in html and "Scale t64" in html
    # the downstream table has every run
    rows = [r for r in payload["rows"] if r["metric"] == "downstream_mean"]
    assert {r["run"] for r in rows} == names


def test_report_opens_in_chromium(study, first):
    report = study["out"] / "analysis" / "report.html"
    probe = open_in_browser(report)
    images = report.read_text().count("<img ")
    assert images >= 20
    assert probe["images"] == images
    assert probe["bad"] == [] and probe["errors"] == [] and probe["console"] == []


def test_second_call_skips_finished_work_and_resumes_an_interrupted_run(study, first, capsys):
    out = study["out"]
    interrupted = out / "t64" / "galore"
    shutil.rmtree(interrupted / "checkpoints" / "4")     # the run stopped after step 2
    (interrupted / "checkpoint_manifests" / "4.json").unlink(missing_ok=True)
    capsys.readouterr()
    code = study_main(["--config", str(study["config"]), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1
    assert printed.count("finished, skipped") == 3
    assert "t64/galore (resuming)" in printed
    assert (interrupted / "checkpoints" / "4").is_dir()
    # its step-4 results predate the new checkpoint: evaluated again; the others are not
    assert "[eval] t32: every run already evaluated, skipped" in printed
    assert "[eval] t64: lowrank-eval on 1 run(s)" in printed


def test_lm_eval_tasks_are_imported_as_downstream_results(study, first, monkeypatch, tmp_path):
    """The config's ``lm_eval_tasks`` run through lm-evaluation-harness with our model (offline,
    a task over the study's local JSONL file) and land in the run's downstream results, with
    the accuracy lowrank-eval gives on the same questions."""
    import dataclasses

    import lm_eval  # noqa: F401  (a CI extra: a missing one fails here, never skips)

    from analysis.downstream import read_downstream
    from analysis.study.config import load_study
    from analysis.study.runner import evaluate_lm_eval

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "words_mc.yaml").write_text(
        "task: words_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {study['root'] / 'words.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\n"
        "doc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                       "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false",
                       "DISABLE_MULTIPROC": "1"}.items():
        monkeypatch.setenv(key, value)
    base = load_study(study["config"])
    spec = dataclasses.replace(base, downstream={
        **base.downstream, "lm_eval_tasks": ["words_mc"], "lm_eval_include_path": str(tasks_dir),
        "batch_size": 8})
    run = study["out"] / "t32" / "adamw"
    said: list[str] = []
    assert evaluate_lm_eval(spec, "t32", [run], said.append) == []
    assert said == ["[lm-eval] t32/adamw: words_mc"]
    got = read_downstream(run)[4]["tasks"]
    assert got["words_mc"]["source"] == "lm-eval" and got["words_mc"]["n"] == 24
    assert got["words_mc"]["acc"] == pytest.approx(got["words"]["acc"], abs=1e-9)
    assert got["words_mc"]["acc_norm"] == pytest.approx(got["words"]["acc_norm"], abs=1e-9)
    # done once: a second call finds the results and runs nothing
    assert evaluate_lm_eval(spec, "t32", [run], said.append) == [] and len(said) == 1
