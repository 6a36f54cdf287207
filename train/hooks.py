"""Periodic work of the training loop: each a hook with its own schedule.

A :class:`Hook` (flax's examples use clu's ``PeriodicAction`` for the same job)
says when it is due after an update (:meth:`Hook.due`) and what it does then
(:meth:`Hook.__call__`), reading the loop's :class:`~train.loop.Loop` view:
``loop.step``, ``loop.state``, ``loop.program``, ``loop.runs``,
``loop.write(rows)`` (one metrics line per run) and ``loop.latest`` (the last
value of every logged field). After each update the loop runs the due hooks in
the order of :data:`HOOKS`:

=================  =====================================================  ===========================
hook               when                                                   writes
=================  =====================================================  ===========================
TrainMetrics       every ``log_every`` updates and at the last            loss, lr, grad_norm,
                                                                          tokens_per_s, opt_state_bytes
UpdateWallTime     every ``log_every`` updates and at the last            update_wall_seconds
NonFiniteSteps     every ``log_every`` updates and at the last, when a    nonfinite_skipped,
                   step was not finite; stops the run after               nonfinite_total,
                   ``nonfinite.max_consecutive`` in a row                 nonfinite_updates
ProjectorOverlap   when the optimizer refreshed a projector (low-rank)    overlap_mean, overlap
LazyRefreshSVDs    every ``log_every`` updates and at the last            svds_done, svds_fixed,
                   (Q-GaLore: lazily refreshed projectors)                svds_saved
Evaluation         every ``eval.every`` updates and at the last           val_loss, val_ppl
Checkpointing      every ``checkpoint.every`` updates and at the end      an orbax checkpoint per run
ProgressBar        every update (``progress``, process 0)                 a tqdm bar on stderr
Profiling          ``profile.steps`` updates after ``profile.start``       a jax.profiler trace
=================  =====================================================  ===========================

A hook whose ``pauses_clock`` is true waits for the update to finish and is
left out of the time behind ``tokens_per_s``. A hook ends the run early by raising
:class:`StopTraining`. A field that measures wall-clock
time ends in ``_per_s`` or ``_seconds`` (tests that compare the logs of two runs
leave those out). A new periodic action is one
class here with a ``from_config`` (``None`` when it is off) and its name in
:data:`HOOKS`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import numpy as np

import lowrank_jax as lj
from rundir import layout
from train.config import TrainConfig
from train.finite_guard import NONFINITE
from train.per_layer import LayerwiseState, layerwise_overlaps

if TYPE_CHECKING:
    from train.loop import Loop

__all__ = [
    "EXIT_NONFINITE",
    "HOOKS",
    "Checkpointing",
    "Evaluation",
    "Hook",
    "LazyRefreshSVDs",
    "NonFiniteSteps",
    "Profiling",
    "ProgressBar",
    "ProjectorOverlap",
    "StopTraining",
    "TrainMetrics",
    "UpdateWallTime",
    "default_hooks",
    "periodic",
]


def periodic(step: int, every: int, end: int) -> bool:
    """Due every ``every`` updates (``0``: never) and at update ``end``.

    >>> [s for s in range(1, 8) if periodic(s, 3, 7)]
    [3, 6, 7]
    """
    return bool(every) and step % every == 0 or step == end


#: ``lowrank-train``'s exit status when the run stops on non-finite steps
EXIT_NONFINITE = 3


class StopTraining(Exception):
    """Raised by a hook to end the run early (e.g. too many non-finite steps).

    The loop still ends every hook and closes the logs and checkpoint stores (pending
    saves are finished, so the last checkpoint is intact); ``lowrank-train`` prints
    ``error: <message>`` and exits with ``exit_code``.
    """

    def __init__(self, message: str, exit_code: int = EXIT_NONFINITE):
        super().__init__(message)
        self.exit_code = exit_code


class Hook:
    """A periodic action of the training loop."""

    #: wait for the update and leave this hook out of the tokens/s clock
    pauses_clock: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        """The hook a run's config asks for, or ``None`` when it is switched off."""
        return cls()

    def due(self, loop: Loop) -> bool:
        """Run after update ``loop.step``? (default: every update)."""
        return True

    def begin(self, loop: Loop) -> None:
        """Called once before the first update of the loop."""

    def __call__(self, loop: Loop) -> None:
        """Do the work after update ``loop.step``."""

    def end(self, loop: Loop) -> None:
        """Called once when the loop stops (also after an error)."""


