"""Composed configs: ``defaults`` lists, ``${name}`` variables, several ``--config`` files,
logical-axis rules as config data, and which saved configs count as the same run."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import ConfigError, config_from_dict, config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
SCALES = sorted(p.stem for p in (CONFIGS / "presets").glob("llama_*.yaml")
                if p.stem != "llama_demo")


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_merge_in_order_and_own_keys_win(tmp_path):
    _write(tmp_path, "base/a.yaml", "steps: 5\noptimizer: {lr: 0.5, rank: 8}\nseed: 1\n")
    _write(tmp_path, "parts/b.yml", "optimizer: {lr: 0.25}\nseed: 2\n")
    leaf = _write(tmp_path, "leaf.yaml", "defaults: [base/a, parts/b.yml]\nseed: 3\n")
    cfg = load_config(leaf)
    assert (cfg.steps, cfg.optimizer.lr, cfg.optimizer.rank, cfg.seed) == (5, 0.25, 8, 3)


def test_vars_are_substituted_with_their_type_and_can_be_overridden(tmp_path):
    _write(tmp_path, "preset.yaml", "vars: {rank: 16}\n")
    _write(tmp_path, "method.yaml", "optimizer:\n  name: galore_adamw\n  rank: ${rank}\n"
                                    "run_dir: runs/r${rank}\n"  # in flow style, quote it:
                                    "model: {linear: cola, overrides: {linear_rank: '${rank}'}}\n")
    leaf = _write(tmp_path, "leaf.yaml", "defaults: [preset, method]\n")
    cfg = load_config(leaf)
    assert cfg.optimizer.rank == 16 and isinstance(cfg.optimizer.rank, int)
    assert cfg.model.overrides["linear_rank"] == 16 and cfg.run_dir == "runs/r16"
    cfg = load_config(leaf, ["vars.rank=8"])
    assert (cfg.optimizer.rank, cfg.model.overrides["linear_rank"]) == (8, 8)
    cfg = load_config(leaf, ["optimizer.rank=4"])   # a plain override beats the variable
    assert (cfg.optimizer.rank, cfg.model.overrides["linear_rank"]) == (4, 16)
    assert "vars" not in config_to_dict(cfg)


def test_several_config_files_compose_like_a_defaults_list():
    parts = [CONFIGS / "base" / "demo.yaml", CONFIGS / "presets" / "llama_demo.yaml",
             CONFIGS / "methods" / "galore.yaml"]
    composed = load_config(parts, ["run_dir=runs/demo_galore"])
    assert composed == load_config(CONFIGS / "demo_galore.yaml")


@pytest.mark.parametrize("files, message", [
    ({"leaf.yaml": "defaults: [a]\n", "a.yaml": "defaults: [leaf]\n"},
     "list each other in defaults: leaf.yaml -> a.yaml -> leaf.yaml"),
    ({"leaf.yaml": "defaults: [missing]\n"}, "missing.yaml' does not exist"),
    ({"leaf.yaml": "defaults: {a: 1}\n"}, "defaults must be a list of file names"),
    ({"leaf.yaml": "optimizer:\n  rank: ${rnak}\nvars: {rank: 3}\n"},
     "optimizer.rank refers to ${rnak}, which no vars entry defines (defined: rank)"),
    ({"leaf.yaml": "vars: [1, 2]\n"}, "vars must be a mapping"),
    ({"leaf.yaml": "mesh: {rules: {embed: fsdb}}\n"},
     "mesh.rules.embed: unknown mesh axis 'fsdb'"),
])
def test_composition_errors_are_one_line(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path, name, text)
    with pytest.raises((ConfigError, FileNotFoundError)) as err:
        load_config(tmp_path / "leaf.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_with_every_scale(method, scale):
    """A method is one file: it builds at every scale without a file per scale."""
    parts = [CONFIGS / "base" / "c4.yaml", CONFIGS / "presets" / f"{scale}.yaml",
             CONFIGS / "methods" / f"{method}.yaml"]
    extra = ["relora.reset_every=1000"] if method == "relora" else []
    cfg = load_config(parts, extra)
    rank = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512,
            "llama_7b": 1024}[scale]
    assert cfg.model.preset == scale
    if cfg.model.linear != "dense":
        assert cfg.model.overrides["linear_rank"] == rank
    if cfg.optimizer.name != "adamw":
        assert cfg.optimizer.rank == rank


def test_axis_rules_are_config_data_read_by_the_mesh_code():
    """``mesh.rules`` decides how the parameters are split: FSDP over ``embed`` by default,
    replicated when the rule maps ``embed`` to nothing."""
    from jax.sharding import PartitionSpec as P

    from lowrank_jax.sharding import DEFAULT_RULES
    from train.step import build_trainer

    base = {"model": {"preset": "llama_tiny", "overrides": {"num_layers": 1}},
            "mesh": {"fsdp": 2}, "batch_size": 4, "seq_len": 16, "steps": 2}
    default = config_from_dict(base)
    assert {k: tuple(v) if isinstance(v, list) else v
            for k, v in default.mesh.rules.items()} == dict(DEFAULT_RULES)
    q = lambda tr: tr.state_sharding.params["layers"][0]["attn"]["q_proj"]["kernel"].spec
    assert q(build_trainer(default)) == P("fsdp", None)
    rules = {**default.mesh.rules, "embed": None}
    assert q(build_trainer(config_from_dict({**base, "mesh": {"fsdp": 2, "rules": rules}}))) \
        == P(None, None)


def test_same_run_ignores_unused_and_default_valued_settings(tmp_path):
    """Resuming compares the experiment, not the spelling of its config."""
    from train.prepare import check_same_run

    cfg = load_config(CONFIGS / "demo_relora.yaml", ["log_every=5", "eval.every=100"])
    old = config_to_dict(load_config(CONFIGS / "demo_relora.yaml"))
    old["model"]["overrides"] = {"linear_rank": 32}     # lora_alpha, lora_dropout at defaults
    old["optimizer"]["rank"] = 999                       # AdamW does not project
    check_same_run(old, cfg, tmp_path)
    old["model"]["overrides"]["lora_alpha"] = 16.0
    with pytest.raises(ConfigError, match=r"differs in: model\)"):
        check_same_run(old, cfg, tmp_path)
    galore = load_config(CONFIGS / "demo_galore.yaml")
    saved = config_to_dict(galore)
    saved["optimizer"]["rank"] = 16
    with pytest.raises(ConfigError, match=r"differs in: optimizer\)"):
        check_same_run(saved, galore, tmp_path)
