"""``lowrank-study`` bad input: one ``error:`` line naming the key and the fix, exit status 2,
nothing trained (no run directory is created)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from analysis.study.cli import main as study_main
from analysis.study.config import load_study

GOOD = {"name": "t", "base": "base/demo", "overrides": ["steps=4"],
        "scales": {"d128": "presets/llama_demo"}, "methods": ["adamw", "galore"]}


def _write(tmp_path: Path, cfg: dict) -> Path:
    cfg = {**cfg, "out": str(tmp_path / "out")}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _error(tmp_path: Path, capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert study_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return err[0]


def test_good_config_plans_every_run(tmp_path):
    study = load_study(_write(tmp_path, GOOD))
    assert [(r.scale, r.method) for r in study.runs] == [("d128", "adamw"), ("d128", "galore")]
    assert study.runs[1].run_dir == tmp_path / "out" / "d128" / "galore"
    assert study.runs[1].steps == 4 and "seeds=1" in study.runs[1].overrides


def test_missing_config(tmp_path, capsys):
    line = _error(tmp_path, capsys, ["--config", str(tmp_path / "nope.yaml")])
    assert "--config" in line and "nope.yaml" in line


@pytest.mark.parametrize("change, words", [
    ({"methods": ["adamw", "galorre"]}, ["methods.galorre", "unknown method", "galore"]),
    ({"scales": {"big": "presets/llama_9b"}}, ["scales.big", "llama_9b", "configs/presets/"]),
    ({"scales": {"big": {"preset": "presets/llama_demo", "overrides": ["model.preset=nope"]}}},
     ["run big/adamw", "nope"]),
    ({"scales": {"big": {"preset": "presets/llama_demo", "overrides": "hidden=3"}}},
     ["scales.big.overrides", "key=value"]),
    ({"baseline": "full"}, ["baseline", "full"]),
    ({"seeds": 0}, ["seeds", ">= 1"]),
    ({"methdos": ["adamw"]}, ["methdos", "unknown key"]),
    ({"analysis": {"directionz": 3}}, ["analysis", "directionz"]),
    ({"analysis": {"alpha_points": 4}}, ["alpha_points", "odd"]),
    ({"analysis": {"pca_grid": "diagonal"}}, ["pca-grid", "diagonal"]),
    ({"downstream": {"taks": ["builtin"]}}, ["downstream", "taks"]),
    ({"predictor": {"model": "forest"}}, ["predictor.model", "forest"]),
    ({"method_overrides": {"sara": ["steps=3"]}}, ["method_overrides.sara", "methods"]),
])
def test_bad_config_is_one_line(tmp_path, capsys, change, words):
    line = _error(tmp_path, capsys, ["--config", str(_write(tmp_path, {**GOOD, **change}))])
    for w in words:
        assert w in line, (w, line)


def test_not_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("methods: [adamw\nscales: {")
    line = _error(tmp_path, capsys, ["--config", str(path)])
    assert "not valid YAML" in line