class TrainMetrics(Hook):
    """The train line: loss (mean over the update's micro-batches), lr, gradient norm,
    tokens/s since the last line (all runs of a group together) and optimizer-state bytes."""

    def __init__(self, every: int):
        self.every = every
        self.mark: tuple[float, int] | None = None
        self.state_bytes = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls(cfg.log_every)

    def begin(self, loop: Loop) -> None:
        self.mark = (loop.clock.now(), loop.start)
        self.state_bytes = lj.state_nbytes(loop.runs[0].state.opt_state)

    def due(self, loop: Loop) -> bool:
        return periodic(loop.step, self.every, loop.cfg.steps)

    def __call__(self, loop: Loop) -> None:
        metrics = loop.program.split(jax.device_get(loop.metrics))
        losses = loop.program.split(np.mean(np.stack(jax.device_get(loop.losses)), axis=0))
        now = loop.clock.now()
        tokens = len(loop.runs) * loop.cfg.batch_size * loop.cfg.seq_len
        t0, s0 = self.mark
        tps = (loop.step - s0) * tokens / max(now - t0, 1e-9)
        self.mark = (now, loop.step)
        loop.write([{"loss": float(loss), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                     "tokens_per_s": tps, "opt_state_bytes": self.state_bytes}
                    for loss, m in zip(losses, metrics)])


class UpdateWallTime(Hook):
    """Wall-clock seconds per update since the last line, everything included (evaluation,
    checkpoints, logging), next to ``tokens_per_s``'s training-only clock."""

    def __init__(self, every: int):
        self.every = every
        self.mark = (0.0, 0)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls(cfg.log_every)

    def begin(self, loop: Loop) -> None:
        self.mark = (time.perf_counter(), loop.start)

    def due(self, loop: Loop) -> bool:
        return periodic(loop.step, self.every, loop.cfg.steps)

    def __call__(self, loop: Loop) -> None:
        now, (t0, s0) = time.perf_counter(), self.mark
        self.mark = (now, loop.step)
        loop.write([{"update_wall_seconds": (now - t0) / max(loop.step - s0, 1)}] * len(loop.runs))


class NonFiniteSteps(Hook):
    """Counts the steps whose loss or gradient was not finite (left out of the state by
    :mod:`train.finite_guard`), logs them, and stops the run after
    ``nonfinite.max_consecutive`` of them in a row (:class:`StopTraining`, exit status 3).

    A step is one jitted call (a micro-batch when accumulating). On each log line
    (every ``log_every`` updates and the last) a run that skipped steps since its
    previous line gets ``nonfinite_skipped`` (since that line), ``nonfinite_total``
    (since the run began, carried over a resume) and ``nonfinite_updates`` (the
    updates they belong to). The flags are read one update late, so the host never
    waits for the update it has just dispatched (a stop comes at most one update
    after the streak reached its length); at log lines and the last update all are read.
    """

    def __init__(self, max_consecutive: int, every: int):
        self.max_consecutive = max_consecutive
        self.every = every
        self.pending: list[tuple[int, list[Any]]] = []  # (update, device flags per micro-step)
        self.total: list[int] = []
        self.streak: list[list[int]] = []               # per run: updates of the current streak
        self.since: list[list[int]] = []                # per run: updates skipped since the last line

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls(cfg.nonfinite.max_consecutive, cfg.log_every)

    def begin(self, loop: Loop) -> None:
        n = len(loop.runs)
        self.total = [0] * n
        if loop.start:  # the log was cut back to the restored step already
            for k, run in enumerate(loop.runs):
                totals = [r["nonfinite_total"] for r in layout.read_metrics(run.cfg.run_dir)
                          if "nonfinite_total" in r]
                self.total[k] = int(totals[-1]) if totals else 0
        self.streak = [[] for _ in range(n)]
        self.since = [[] for _ in range(n)]
        self.pending = []

    def _read(self, loop: Loop, entries: list[tuple[int, list[Any]]]) -> None:
        for update, flags in entries:
            per_run = loop.program.split(np.stack(jax.device_get(flags), axis=-1))
            for k, micro in enumerate(per_run):
                for bad in np.asarray(micro, bool).reshape(-1):
                    if bad:
                        self.total[k] += 1
                        self.since[k].append(update)
                        self.streak[k].append(update)
                    else:
                        self.streak[k] = []

    def _write(self, loop: Loop) -> None:
        loop.write([{"nonfinite_skipped": len(since), "nonfinite_total": total,
                     "nonfinite_updates": sorted(set(since))} if since else {}
                    for since, total in zip(self.since, self.total)])
        self.since = [[] for _ in self.since]

    def __call__(self, loop: Loop) -> None:
        self.pending.append((loop.step, [m[NONFINITE] for m in loop.micro_metrics]))
        log_now = periodic(loop.step, self.every, loop.cfg.steps) or loop.step == loop.last
        ready = self.pending if log_now else self.pending[:-1]
        self.pending = self.pending[len(ready):]
        self._read(loop, ready)
        stopped = [k for k, streak in enumerate(self.streak)
                   if self.max_consecutive and len(streak) >= self.max_consecutive]
        if log_now or stopped:
            self._write(loop)
        if stopped:
            k = stopped[0]
            streak = self.streak[k]
            where = f" in {loop.runs[k].cfg.run_dir}" if len(loop.runs) > 1 else ""
            raise StopTraining(
                f"{len(streak)} non-finite steps in a row{where} (NaN or inf loss or gradient, "
                f"updates {streak[0]}-{streak[-1]}; nonfinite.max_consecutive="
                f"{self.max_consecutive}); they left the state unchanged and the last "
                "checkpoint is intact; lower optimizer.lr, set optimizer.grad_clip or check "
                "the data, then start the run again to resume", EXIT_NONFINITE)


