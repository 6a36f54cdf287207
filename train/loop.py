"""A pre-training run: set up (or resume), train, evaluate, log, checkpoint.

:func:`prepare` does everything that can fail because of the user's input
(config, data path, corpus too short for ``seq_len``, ...) before any training,
so the CLI can turn those errors into one line; :func:`train` then runs the loop.

Steps: ``cfg.steps`` optimizer updates; each update consumes
``optimizer.accumulate`` micro-batches of ``batch_size // accumulate`` sequences
(one jitted call each). ``TrainState.step`` counts micro-steps; logs, evaluation
and checkpoints happen at update boundaries and use the optimizer step
``state.step // accumulate`` (1-based after the update).

ReLoRA (``relora.reset_every > 0``): after update ``k * reset_every`` the jitted
:attr:`Trainer.reset` merges the LoRA factors into the frozen weights before that
step's logging, evaluation and checkpoint, so a checkpoint at a reset step holds
the state after the reset and a resumed run goes on exactly.

Resuming: a run started in a ``run_dir`` that holds checkpoints continues from
the newest readable one (params, optimizer state, PRNG keys, counters and the
data iterator position are all restored), so the continued run is bit-identical
to an uninterrupted one (``tests/test_train_resume.py``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

import lowrank_jax as lj
from train.checkpoint import CheckpointStore
from train.config import ConfigError, TrainConfig, config_to_dict, validate
from train.mesh import initialize_distributed
from train.metrics_log import MetricsLog
from train.step import Trainer, TrainState, build_trainer

__all__ = ["Run", "data_seed", "evaluate", "prepare", "run", "train"]

# Config keys that may change between an interrupted run and its continuation.
_MAY_CHANGE = {"run_dir", "log_every", "eval", "checkpoint", "tensorboard", "progress",
               "data_parallel", "mesh", "steps", "schedule"}
_DATA_MAY_CHANGE = {"cache_dir", "val_batches", "streaming", "max_cached_documents"}


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


def _check_same_run(saved: dict[str, Any] | None, cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse to resume a run directory that holds a different experiment."""
    if not saved:
        return
    now = config_to_dict(cfg)
    diffs = []
    for key in sorted(set(now) | set(saved)):
        if key in _MAY_CHANGE:
            continue
        a, b = saved.get(key), now.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in _DATA_MAY_CHANGE}
            b = {k: v for k, v in b.items() if k not in _DATA_MAY_CHANGE}
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(key)
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


def prepare(cfg: TrainConfig) -> Run:
    """Validate, build the model/optimizer/data, and init or restore the state.

    Raises:
      ConfigError / ValueError / FileNotFoundError / data errors: bad input.
    """
    from train.data import build_batches

    validate(cfg)
    initialize_distributed()  # multi-process jobs only; before any device is touched
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg)
    train_it = build_batches(cfg.data, split="train", seq_len=cfg.seq_len,
                             batch_size=cfg.micro_batch_size, seed=data_seed(cfg))
    vocab = int(train_it.info.get("vocab_size", 0))
    if vocab > trainer.model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab} tokens but model {cfg.model.preset!r} only "
            f"{trainer.model_cfg.vocab_size}; set model.overrides.vocab_size or another tokenizer")
    val = _val_batches(cfg)

    store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint)
    steps = store.all_steps()
    if steps:
        _check_same_run(store.read_config(steps[-1]), cfg, run_dir)
    restored = store.restore_latest(trainer.abstract_state)
    if restored is not None:
        state = restored.state
        train_it.set_state(restored.data)
        start = restored.step
        notes = [f"resumed from step {start} in {run_dir}"]  # fall-backs were printed
        first = None
    else:
        state = trainer.init(jax.random.PRNGKey(cfg.seed))
        start = 0
        notes = []
        # Fetching one batch here surfaces data errors (corpus shorter than seq_len...).
        first = next(train_it)
    return Run(cfg, trainer, state, train_it, val, store, start, first, notes)


