"""Several seeds of one config as one vmapped program (``lowrank-train ... seeds=N``).

Seed ``k`` of a group is the ordinary run of :func:`seed_config` ``(cfg, k)``:
``seed = cfg.seed + k``, ``run_dir = <cfg.run_dir>/seed_<seed>``, ``seeds = 1``
and, with ``seed_data: same`` (default), ``data_seed = cfg.seed`` so every seed
sees the same batches (``per_seed``: each seed's own data order). Each seed
directory is a normal run: ``lowrank-analyze``, resuming and ``lowrank-train``
on one seed all read it as usual.

The group trains as one jitted step ``jax.vmap``-ed over the stacked train states
(model init, optimizer state and keys per seed) and the stacked batches. Seed
``k`` of a vmapped run is bit-identical to the same seed trained alone
(``tests/test_train_seeds.py``). ``seeds_mode: auto`` falls back to one run after
the other when :func:`fits_vmapped` says the N stacked states and activations
would not fit in memory; ``vmap`` and ``sequential`` force either.

Resuming: every seed restores its newest checkpoint; the group continues from
there when all seeds are at the same step (else each seed catches up alone
first, then the group goes on vmapped).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_jax as lj
from train.config import TrainConfig, config_to_dict
from train.loop import (
    Run,
    _checkpoint_due,
    _eval_due,
    _log_due,
    _may_refresh,
    _progress_bar,
    _relora_due,
    prepare,
    run,
    train,
)
from train.metrics_log import MetricsLog

__all__ = ["fits_vmapped", "run_seeds", "seed_config", "stack", "unstack"]


def seed_config(cfg: TrainConfig, k: int) -> TrainConfig:
    """The ordinary single-seed config of seed ``k`` (0-based) of a group."""
    seed = cfg.seed + k
    data_seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    return dataclasses.replace(
        cfg, seed=seed, seeds=1, run_dir=str(Path(cfg.run_dir) / f"seed_{seed}"),
        data_seed=data_seed if cfg.seed_data == "same" else None)


def stack(trees: list[Any]) -> Any:
    """Stack equally shaped pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    """Inverse of :func:`stack`."""
    return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(n)]