class ProjectorOverlap(Hook):
    """At each projector refresh: the subspace overlap of every projected matrix with its
    previous projector (SARA's ``||P_old^T P_new||_F^2 / r``) and their mean.

    Reads the optimizer's own per-leaf "refreshed" flag and the overlaps through the
    library's state reader (:func:`lowrank_jax.refreshed_leaves`,
    :func:`lowrank_jax.projector_overlaps`), so staggered refreshes are seen at whatever
    step they happen; nothing is logged before the second refresh (no valid overlap yet).
    """

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls() if cfg.optimizer.name in lj.LOWRANK_OPTIMIZERS else None

    def _values(self, loop: Loop) -> list[dict[str, float]]:
        opt_state = loop.state.opt_state
        if isinstance(opt_state, LayerwiseState):  # per_layer_update: standard names
            host = jax.device_get(layerwise_overlaps(opt_state))
        else:
            host = jax.device_get(lj.projector_overlaps(opt_state))
        return [{k: float(v) for k, v in d.items()} for d in loop.program.split(host)]

    def due(self, loop: Loop) -> bool:
        return True     # any step may refresh some leaf (staggered schedules)

    def __call__(self, loop: Loop) -> None:
        flags = jax.device_get(lj.refreshed_leaves(loop.state.opt_state))
        fresh = [any(bool(np.any(v)) for v in d.values()) for d in loop.program.split(flags)]
        if not any(fresh):
            return
        rows = []
        for k, values in enumerate(self._values(loop)):
            valid = [v for v in values.values() if v >= 0] if fresh[k] else []
            rows.append({"overlap_mean": float(np.mean(valid)), "overlap": values}
                        if valid else {})
        loop.write(rows)


class LazyRefreshSVDs(Hook):
    """SVDs of the lazily refreshed projectors (Q-GaLore) so far, summed over the matrices:
    ``svds_done``, ``svds_fixed`` (what a fixed-period refresh would have done over the same
    updates) and ``svds_saved`` (the difference), read with
    :func:`lowrank_jax.lazy_refresh_counts`. On for the aliases in :attr:`optimizers`;
    quiet when the state holds no such projector.
    """

    #: aliases whose projectors refresh lazily
    optimizers: ClassVar[tuple[str, ...]] = ("qgalore_adamw8bit",)

    def __init__(self, every: int):
        self.every = every
        self.active = True

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls(cfg.log_every) if cfg.optimizer.name in cls.optimizers else None

    def begin(self, loop: Loop) -> None:
        self.active = bool(lj.lazy_refresh_counts(loop.runs[0].state.opt_state))

    def due(self, loop: Loop) -> bool:
        return self.active and periodic(loop.step, self.every, loop.cfg.steps)

    def __call__(self, loop: Loop) -> None:
        counts = lj.lazy_refresh_counts(loop.state.opt_state)
        host = jax.device_get({name: (c.done, c.fixed) for name, c in counts.items()})
        rows = []
        for per_run in loop.program.split(host):
            done = sum(int(d) for d, _ in per_run.values())
            fixed = sum(int(f) for _, f in per_run.values())
            rows.append({"svds_done": done, "svds_fixed": fixed, "svds_saved": fixed - done})
        loop.write(rows)


