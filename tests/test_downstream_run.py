"""``lowrank-eval`` and the lm-eval adapter end to end on a tiny trained run (slow).

The lm-eval test needs the ``lm-eval`` extra (CI installs it); without it the test
fails with the install command rather than being skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_support import analysis_run_overrides

from analysis.downstream import mean_accuracy, read_downstream
from analysis.downstream.cli import main as lowrank_eval
from analysis.downstream.source import heldout_documents, open_eval_run
from analysis.downstream.tasks import BUILTIN_TASKS, build_builtin_task
from train.cli import main as train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SENTENCES = [
    "The projector is refreshed every few hundred steps so that it follows the gradient.",
    "Its moments live in the small space and take a fraction of the memory of Adam.",
    "When the rank is large enough the loss matches the full optimizer closely.",
    "A checkpoint holds the parameters, the optimizer state and the data position.",
    "The analysis reads every checkpoint and writes one table of metrics per run.",
    "Sharpness is measured along random directions and along the top singular terms.",
]


def _corpus(directory: Path, docs: int = 12) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for d in range(docs):
        paras = [" ".join(rng.choice(SENTENCES, size=4)) for _ in range(5)]
        (directory / f"doc{d:02d}.txt").write_text("\n\n".join(paras), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("downstream")
    corpus = _corpus(root / "corpus")
    out = root / "run"
    args = [*analysis_run_overrides(root, corpus), "data.val_fraction=0.3",
            "optimizer.name=adamw", "optimizer.lr=0.003", "steps=4", "checkpoint.every=2",
            "seq_len=64", f"run_dir={out}"]
    assert train(args) == 0
    return out


def test_lowrank_eval_builtin_suite_and_jsonl(run_dir, tmp_path, capsys):
    run = open_eval_run(run_dir)
    docs = heldout_documents(run)
    assert docs and all("\0" not in d for d in docs)
    cloze = build_builtin_task("heldout_cloze", docs, max_examples=25)
    task_file = tmp_path / "cloze_copy.jsonl"
    task_file.write_text("".join(json.dumps({"context": e.context, "choices": list(e.choices),
                                             "gold": e.gold}) + "\n" for e in cloze.examples))
    common = ["--max-examples", "25", "--bootstrap-iters", "200", "--batch-size", "8",
              "--no-progress"]
    assert lowrank_eval([str(run_dir), *common, "--steps", "all"]) == 0
    assert lowrank_eval([str(run_dir), "--tasks", str(task_file), *common]) == 0
    results = read_downstream(run_dir)
    assert sorted(results) == [2, 4]
    final = results[4]["tasks"]
    assert sorted(final) == sorted([*BUILTIN_TASKS, "cloze_copy"])       # merged
    assert sorted(results[2]["tasks"]) == sorted(BUILTIN_TASKS)
    for res in final.values():
        assert 0.0 <= res["acc"] <= 1.0 and res["acc_stderr"] >= 0.0
        assert res["n"] <= 25 and res["bootstrap_iters"] == 200
    assert final["heldout_continuation"]["metric"] == "acc_mutual_info"
    assert 0.0 <= final["heldout_continuation"]["acc_mutual_info"] <= 1.0
    # the same questions from a file score exactly as the built-in task
    for key in ("acc", "acc_norm", "n"):
        assert final["cloze_copy"][key] == final["heldout_cloze"][key]
    assert final["cloze_copy"]["fingerprint"] == final["heldout_cloze"]["fingerprint"]
    assert mean_accuracy(results[4], BUILTIN_TASKS) == pytest.approx(
        np.mean([final[t]["acc"] for t in BUILTIN_TASKS]))
    out = capsys.readouterr().out
    assert "heldout_word_order" in out and "step_4.json" in out
    # a missing step is one error line
    assert lowrank_eval([str(run_dir), "--steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint at step 3" in err[0]


def test_seed_group_is_evaluated_per_seed(run_dir, tmp_path):
    group = tmp_path / "galore"
    for s in (0, 3):
        shutil.copytree(run_dir, group / f"seed_{s}",
                        ignore=shutil.ignore_patterns("downstream"))
    assert lowrank_eval([str(group), "--tasks", "heldout_word_order", "--max-examples", "10",
                         "--bootstrap-iters", "50", "--no-progress"]) == 0
    for s in (0, 3):
        got = read_downstream(group / f"seed_{s}")
        assert list(got) == [4] and got[4]["run"] == f"galore/seed_{s}"
    assert not (group / "downstream").exists()


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        pytest.fail("lm-evaluation-harness is not installed; install the extra: "
                    "pip install -e '.[lm-eval]' (CI installs it)")


def test_lm_eval_cli_runs_our_model_on_a_local_json_task(run_dir, tmp_path):
    """``lowrank-lm-eval`` (lm-eval's CLI + our registered model) on a task over local JSON,
    offline; its acc/acc_norm equal lowrank-eval's on the same questions."""
    _require_lm_eval()
    run = open_eval_run(run_dir)
    task = build_builtin_task("heldout_cloze", heldout_documents(run), max_examples=20)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": e.context, "choices": list(e.choices),
                                        "gold": e.gold}) + "\n" for e in task.examples))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "lowrank_mc.yaml").write_text(
        "task: lowrank_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false",
           "DISABLE_MULTIPROC": "1"}
    out_dir = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "analysis.downstream.lm_eval_cli", "--model", "lowrank-jax",
           "--model_args", f"run_dir={run_dir},step=final", "--tasks", "lowrank_mc",
           "--include_path", str(tasks_dir), "--batch_size", "8", "--output_path", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(out_dir.rglob("results_*.json"))
    assert files, proc.stdout[-2000:]
    got = json.loads(files[-1].read_text())["results"]["lowrank_mc"]
    assert lowrank_eval([str(run_dir), "--tasks", str(data), "--no-progress",
                         "--bootstrap-iters", "100"]) == 0
    ours = read_downstream(run_dir)[4]["tasks"]["mc"]
    assert got["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert got["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)
    assert got["acc_stderr,none"] == pytest.approx(ours["acc_stderr_closed_form"], rel=1e-6)
