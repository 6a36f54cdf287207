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
import logging
import os
from typing import Any

import jax

import lowrank_jax as lj
from rundir.layout import seed_dir
from train.config import TrainConfig
from train.loop import run, train
from train.prepare import Run, prepare

__all__ = ["fits_vmapped", "run_seeds", "seed_config"]

log = logging.getLogger(__name__)


def seed_config(cfg: TrainConfig, k: int) -> TrainConfig:
    """The ordinary single-seed config of seed ``k`` (0-based) of a group."""
    seed = cfg.seed + k
    data_seed = cfg.data_seed if cfg.data_seed is not None else cfg.seed
    return dataclasses.replace(
        cfg, seed=seed, seeds=1, run_dir=str(seed_dir(cfg.run_dir, seed)),
        data_seed=data_seed if cfg.seed_data == "same" else None)


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
        log.info(f"{cfg.seeds} seeds do not fit in memory side by side; training them one "
                 "after the other")
        return [train(r) for r in runs]
    # Seeds restored at different steps catch up alone, then the group goes on together.
    target = max(r.start_step for r in runs)
    for k, r in enumerate(runs):
        if r.start_step < target:
            train(r, until=target)
            runs[k] = prepare(configs[k])
    if target >= cfg.steps:
        return [train(r) for r in runs]
    return train(runs)