class Evaluation(Hook):
    """Validation loss and perplexity on the run's fixed validation batches."""

    pauses_clock = True

    def __init__(self, every: int):
        self.every = every

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls(cfg.eval.every) if cfg.eval.every else None

    def due(self, loop: Loop) -> bool:
        return bool(loop.runs[0].val_batches) and periodic(loop.step, self.every, loop.cfg.steps)

    def __call__(self, loop: Loop) -> None:
        loop.write(loop.program.evaluate(loop.state))


class Checkpointing(Hook):
    """An orbax checkpoint of every run (state, data position, config) at the loop's end
    and every ``checkpoint.every`` updates."""

    pauses_clock = True

    def __init__(self, every: int):
        self.every = every

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls(cfg.checkpoint.every)

    def due(self, loop: Loop) -> bool:
        return periodic(loop.step, self.every, loop.last)

    def __call__(self, loop: Loop) -> None:
        for run, state, config in zip(loop.runs, loop.program.members(loop.state),
                                      loop.configs):
            run.store.save(loop.step, state, run.train_it.get_state(), config)


class ProgressBar(Hook):
    """A tqdm bar over the updates on stderr, with the latest loss and tokens/s."""

    def __init__(self) -> None:
        self.bar: Any = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        return cls() if cfg.progress and jax.process_index() == 0 else None

    def begin(self, loop: Loop) -> None:
        from tqdm import tqdm

        n = len(loop.runs)
        self.bar = tqdm(total=loop.cfg.steps, initial=loop.start,
                        desc="train" if n == 1 else f"train x{n} seeds", dynamic_ncols=True,
                        file=sys.stderr)

    def __call__(self, loop: Loop) -> None:
        if "loss" in loop.written:
            loss = float(np.mean([latest["loss"] for latest in loop.latest]))
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{loop.latest[0]['tokens_per_s']:,.0f}")
        self.bar.update(1)

    def end(self, loop: Loop) -> None:
        if self.bar is not None:
            self.bar.close()


class Profiling(Hook):
    """A ``jax.profiler`` trace of updates ``start + 1 .. start + steps`` (TensorBoard/Perfetto)."""

    def __init__(self, start: int, steps: int, directory: str | None):
        self.start, self.steps, self.directory = start, steps, directory
        self.tracing = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Hook | None:
        p = cfg.profile
        return cls(p.start, p.steps, p.dir) if p.steps else None

    def due(self, loop: Loop) -> bool:
        return loop.step in (self.start, self.start + self.steps) or (
            self.tracing and loop.step == loop.last)

    def __call__(self, loop: Loop) -> None:
        if self.tracing:
            jax.block_until_ready(loop.state)
            jax.profiler.stop_trace()
            self.tracing = False
        elif loop.step == self.start:
            directory = self.directory or str(Path(loop.cfg.run_dir) / layout.PROFILE)
            jax.block_until_ready(loop.state)
            jax.profiler.start_trace(directory)
            self.tracing = True

    def begin(self, loop: Loop) -> None:
        if loop.start == self.start == 0:
            self(loop)

    def end(self, loop: Loop) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


#: the hooks of every run, in the order they run after an update
HOOKS: tuple[type[Hook], ...] = (TrainMetrics, UpdateWallTime, NonFiniteSteps, ProjectorOverlap,
                                 LazyRefreshSVDs, Evaluation, Checkpointing, ProgressBar, Profiling)


def default_hooks(cfg: TrainConfig) -> list[Hook]:
    """The hooks ``cfg`` switches on, in :data:`HOOKS` order."""
    return [hook for cls in HOOKS if (hook := cls.from_config(cfg)) is not None]
