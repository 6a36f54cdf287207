"""Config loading, overrides, validation messages, the schedule, and every YAML in configs/."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    validate,
)
from train.schedule import make_schedule, warmup_cosine

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_roundtrip():
    cfg = config_from_dict({})
    assert isinstance(cfg, TrainConfig)
    assert cfg.optimizer.grad_clip == 1.0 and cfg.schedule.min_lr_ratio == 0.1
    assert cfg.checkpoint.keep == 3 and cfg.checkpoint.async_save
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_are_parsed_and_typed():
    raw = apply_overrides({"optimizer": {"name": "galore_adamw"}},
                          ["optimizer.rank=64", "optimizer.lr=1e-3", "steps=20",
                           "optimizer.kwargs.moments=reset", "model.max_seq_len=null",
                           "checkpoint.async_save=false"])
    cfg = config_from_dict(raw)
    assert cfg.optimizer.rank == 64 and cfg.optimizer.lr == pytest.approx(1e-3)
    assert isinstance(cfg.optimizer.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.optimizer.kwargs == {"moments": "reset"}
    assert cfg.steps == 20 and cfg.model.max_seq_len is None and not cfg.checkpoint.async_save


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.rnak=4"], "unknown config key 'optimizer.rnak'; did you mean 'optimizer.rank'?"),
    (["stpes=4"], "did you mean 'steps'?"),
    (["data.tokeniser=byte"], "did you mean 'data.tokenizer'?"),
    (["steps=ten"], "steps must be an integer, got 'ten'"),
    (["optimizer.lr=fast"], "optimizer.lr must be a number"),
    (["checkpoint.async_save=maybe"], "checkpoint.async_save must be true or false"),
    (["model.preset=llama_9b"], "unknown model preset 'llama_9b'; valid presets: llama_9m"),
    (["optimizer.name=galore"], "unknown optimizer 'galore'; valid optimizers: adamw"),
    (["optimizer.name=galore_adamw", "optimizer.rank=512"],
     "optimizer.rank 512 is too large for preset 'llama_demo'"),
    (["optimizer.name=galore_adamw", "optimizer.kwargs.momentz=keep"],
     "optimizer 'galore_adamw' has no argument 'momentz'; did you mean 'moments'?"),
    (["batch_size=10", "optimizer.accumulate=4"], "not divisible by optimizer.accumulate"),
    (["seq_len=512", "model.max_seq_len=256"], "seq_len 512 is longer than model.max_seq_len"),
    (["data.source=text_dir"], "data.path is required"),
    (["schedule.name=linear"], "unknown schedule 'linear'"),
    (["steps"], "is not of the form key=value"),
])
def test_bad_input_gives_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


def test_rank_limit_is_the_hidden_size():
    validate(config_from_dict({"optimizer": {"name": "sara_adamw", "rank": 128}}))  # hidden 128
    with pytest.raises(ConfigError, match="min dimension 128"):
        validate(config_from_dict({"optimizer": {"name": "sara_adamw", "rank": 129}}))
    validate(config_from_dict({"optimizer": {"name": "adamw", "rank": 10_000}}))  # rank unused


def test_galore_schedule_shape():
    s = warmup_cosine(0.01, total_steps=1000, warmup_steps=100, min_lr_ratio=0.1)
    lrs = np.array([float(s(t)) for t in range(1001)])
    assert lrs[0] == 0.0 and lrs[50] == pytest.approx(0.005)
    assert lrs[100] == pytest.approx(0.01) and lrs.max() == pytest.approx(0.01)
    assert lrs[1000] == pytest.approx(0.001) and lrs[550] == pytest.approx(0.0055)
    assert np.all(np.diff(lrs[100:]) <= 1e-9)
    cfg = config_from_dict({"steps": 200, "optimizer": {"lr": 1.0}})
    assert cfg.warmup_steps == 20 and float(make_schedule(cfg)(20)) == pytest.approx(1.0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_loads(path):
    cfg = load_config(path)
    assert cfg.model.preset.startswith("llama_")
    name = path.stem
    if name.startswith("demo_"):
        assert cfg.model.preset == "llama_demo" and cfg.data.tokenizer == "byte"
        assert cfg.seq_len == 128 and cfg.batch_size == 16
        if cfg.optimizer.name != "adamw":
            gap = 40 if cfg.optimizer.name == "coap_adamw" else 50   # COAP's own interval
            assert (cfg.optimizer.rank, cfg.optimizer.update_proj_gap) == (32, gap)
        if cfg.model.linear != "dense":
            assert cfg.model.overrides["linear_rank"] == 32
    else:
        size, method = name.split("_")[1:3]
        assert cfg.model.preset == f"llama_{size}"
        assert cfg.batch_size == 512 and cfg.seq_len == 256
        assert cfg.steps == {"60m": 10_000, "130m": 20_000, "350m": 60_000,
                             "1b": 100_000, "7b": 150_000}[size]
        assert cfg.schedule.warmup_fraction == 0.1 and cfg.schedule.min_lr_ratio == 0.1
        ranks = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
        arch = {"cola": ("cola", 6e-3), "sltrain": ("sltrain", 3e-3), "lora": ("lora", 1e-3),
                "relora": ("lora", 1e-3), "lost": ("lost", 3e-3)}
        if method in arch:  # architecture methods: AdamW on the method's layers
            linear, lr = arch[method]
            assert cfg.model.linear == linear and cfg.optimizer.name == "adamw"
            assert cfg.model.overrides["linear_rank"] == ranks[size]
            assert cfg.optimizer.lr == lr
            assert (cfg.relora.reset_every > 0) == (method == "relora")
        else:
            assert cfg.optimizer.lr == {"adamw": 1e-3, "qgalore": 1.5e-2}.get(method, 1e-2)
        if method not in arch and method != "adamw":
            assert cfg.optimizer.rank == ranks[size]
            gap = 40 if method == "coap" else (500 if size == "7b" else 200)
            assert cfg.optimizer.update_proj_gap == gap
            fira_big = method == "fira" and size in ("1b", "7b")
            assert cfg.optimizer.scale == (0.0625 if fira_big else 0.25)
        assert cfg.data.source == "tfds" and cfg.data.name == "c4/en"


def _one_update(accumulate: int):
    import jax

    from train.step import build_trainer

    cfg = config_from_dict({
        "model": {"preset": "llama_tiny", "overrides": {"num_layers": 1}},
        "schedule": {"warmup_steps": 0},
        "optimizer": {"name": "galore_adamw", "rank": 8, "update_proj_gap": 4, "lr": 1e-2,
                      "accumulate": accumulate},
        "steps": 10, "batch_size": 8, "seq_len": 16})
    tr = build_trainer(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 17), dtype=np.int32)
    mask = np.ones((8, 16), np.float32)
    state, norms = tr.init(jax.random.PRNGKey(0)), []
    for k in range(accumulate):
        rows = slice(k * 8 // accumulate, (k + 1) * 8 // accumulate)
        state, m = tr.step(state, tr.put_batch({"tokens": tokens[rows], "mask": mask[rows]}))
        norms.append(float(m["grad_norm"]))
    return [np.asarray(x) for x in jax.tree.leaves(state.params)], norms


@pytest.mark.slow
def test_accumulation_equals_the_full_batch():
    """``optimizer.accumulate=2`` (optax.MultiSteps) on two halves == one update on the batch."""
    full, (norm_full,) = _one_update(1)
    acc, norms = _one_update(2)
    assert norms[-1] == pytest.approx(norm_full, rel=1e-5)  # norm of the mean gradient
    for a, b in zip(full, acc):
        np.testing.assert_allclose(a, b, atol=1e-5)
