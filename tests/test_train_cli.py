"""``lowrank-train``: bad input gives one ``error:`` line and exit status 2; a tiny run works."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import without_timing

from train.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_corpus")
    for i in range(6):
        (root / f"d{i}.txt").write_text(f"document {i}: " + "some words go here. " * 40)
    return root


def _tiny(corpus: Path, run_dir: Path, cache: Path) -> list[str]:
    return ["model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus}",
            f"data.cache_dir={cache}", "steps=3", "batch_size=2", "seq_len=16",
            "optimizer.name=galore_adamw", "optimizer.rank=4", "optimizer.update_proj_gap=2",
            "log_every=1", "eval.every=3", "eval.batches=1", "checkpoint.every=1",
            "progress=false", f"run_dir={run_dir}"]


@pytest.mark.parametrize("args, message", [
    (["model.preset=llama_9b"], "unknown model preset 'llama_9b'; valid presets: "),
    (["optimizer.name=adam"], "unknown optimizer 'adam'; valid optimizers: adamw, "),
    (["optimizer.rnak=3"], "did you mean 'optimizer.rank'?"),
    (["steps=many"], "steps must be an integer"),
    (["optimizer.name=galore_adamw", "optimizer.rank=4096"], "is too large for preset"),
    (["--config", "configs/does_not_exist.yaml"], "does_not_exist.yaml' does not exist"),
])
def test_config_errors_in_process(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_data_errors_in_process(capsys, corpus, tmp_path):
    missing = tmp_path / "no_such_dir"
    args = _tiny(corpus, tmp_path / "run", tmp_path / "cache")
    assert main([*args, f"data.path={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no_such_dir" in err[0], err

    # seq_len longer than the whole corpus (6 documents of ~830 bytes)
    assert main([*args, "seq_len=20000", "model.max_seq_len=20000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_console_script_error_has_no_traceback(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "train.cli", "optimizer.name=lion"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[0]] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown optimizer 'lion'")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_tiny_run_logs_resumes_and_falls_back(capsys, corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = _tiny(corpus, run_dir, tmp_path / "cache")
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["val_ppl"] > 1
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "opt_state_bytes"):
        assert key in train_rows[0]
    overlaps = [r for r in rows if "overlap" in r]   # refreshes at steps 1 and 3 (gap 2)
    assert [r["step"] for r in overlaps] == [3] and overlaps[0].keys() == {
        "step", "overlap_mean", "overlap"}
    assert rows[-1].keys() == {"step", "val_loss", "val_ppl"}
    resolved = (run_dir / "config.yaml").read_text()   # the resolved config of the run
    assert "rank: 4" in resolved and "preset: llama_tiny" in resolved
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "3").is_dir()

    # Started again: resumes at step 3 and has nothing left to do.
    assert main(args) == 0
    assert "resumed from step 3" in capsys.readouterr().err
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == rows

    # A damaged latest checkpoint: warn, fall back to step 2, redo step 3 identically.
    state_dir = run_dir / "checkpoints" / "3" / "state"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:10])
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "checkpoint at step 3 is unreadable (" in err and "falling back to step 2" in err
    assert "resumed from step 2" in err
    again = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(again) == without_timing(rows)

    # A different experiment in the same run_dir is refused.
    assert main([*args, "optimizer.rank=2"]) == 2
    assert "holds checkpoints of a different run" in capsys.readouterr().err
    for _ in range(3):  # orbax's unawaited read coroutines of the damaged step end here
        gc.collect()


def test_architecture_layers_not_yet_trainable_give_one_line(capsys):
    from train.cli import main

    assert main(["--config", "configs/demo_adamw.yaml", "model.overrides.linear=lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.overrides.linear='lora'") and err.count("\n") == 1


@pytest.mark.slow
def test_a_hook_can_stop_the_run_with_one_line_and_its_exit_code(capsys, corpus, tmp_path,
                                                                 monkeypatch):
    """A hook raising StopTraining ends the run: one ``error:`` line, the hook's exit code,
    the checkpoint of the last step intact (the run resumes from it)."""
    import train.loop
    from train.hooks import Hook, StopTraining, default_hooks

    class StopAtTwo(Hook):
        def due(self, loop):
            return loop.step == 2

        def __call__(self, loop):
            raise StopTraining("2 non-finite updates in a row; see metrics.jsonl", exit_code=3)

    monkeypatch.setattr(train.loop, "default_hooks", lambda cfg: [*default_hooks(cfg),
                                                                  StopAtTwo()])
    run_dir = tmp_path / "run"
    args = [*_tiny(corpus, run_dir, tmp_path / "cache"), "tensorboard=false"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: 2 non-finite updates in a row; see metrics.jsonl"
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [1, 2]
    monkeypatch.setattr(train.loop, "default_hooks", default_hooks)
    assert main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().err
