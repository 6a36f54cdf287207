"""The training loop: updates, then the due hooks; one run or a group of seeds alike.

Steps: ``cfg.steps`` optimizer updates; each update consumes
``optimizer.accumulate`` micro-batches of ``batch_size // accumulate`` sequences
(one jitted call each). ``TrainState.step`` counts micro-steps; the hooks
(:mod:`train.hooks`: logs, evaluation, checkpoints, telemetry, progress bar,
profiling) run at update boundaries with the optimizer step ``loop.step``
(1-based after the update).

ReLoRA (``relora.reset_every > 0``): after update ``k * reset_every`` (not the
last) the jitted reset merges the LoRA factors into the frozen weights before
that step's hooks, so a checkpoint at a reset step holds the state after the
reset and a resumed run goes on exactly.

A single run is a group of one (:class:`~train.programs.SingleProgram`); several
prepared runs of one config that start at the same step train as one vmapped
program (:class:`~train.programs.VmappedProgram`, see :mod:`train.seeds`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from train.config import TrainConfig, config_to_dict
from train.hooks import Hook, default_hooks
from train.metrics_log import MetricsLog
from train.prepare import Run, prepare
from train.programs import Program, make_program

__all__ = ["Loop", "run", "train"]

log = logging.getLogger(__name__)


class Clock:
    """Seconds of training: wall time minus the time hooks paused it."""

    def __init__(self) -> None:
        self.paused = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.paused

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start


class Loop:
    """What the hooks see of a running loop.

    Attributes:
      runs: the prepared runs (one, or the seeds of a group); ``cfg`` the first's config.
      program: the compiled functions (:mod:`train.programs`).
      start / last: the step the loop started from and the step it stops at.
      step: the optimizer step just done (1-based).
      state: the program's train state after that update (stacked for a group).
      metrics / losses: the last micro-step's metrics and every micro-step's loss
        of the update (device values); micro_metrics: every micro-step's metrics.
      latest: per run, the last value of every field written during this loop.
      written: the fields written after the current update.
      configs: per run, the config dict saved with its checkpoints.
      clock: training time (without the hooks that pause it).
    """

    def __init__(self, runs: list[Run], program: Program, last: int):
        self.runs = runs
        self.cfg: TrainConfig = runs[0].cfg
        self.program = program
        self.start = runs[0].start_step
        self.last = last
        self.step = self.start
        self.state = program.initial_state()
        self.metrics: dict[str, jax.Array] = {}
        self.losses: list[jax.Array] = []
        self.micro_metrics: list[dict[str, jax.Array]] = []
        self.latest: list[dict[str, Any]] = [{} for _ in runs]
        self.written: set[str] = set()
        self.configs = [config_to_dict(r.cfg) for r in runs]
        self.clock = Clock()
        self.logs = [MetricsLog(r.cfg.run_dir, self.start, tensorboard=self.cfg.tensorboard)
                     for r in runs]

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``{"step": step, **row}`` to each run's metrics log (empty rows are skipped)."""
        for log_, latest, row in zip(self.logs, self.latest, rows):
            if row:
                log_.write({"step": self.step, **row})
                latest.update(row)
                self.written.update(row)

    def update(self) -> None:
        """One optimizer update (its micro-steps), then a ReLoRA reset if one is due."""
        self.step += 1
        self.written = set()
        self.losses = []
        self.micro_metrics = []
        for _ in range(self.cfg.optimizer.accumulate):
            self.state, self.metrics = self.program.step(self.state, self.program.next_batch())
            self.losses.append(self.metrics["loss"])
            self.micro_metrics.append(self.metrics)
        every = self.cfg.relora.reset_every
        if every > 0 and self.step % every == 0 and self.step < self.cfg.steps:
            self.state = self.program.reset(self.state)
            self.write([{"relora_reset": 1}] * len(self.runs))

    def run_hook(self, hook: Hook) -> None:
        if not hook.pauses_clock:
            hook(self)
            return
        jax.block_until_ready(self.state)   # the update's time counts as training
        with self.clock.pause():
            hook(self)

    def summaries(self) -> list[dict[str, Any]]:
        """Per run: the last step, the last train loss and evaluation, the run directory."""
        out = []
        for r, latest in zip(self.runs, self.latest):
            evals = {k: latest[k] for k in ("val_loss", "val_ppl") if k in latest}
            out.append({"step": self.last, "loss": latest.get("loss"), **evals,
                        "run_dir": str(Path(r.cfg.run_dir).absolute())})
        return out

    def close(self) -> None:
        for r, log_ in zip(self.runs, self.logs):
            r.store.close()
            log_.close()


def train(runs: Run | list[Run], until: int | None = None,
          hooks: list[Hook] | None = None) -> Any:
    """Train prepared run(s) to ``cfg.steps``; returns a summary dict (a list for a list).

    Args:
      runs: one prepared run, or several of one config (the seeds of a group)
        that start at the same step; these train as one vmapped program.
      until: stop earlier, after saving a checkpoint at that step (the schedule
        and everything else still follow ``cfg.steps``).
      hooks: the periodic work (default: :func:`train.hooks.default_hooks`).
    """
    group = [runs] if isinstance(runs, Run) else list(runs)
    cfg = group[0].cfg
    last = cfg.steps if until is None else min(until, cfg.steps)
    loop = Loop(group, make_program(group), last)
    hooks = default_hooks(cfg) if hooks is None else hooks
    for r in group:
        for note in r.notes:
            log.info(note if len(group) == 1 else f"{r.cfg.run_dir}: {note}")
    try:
        for hook in hooks:
            hook.begin(loop)
        while loop.step < last:
            loop.update()
            for hook in hooks:
                if hook.due(loop):
                    loop.run_hook(hook)
    finally:
        for hook in hooks:
            hook.end(loop)
        loop.close()
    for r, state in zip(group, loop.program.members(loop.state)):
        r.state = state
    summaries = loop.summaries()
    return summaries[0] if isinstance(runs, Run) else summaries


def run(cfg: TrainConfig) -> dict[str, Any]:
    """:func:`train.prepare.prepare` then :func:`train`."""
    return train(prepare(cfg))
