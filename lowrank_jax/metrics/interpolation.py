"""Linear interpolation between two parameter sets and the barrier on the path.

``B = max_{0<a<1} L((1-a) A + a B) - (L(A) + L(B)) / 2`` on ``num=21`` points
``a = linspace(0, 1, num)``. CCBH applies it to consecutive checkpoints of one
run, IMBH to two methods at the same step (both converted to dense weights).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.metrics.landscape import scalar_loss

PyTree = Any


@partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _interpolate(loss_fn, params_a, params_b, alphas, batch, chunk_size):
    def at(a):
        mixed = jax.tree.map(
            lambda x, y: ((1 - a) * x.astype(jnp.float32) + a * y.astype(jnp.float32)
                          ).astype(jnp.result_type(x)), params_a, params_b)
        return scalar_loss(loss_fn, mixed, batch)

    return jax.lax.map(at, alphas, batch_size=chunk_size)


def interpolate_losses(loss_fn: Callable[..., Any], params_a: PyTree, params_b: PyTree,
                       batch: Any, num: int = 21, chunk_size: int | None = None) -> jax.Array:
    """``L((1 - a) A + a B)`` for ``a = linspace(0, 1, num)``: array ``(num,)``.

    All points run vmapped in one compiled program (in groups of ``chunk_size``
    if given). ``loss_fn(params, batch)`` returns a loss or ``(loss, aux)``.

    >>> import jax.numpy as jnp
    >>> loss = lambda p, b: jnp.sum(p["w"] ** 2)
    >>> interpolate_losses(loss, {"w": jnp.array(-1.0)}, {"w": jnp.array(1.0)}, None, 3).tolist()
    [1.0, 0.0, 1.0]
    """
    alphas = jnp.linspace(0.0, 1.0, num, dtype=jnp.float32)
    chunk = num if chunk_size is None else max(1, min(int(chunk_size), num))
    return _interpolate(loss_fn, params_a, params_b, alphas, batch, chunk)


def barrier_height(losses: Any) -> jax.Array:
    """``max(losses[1:-1]) - (losses[0] + losses[-1]) / 2``; may be negative (no barrier).

    ``losses``: ``(..., num)`` along the path, ``num >= 3``.

    >>> barrier_height(jnp.array([0.0, 1.0, 3.0, 2.0])).item()
    2.0
    """
    losses = jnp.asarray(losses, jnp.float32)
    if losses.shape[-1] < 3:
        raise ValueError("barrier_height needs at least one interior point (num >= 3)")
    return jnp.max(losses[..., 1:-1], axis=-1) - 0.5 * (losses[..., 0] + losses[..., -1])


def consecutive_checkpoint_barriers(loss_fn: Callable[..., Any], checkpoints: Sequence[PyTree],
                                    batch: Any, num: int = 21) -> list[float]:
    """CCBH: the barrier between checkpoints ``i`` and ``i + 1`` of one run (``len - 1`` values).

    Example::

        ccbh = consecutive_checkpoint_barriers(partial(loss_from_state, gd), [p1, p2, p3], batch)
    """
    return [float(barrier_height(interpolate_losses(loss_fn, a, b, batch, num)))
            for a, b in itertools.pairwise(checkpoints)]


def inter_method_barrier(loss_fn: Callable[..., Any], params_method_a: PyTree,
                         params_method_b: PyTree, batch: Any, num: int = 21) -> float:
    """IMBH: the barrier between two methods' dense weights at the same step."""
    return float(barrier_height(interpolate_losses(loss_fn, params_method_a, params_method_b,
                                                   batch, num)))


ccbh = consecutive_checkpoint_barriers
imbh = inter_method_barrier
