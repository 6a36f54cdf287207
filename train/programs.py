"""The compiled programs the training loop drives: one run, or a vmapped group of seeds.

Both expose the same small interface, so :func:`train.loop.train` is one loop:
a single run is a group of one.

* :class:`SingleProgram` - one run with the trainer's own jitted (sharded) step,
  evaluation and ReLoRA reset;
* :class:`VmappedProgram` - ``n`` runs (seeds) with ``jax.vmap`` of the same
  pure functions over the stacked train states and batches. Seed ``k`` ends
  bit-identical to the same seed trained alone (``tests/test_train_seeds.py``).

A program's ``state`` is one :class:`~train.step.TrainState` (stacked along a
new leading axis for a group); :meth:`members` gives each run's own state and
:meth:`split` each run's share of host values.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from train.prepare import Run

__all__ = ["Program", "SingleProgram", "VmappedProgram", "make_program", "stack", "unstack"]

Batch = dict[str, jax.Array]


def stack(trees: list[Any]) -> Any:
    """Stack equally shaped pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list[Any]:
    """Inverse of :func:`stack`."""
    return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(n)]


def _val_stats(total: float, tokens: float) -> dict[str, float]:
    loss = float(total / max(tokens, 1.0))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


class Program(Protocol):
    """What the loop needs from the compiled functions of its runs."""

    runs: list[Run]

    def initial_state(self) -> Any: ...
    def next_batch(self) -> Batch: ...
    def step(self, state: Any, batch: Batch) -> tuple[Any, dict[str, jax.Array]]: ...
    def reset(self, state: Any) -> Any: ...
    def evaluate(self, state: Any) -> list[dict[str, float]]: ...
    def members(self, state: Any) -> list[Any]: ...
    def split(self, host_tree: Any) -> list[Any]: ...


class _Batches:
    """Each run's training batches in order, its prefetched first batch first."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        self.firsts = [r.first_batch for r in runs]

    def next(self) -> list[dict[str, np.ndarray]]:
        out = []
        for k, r in enumerate(self.runs):
            out.append(self.firsts[k] if self.firsts[k] is not None else next(r.train_it))
            self.firsts[k] = None
        return out


class SingleProgram:
    """One run: the trainer's jitted, sharded step (see :func:`train.step.build_trainer`)."""

    def __init__(self, run: Run):
        self.runs = [run]
        self.trainer = run.trainer
        self._batches = _Batches(self.runs)

    def initial_state(self) -> Any:
        return self.runs[0].state

    def next_batch(self) -> Batch:
        return self.trainer.put_batch(self._batches.next()[0])

    def step(self, state: Any, batch: Batch) -> tuple[Any, dict[str, jax.Array]]:
        return self.trainer.step(state, batch)

    def reset(self, state: Any) -> Any:
        return self.trainer.reset(state)

    def evaluate(self, state: Any) -> list[dict[str, float]]:
        """Token-weighted mean loss over the run's validation batches (and its exp)."""
        total, tokens = 0.0, 0.0
        for batch in self.runs[0].val_batches:
            aux = jax.device_get(self.trainer.eval_step(state.params, state.model_state,
                                                        self.trainer.put_batch(batch)))
            total += float(aux["sum_loss"])
            tokens += float(aux["num_tokens"])
        return [_val_stats(total, tokens)]

    def members(self, state: Any) -> list[Any]:
        return [state]

    def split(self, host_tree: Any) -> list[Any]:
        return [host_tree]


class VmappedProgram:
    """``n`` runs of one config as one ``jax.vmap``-ed program over stacked states."""

    def __init__(self, runs: list[Run]):
        self.runs = runs
        tr = runs[0].trainer
        self._step = jax.jit(jax.vmap(tr.step_fn), donate_argnums=0)
        self._eval = jax.jit(jax.vmap(tr.eval_fn))
        self._reset = (jax.jit(jax.vmap(tr.reset_fn), donate_argnums=0)
                       if tr.reset_fn is not None else None)
        self._batches = _Batches(runs)

    def initial_state(self) -> Any:
        return stack([r.state for r in self.runs])

    def next_batch(self) -> Batch:
        batches = self._batches.next()
        return {key: jnp.stack([b[key] for b in batches]) for key in batches[0]}

    def step(self, state: Any, batch: Batch) -> tuple[Any, dict[str, jax.Array]]:
        return self._step(state, batch)

    def reset(self, state: Any) -> Any:
        return self._reset(state)

    def evaluate(self, state: Any) -> list[dict[str, float]]:
        """Per run: token-weighted mean loss over its validation batches (and its exp)."""
        n = len(self.runs)
        totals, tokens = np.zeros(n), np.zeros(n)
        for i in range(len(self.runs[0].val_batches)):
            batch = {key: jnp.stack([r.val_batches[i][key] for r in self.runs])
                     for key in self.runs[0].val_batches[i]}
            aux = jax.device_get(self._eval(state.params, state.model_state, batch))
            totals += np.asarray(aux["sum_loss"], np.float64)
            tokens += np.asarray(aux["num_tokens"], np.float64)
        return [_val_stats(t, c) for t, c in zip(totals, tokens)]

    def members(self, state: Any) -> list[Any]:
        return unstack(state, len(self.runs))

    def split(self, host_tree: Any) -> list[Any]:
        return [jax.tree.map(lambda x, k=k: x[k], host_tree) for k in range(len(self.runs))]


def make_program(runs: list[Run]) -> Program:
    """:class:`SingleProgram` for one run, :class:`VmappedProgram` for several."""
    return SingleProgram(runs[0]) if len(runs) == 1 else VmappedProgram(runs)