def _available_bytes() -> int:
    """Memory the group may use: the accelerator's limit, or half the host's RAM on CPU."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def fits_vmapped(r: Run, n: int, available: int | None = None) -> bool:
    """Would ``n`` stacked copies of ``r``'s state and activations fit in memory?

    Estimate per seed: the train state (params, optimizer and model state) twice
    (the donated input and the output), gradients, and activations of about
    ``34 * B * L * d`` floats per layer plus the ``B * L * V`` logits.
    """
    state = lj.state_nbytes(r.trainer.abstract_state)
    grads = lj.state_nbytes(r.trainer.abstract_state.params)
    m, c = r.trainer.model_cfg, r.cfg
    tokens = c.micro_batch_size * c.seq_len
    acts = 4 * tokens * (34 * m.hidden_size * m.num_layers + 2 * m.vocab_size)
    need = n * (2 * state + grads + acts)
    return need <= (available if available is not None else _available_bytes())


class _Group:
    """The vmapped programs of a group of prepared runs (one per seed)."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        tr = runs[0].trainer
        self.step = jax.jit(jax.vmap(tr.step_fn), donate_argnums=0)
        self.eval = jax.jit(jax.vmap(tr.eval_fn))
        self.reset = (jax.jit(jax.vmap(tr.reset_fn), donate_argnums=0)
                      if tr.reset_fn is not None else None)

    def next_batch(self, firsts: list[Any]) -> dict[str, jax.Array]:
        batches = []
        for k, r in enumerate(self.runs):
            batches.append(firsts[k] if firsts[k] is not None else next(r.train_it))
            firsts[k] = None
        return {key: jnp.stack([b[key] for b in batches]) for key in batches[0]}

    def evaluate(self, state: Any) -> list[dict[str, float]]:
        n = len(self.runs)
        totals, tokens = np.zeros(n), np.zeros(n)
        for i in range(len(self.runs[0].val_batches)):
            batch = {key: jnp.stack([r.val_batches[i][key] for r in self.runs])
                     for key in self.runs[0].val_batches[i]}
            aux = jax.device_get(self.eval(state.params, state.model_state, batch))
            totals += np.asarray(aux["sum_loss"], np.float64)
            tokens += np.asarray(aux["num_tokens"], np.float64)
        out = []
        for total, count in zip(totals, tokens):
            loss = float(total / max(count, 1.0))
            out.append({"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))})
        return out


def _train_group(runs: list[Run]) -> list[dict[str, Any]]:
    """Train prepared runs that all start at the same step as one vmapped program."""
    cfg = runs[0].cfg
    n, acc = len(runs), cfg.optimizer.accumulate
    lowrank = cfg.optimizer.name in lj.LOWRANK_OPTIMIZERS
    group = _Group(runs)
    start = runs[0].start_step
    logs = [MetricsLog(r.cfg.run_dir, start, tensorboard=cfg.tensorboard) for r in runs]
    for r, log in zip(runs, logs):
        for note in r.notes:
            print(f"{r.cfg.run_dir}: {note}", file=sys.stderr, flush=True)
        if lowrank and start:
            log.prime_overlap(r.state.opt_state)
    opt_bytes = lj.state_nbytes(runs[0].state.opt_state)
    configs = [config_to_dict(r.cfg) for r in runs]
    tokens_per_update = n * cfg.batch_size * cfg.seq_len
    state = stack([r.state for r in runs])
    firsts = [r.first_batch for r in runs]

    bar = _progress_bar(cfg, start, f"train x{n} seeds")
    last_eval: list[dict[str, float]] = [{} for _ in runs]
    last_loss: list[float | None] = [None] * n
    t_mark, step_mark = time.perf_counter(), start
    try:
        for step in range(start + 1, cfg.steps + 1):
            losses = []
            for _ in range(acc):
                state, metrics = group.step(state, group.next_batch(firsts))
                losses.append(metrics["loss"])
            if _relora_due(step, cfg):
                state = group.reset(state)
                for log in logs:
                    log.write({"step": step, "relora_reset": 1})
            refresh = lowrank and _may_refresh(step, cfg.optimizer.update_proj_gap)
            periodic = _log_due(step, cfg)
            if periodic or refresh:
                seeds = unstack(state.opt_state, n) if lowrank else [None] * n
                overlaps = [log.overlap_update(s) if lowrank else {}
                            for log, s in zip(logs, seeds)]
                if periodic or any(overlaps):
                    m = jax.device_get(metrics)
                    loss = np.mean(np.stack(jax.device_get(losses)), axis=0)
                    now = time.perf_counter()
                    tps = (step - step_mark) * tokens_per_update / max(now - t_mark, 1e-9)
                    t_mark, step_mark = now, step
                    for k, log in enumerate(logs):
                        last_loss[k] = float(loss[k])
                        log.write({"step": step, "loss": float(loss[k]), "lr": float(m["lr"][k]),
                                   "grad_norm": float(m["grad_norm"][k]), "tokens_per_s": tps,
                                   "opt_state_bytes": opt_bytes, **overlaps[k]})
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(np.mean(loss)):.4f}", tok_s=f"{tps:,.0f}")
            if _eval_due(step, cfg) and runs[0].val_batches:
                last_eval = group.evaluate(state)
                for log, ev in zip(logs, last_eval):
                    log.write({"step": step, **ev})
                t_mark = time.perf_counter()
            if _checkpoint_due(step, cfg, cfg.steps):
                for r, s, config in zip(runs, unstack(state, n), configs):
                    r.store.save(step, s, r.train_it.get_state(), config)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for r, log in zip(runs, logs):
            r.store.close()
            log.close()
    for r, s in zip(runs, unstack(state, n)):
        r.state = s
    return [{"step": cfg.steps, "loss": last_loss[k], **last_eval[k],
             "run_dir": str(Path(r.cfg.run_dir).absolute())}
            for k, r in enumerate(runs)]


def run_seeds(cfg: TrainConfig) -> list[dict[str, Any]]:
    """Train ``cfg.seeds`` seeds of ``cfg``; one summary dict per seed (in seed order)."""
    configs = [seed_config(cfg, k) for k in range(cfg.seeds)]
    summaries = _run_seeds(cfg, configs)
    return [{**s, "seed": c.seed} for s, c in zip(summaries, configs)]


def _run_seeds(cfg: TrainConfig, configs: list[TrainConfig]) -> list[dict[str, Any]]:
    if cfg.seeds_mode == "sequential":
        return [run(c) for c in configs]
    runs = [prepare(c) for c in configs]
    if cfg.seeds_mode == "auto" and not fits_vmapped(runs[0], len(runs)):
        print(f"{cfg.seeds} seeds do not fit in memory side by side; training them one after "
              "the other", file=sys.stderr, flush=True)
        return [train(r) for r in runs]
    # Seeds restored at different steps catch up alone, then the group goes on together.
    target = max(r.start_step for r in runs)
    for k, r in enumerate(runs):
        if r.start_step < target:
            train(r, until=target)
            runs[k] = prepare(configs[k])
    if target >= cfg.steps:
        return [train(r) for r in runs]
    return _train_group(runs)