def evaluate(trainer: Trainer, state: TrainState, batches: list[dict[str, np.ndarray]]
             ) -> dict[str, float]:
    """``{"val_loss", "val_ppl"}``: token-weighted mean loss over ``batches`` and its exp."""
    total, tokens = 0.0, 0.0
    for batch in batches:
        aux = jax.device_get(trainer.eval_step(state.params, state.model_state,
                                               trainer.put_batch(batch)))
        total += float(aux["sum_loss"])
        tokens += float(aux["num_tokens"])
    loss = total / max(tokens, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def _may_refresh(step: int, gap: int) -> bool:
    """Could the projectors have been refreshed by update ``step`` (1-based)?"""
    return (step - 1) % gap == 0 or step % gap == 0


def _relora_due(step: int, cfg: TrainConfig) -> bool:
    """Is a ReLoRA reset due after update ``step`` (1-based)? Never after the last update."""
    every = cfg.relora.reset_every
    return every > 0 and step % every == 0 and step < cfg.steps


def _log_due(step: int, cfg: TrainConfig) -> bool:
    """Is a train line due after update ``step`` (besides projector refreshes)?"""
    return step % cfg.log_every == 0 or step == cfg.steps


def _eval_due(step: int, cfg: TrainConfig) -> bool:
    """Is an evaluation due after update ``step``?"""
    return bool(cfg.eval.every) and (step % cfg.eval.every == 0 or step == cfg.steps)


def _checkpoint_due(step: int, cfg: TrainConfig, last: int) -> bool:
    """Is a checkpoint due after update ``step`` of a loop that stops at ``last``?"""
    every = cfg.checkpoint.every
    return bool(every and step % every == 0) or step == last


def _progress_bar(cfg: TrainConfig, start: int, desc: str) -> Any:
    """A tqdm bar over the updates (process 0 only), or ``None`` when ``progress`` is off."""
    if not cfg.progress or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, file=sys.stderr)


def train(r: Run, until: int | None = None) -> dict[str, Any]:
    """Run the loop of a prepared run to ``cfg.steps``; returns a summary dict.

    ``until`` stops earlier, after saving a checkpoint at that step (the schedule
    and everything else still follow ``cfg.steps``).
    """
    cfg, tr = r.cfg, r.trainer
    acc = cfg.optimizer.accumulate
    lowrank = cfg.optimizer.name in lj.LOWRANK_OPTIMIZERS
    log = MetricsLog(cfg.run_dir, r.start_step, tensorboard=cfg.tensorboard)
    for note in r.notes:
        print(note, file=sys.stderr, flush=True)
    if lowrank and r.start_step:
        log.prime_overlap(r.state.opt_state)
    opt_bytes = lj.state_nbytes(r.state.opt_state)
    config_dict = config_to_dict(cfg)
    tokens_per_update = cfg.batch_size * cfg.seq_len

    bar = _progress_bar(cfg, r.start_step, "train")

    state = r.state
    first = r.first_batch
    last_eval: dict[str, float] = {}
    last_row: dict[str, Any] = {}
    t_mark, step_mark = time.perf_counter(), r.start_step
    try:
        last = cfg.steps if until is None else min(until, cfg.steps)
        for step in range(r.start_step + 1, last + 1):
            losses, metrics = [], {}
            for _ in range(acc):
                batch = first if first is not None else next(r.train_it)
                first = None
                state, metrics = tr.step(state, tr.put_batch(batch))
                losses.append(metrics["loss"])

            if _relora_due(step, cfg):
                state = tr.reset(state)
                log.write({"step": step, "relora_reset": 1})

            refresh = lowrank and _may_refresh(step, cfg.optimizer.update_proj_gap)
            if _log_due(step, cfg) or refresh:
                overlap = log.overlap_update(state.opt_state) if lowrank else {}
                if _log_due(step, cfg) or overlap:
                    m = jax.device_get(metrics)
                    loss = float(np.mean(jax.device_get(losses)))
                    now = time.perf_counter()
                    tps = (step - step_mark) * tokens_per_update / max(now - t_mark, 1e-9)
                    t_mark, step_mark = now, step
                    last_row = {"step": step, "loss": loss, "lr": float(m["lr"]),
                                "grad_norm": float(m["grad_norm"]), "tokens_per_s": tps,
                                "opt_state_bytes": opt_bytes, **overlap}
                    log.write(last_row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")

            if _eval_due(step, cfg) and r.val_batches:
                last_eval = evaluate(tr, state, r.val_batches)
                log.write({"step": step, **last_eval})
                t_mark = time.perf_counter()  # do not count evaluation in tokens/s

            if _checkpoint_due(step, cfg, last):
                r.store.save(step, state, r.train_it.get_state(), config_dict)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        r.store.close()
        log.close()
    r.state = state
    return {"step": last, "loss": last_row.get("loss"), **last_eval,
            "run_dir": str(Path(cfg.run_dir).absolute())}


def run(cfg: TrainConfig) -> dict[str, Any]:
    """:func:`prepare` then :func:`train`."""
    return train(prepare(cfg))
