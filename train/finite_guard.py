"""The non-finite step policy: a step that produced a NaN or an infinity changes nothing.

:func:`guard_step` wraps the pure train step ``(state, batch) -> (state, metrics)``
before it is jitted (or vmapped over seeds), so the check and the choice
between the new and the old state run inside the compiled step, where the old
state is still alive although the caller donated it. A step is *finite* when
its loss, its gradient norm and every floating-point leaf of the new
parameters and the new optimizer state are finite (a gradient whose global norm
overflows float32 counts as non-finite). When it is not:

* with ``skip`` (the default) the returned state is the input state, leaf for
  leaf: parameters, optimizer state (moments, projectors, ``MultiSteps``
  accumulators and every step count, so the learning-rate schedule and the
  projector refreshes do not advance), ``TrainState.step`` (it counts applied
  micro-steps), the PRNG key and the model variables (dropout RNG counts);
* either way the metrics gain ``nonfinite`` (bool): the hook
  :class:`train.hooks.NonFiniteSteps` counts these, logs them and stops the run
  after ``nonfinite.max_consecutive`` in a row.

The unit is one jitted call: with gradient accumulation a non-finite
micro-batch is dropped and the accumulation goes on with the next one. Under
``jax.vmap`` the decision is per seed; on a mesh the reductions are global, so
every device takes the same branch.

>>> import jax.numpy as jnp
>>> from typing import NamedTuple
>>> class S(NamedTuple):
...     params: dict
...     opt_state: tuple
>>> def step(state, batch):
...     p = state.params["w"] - batch
...     return S({"w": p}, ()), {"loss": jnp.sum(p), "grad_norm": jnp.abs(batch)}
>>> guarded = guard_step(step)
>>> s, m = guarded(S({"w": jnp.ones(2)}, ()), jnp.float32(0.5))
>>> s.params["w"].tolist(), bool(m["nonfinite"])
([0.5, 0.5], False)
>>> s, m = guarded(s, jnp.float32(jnp.nan))
>>> s.params["w"].tolist(), bool(m["nonfinite"])
([0.5, 0.5], True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["NONFINITE", "all_finite", "guard_step", "keep_if"]

#: the metrics key of the per-step flag (bool scalar; per seed under vmap)
NONFINITE = "nonfinite"

Step = Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]


def all_finite(*trees: Any) -> jax.Array:
    """bool ``()``: every floating-point leaf of ``trees`` is free of NaN and infinity.

    Integer, boolean and PRNG-key leaves are not checked.

    >>> bool(all_finite({"a": jnp.ones(3)}, jnp.int32(7))), bool(all_finite(jnp.array([1., jnp.inf])))
    (True, False)
    """
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` else ``old``, leaf by leaf (PRNG keys included).

    A select per leaf rather than ``lax.cond``: XLA fuses it into the update that
    produced the leaf, so the guard costs no extra pass over the state.
    """
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def guard_step(step: Step, skip: bool = True) -> Step:
    """``step`` with the non-finite policy (see the module docstring).

    Args:
      step: ``(state, batch) -> (new_state, metrics)``, pure; ``state`` has
        ``params`` and ``opt_state`` attributes and ``metrics`` holds ``loss`` and
        ``grad_norm`` (float scalars).
      skip: return the input state when the step is not finite.

    Returns:
      The wrapped step; its metrics gain ``nonfinite`` (bool scalar).
    """

    def guarded(state: Any, batch: Any) -> tuple[Any, dict[str, jax.Array]]:
        new_state, metrics = step(state, batch)
        finite = all_finite(metrics["loss"], metrics["grad_norm"], new_state.params,
                            new_state.opt_state)
        if skip:
            new_state = keep_if(finite, new_state, state)
        return new_state, {**metrics, NONFINITE: jnp.logical_not(finite)}

    return guarded
