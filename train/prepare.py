"""A run ready to train: validated config, model/optimizer/data built, state fresh or restored.

:func:`prepare` does everything that can fail because of the user's input
(config, data path, corpus too short for ``seq_len``, ...) before any training,
so the CLI can turn those errors into one line; :func:`train.loop.train` then
runs the loop. It also writes the resolved config to ``<run_dir>/config.yaml``.

Resuming: a run started in a ``run_dir`` that holds checkpoints continues from
the newest readable one (params, optimizer state, PRNG keys, counters and the
data iterator position are all restored), so the continued run is bit-identical
to an uninterrupted one (``tests/test_train_resume.py``). A directory that holds
a different experiment is refused; settings that do not change what is trained
(logging, evaluation, checkpoint cadence, mesh, ...) may differ.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lowrank_jax as lj
from rundir import layout
from train.checkpoint import CheckpointStore
from train.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_yaml,
    model_config,
    validate,
)
from train.layout import restore_alternatives
from train.mesh import initialize_distributed
from train.step import Trainer, TrainState, build_trainer
from train.user_errors import writable_dir

__all__ = ["Run", "data_seed", "prepare"]

# Config keys that may change between an interrupted run and its continuation.
_MAY_CHANGE = {"run_dir", "log_every", "eval", "checkpoint", "tensorboard", "progress",
               "data_parallel", "mesh", "steps", "schedule", "profile", "nonfinite",
               "per_layer_update"}
_MODEL_MAY_CHANGE = ("scan_layers", "remat")  # the layout: checkpoints convert on restore
_DATA_MAY_CHANGE = {"cache_dir", "val_batches", "streaming", "max_cached_documents"}
_PROJECTION_ONLY = ("rank", "update_proj_gap", "scale")   # unused by other optimizers


@dataclass
class Run:
    """A prepared run (see :func:`prepare`)."""

    cfg: TrainConfig
    trainer: Trainer
    state: TrainState
    train_it: Any
    val_batches: list[dict[str, np.ndarray]]
    store: CheckpointStore
    start_step: int
    first_batch: dict[str, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)


def _experiment(raw: dict[str, Any]) -> dict[str, Any] | None:
    """What a saved config trains: the keys that may not change, the model as built."""
    try:
        cfg = config_from_dict(raw)
        model = dataclasses.asdict(model_config(cfg))
        for key in _MODEL_MAY_CHANGE:
            model.pop(key, None)
    except (ValueError, TypeError):
        return None
    out = {k: v for k, v in config_to_dict(cfg).items() if k not in _MAY_CHANGE}
    out["data"] = {k: v for k, v in out["data"].items() if k not in _DATA_MAY_CHANGE}
    out["model"] = model
    if out["optimizer"]["name"] not in lj.LOWRANK_OPTIMIZERS:
        out["optimizer"] = {k: v for k, v in out["optimizer"].items() if k not in _PROJECTION_ONLY}
    return out


def check_same_run(saved: dict[str, Any] | None, cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume a run directory that holds a different experiment.

    Two configs are the same experiment when they build the same model (overrides
    equal to the preset's defaults count as unset) and agree on every key that
    is not a logging/evaluation/checkpoint/mesh setting; the projection settings
    of an optimizer that does not project are ignored.
    """
    if not saved:
        return
    now, before = _experiment(config_to_dict(cfg)), _experiment(saved)
    if before is None:
        raise ConfigError(f"run_dir {str(run_dir)!r} holds checkpoints whose saved config does "
                          "not parse; use another run_dir or remove it")
    diffs = [key for key in sorted(set(now) | set(before))
             if json.dumps(now.get(key), sort_keys=True, default=str)
             != json.dumps(before.get(key), sort_keys=True, default=str)]
    if diffs:
        raise ConfigError(
            f"run_dir {str(run_dir)!r} holds checkpoints of a different run (differs in: "
            f"{', '.join(diffs)}); use another run_dir or remove it")


def data_seed(cfg: TrainConfig) -> int:
    """Seed of the data order: ``cfg.data_seed``, else ``cfg.seed``."""
    return cfg.seed if cfg.data_seed is None else cfg.data_seed


def _val_batches(cfg: TrainConfig) -> list[dict[str, np.ndarray]]:
    from train.data import build_batches

    if cfg.eval.every == 0:
        return []
    it = build_batches(cfg.data, split="validation", seq_len=cfg.seq_len,
                       batch_size=cfg.micro_batch_size, seed=data_seed(cfg),
                       num_batches=cfg.eval.batches)
    out = list(it)
    if not out:
        raise ConfigError(
            f"the validation split has no complete sequence of seq_len+1={cfg.seq_len + 1} "
            "tokens; lower seq_len or eval.every=0")
    return out


def _write_resolved_config(cfg: TrainConfig, run_dir: Path) -> None:
    if jax.process_index() != 0:
        return
    path = run_dir / layout.CONFIG
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(config_yaml(cfg), encoding="utf-8")
    tmp.replace(path)


def prepare(cfg: TrainConfig) -> Run:
    """Validate, build the model/optimizer/data, and init or restore the state.

    Raises:
      ConfigError / ValueError / FileNotFoundError / data errors: bad input
        (:class:`train.user_errors.UserInputError` for a ``run_dir`` that is a file
        or cannot be written).
    """
    from train.data import build_batches

    validate(cfg)
    run_dir = writable_dir(cfg.run_dir, "run_dir")
    if cfg.profile.steps and cfg.profile.dir:
        writable_dir(cfg.profile.dir, "profile.dir")
    initialize_distributed()  # multi-process jobs only; before any device is touched
    trainer = build_trainer(cfg)
    train_it = build_batches(cfg.data, split="train", seq_len=cfg.seq_len,
                             batch_size=cfg.micro_batch_size, seed=data_seed(cfg))
    vocab = int(train_it.info.get("vocab_size", 0))
    if vocab > trainer.model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab} tokens but model {cfg.model.preset!r} only "
            f"{trainer.model_cfg.vocab_size}; set model.overrides.vocab_size or another tokenizer")
    val = _val_batches(cfg)

    store = CheckpointStore(run_dir / layout.CHECKPOINTS, cfg.checkpoint)
    steps = store.all_steps()
    if steps:
        check_same_run(store.read_config(steps[-1]), cfg, run_dir)
    _write_resolved_config(cfg, run_dir)
    restored = store.restore_latest(
        trainer.abstract_state, lambda: restore_alternatives(cfg, trainer.state_sharding))
    if restored is not None:
        train_it.set_state(restored.data)
        notes = [f"resumed from step {restored.step} in {run_dir}"]  # fall-backs were logged
        return Run(cfg, trainer, restored.state, train_it, val, store, restored.step, None, notes)
    state = trainer.init(jax.random.PRNGKey(cfg.seed))
    # Fetching one batch here surfaces data errors (corpus shorter than seq_len...).
    return Run(cfg, trainer, state, train_it, val, store, 0, next(train_it))
