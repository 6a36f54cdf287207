"""Random 1-D loss landscapes and the statistics "Beyond Perplexity" reads off them.

:func:`landscape_1d` evaluates ``L(theta + alpha * d)`` for a stack of directions
``d`` (leading axis = direction) and a grid of ``alpha`` as one compiled program:
the alphas of a direction are vmapped (in groups of ``alpha_chunk_size``), the
directions are walked by ``lax.map(..., batch_size=chunk_size)``, so at most
``chunk_size * alpha_chunk_size`` parameter copies are live at once.

Reference settings (``DEFAULT_ALPHAS``, ``DEFAULT_NUM_DIRECTIONS``): 25 points
``arange(-0.003, 0.0031, 0.00025)`` and N=100 unnormalised Gaussian directions,
loss averaged over directions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

DEFAULT_ALPHAS = np.arange(-0.003, 0.0031, 0.00025)
DEFAULT_NUM_DIRECTIONS = 100
DEFAULT_CENTER_INDEX = 12


def scalar_loss(loss_fn: Callable[..., Any], params: PyTree, batch: Any) -> jax.Array:
    """``loss_fn(params, batch)``; the first element if it returns ``(loss, aux)``."""
    out = loss_fn(params, batch)
    if isinstance(out, tuple):
        out = out[0]
    return jnp.asarray(out, jnp.float32)


def _shift(params: PyTree, direction: PyTree, alpha: jax.Array) -> PyTree:
    return jax.tree.map(lambda p, d: p + jnp.asarray(alpha, jnp.result_type(p)) * d,
                        params, direction)


@partial(jax.jit, static_argnames=("loss_fn", "chunk_size", "alpha_chunk_size"))
def _landscape(loss_fn, params, directions, alphas, batch, chunk_size, alpha_chunk_size):
    def along(direction):                                  # -> (n_alphas,)
        return jax.lax.map(lambda a: scalar_loss(loss_fn, _shift(params, direction, a), batch),
                           alphas, batch_size=alpha_chunk_size)

    return jax.lax.map(along, directions, batch_size=chunk_size)


def landscape_1d(loss_fn: Callable[..., Any], params: PyTree, directions: PyTree,
                 alphas: Any = DEFAULT_ALPHAS, batch: Any = None,
                 chunk_size: int | None = 1, alpha_chunk_size: int | None = None
                 ) -> jax.Array:
    """Losses ``L(theta + alpha_j d_i)`` as an array ``(n_dirs, n_alphas)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` or ``(loss, aux)``, pure; e.g.
        ``functools.partial(loss_from_state, graphdef)``. It is a static argument
        of the compiled program: reuse the same callable to hit the jit cache.
      params: the centre ``theta`` (``nnx.State`` or nested dict of arrays).
      directions: pytree like ``params`` with a leading direction axis
        (:func:`lowrank_jax.metrics.random_directions`, ``stack_directions``).
      alphas: step sizes ``(n_alphas,)``.
      batch: passed to ``loss_fn`` unchanged.
      chunk_size: directions evaluated together (each with all alphas); ``None``
        means all at once. Peak memory grows with ``chunk_size * alpha_chunk_size``.
      alpha_chunk_size: alphas of one direction evaluated together (vmapped);
        ``None`` means all of them. Smaller chunks trade vectorisation for less
        memory and, on CPU, often for better cache use (see benchmarks/landscape.py).

    >>> import jax, jax.numpy as jnp
    >>> loss = lambda p, b: 0.5 * jnp.sum(p["w"] ** 2)
    >>> dirs = {"w": jnp.eye(2)}                    # two unit directions
    >>> landscape_1d(loss, {"w": jnp.zeros(2)}, dirs, jnp.array([-1.0, 0.0, 2.0])).tolist()
    [[0.5, 0.0, 2.0], [0.5, 0.0, 2.0]]
    """
    n_dirs = jax.tree.leaves(directions)[0].shape[0]
    alphas = jnp.asarray(alphas, jnp.float32)
    chunk = n_dirs if chunk_size is None else max(1, min(int(chunk_size), n_dirs))
    n_alphas = alphas.shape[0]
    a_chunk = (n_alphas if alpha_chunk_size is None
               else max(1, min(int(alpha_chunk_size), n_alphas)))
    return _landscape(loss_fn, params, directions, alphas, batch, chunk, a_chunk)


def expected_sharpness(curve_mean: Any, center_index: int = DEFAULT_CENTER_INDEX,
                       pairs: int | None = None) -> jax.Array:
    """``ES = mean_{m=1..M} [(L(a_{c+m}) + L(a_{c-m})) / 2 - L(a_c)]`` on the mean curve.

    ``curve_mean``: ``(n_alphas,)`` (e.g. ``losses.mean(0)``); ``center_index`` ``c``
    is the ``alpha = 0`` point; ``pairs`` ``M`` defaults to all symmetric pairs,
    ``min(c, n_alphas - 1 - c)``.

    >>> expected_sharpness(jnp.array([4.0, 1.0, 0.0, 1.0, 4.0]), 2).item()
    2.5
    """
    curve = jnp.asarray(curve_mean, jnp.float32)
    n = curve.shape[-1]
    available = min(center_index, n - 1 - center_index)
    m = available if pairs is None else int(pairs)
    if not 1 <= m <= available:
        raise ValueError(f"pairs must be in [1, {available}] for centre {center_index} of {n}")
    offsets = np.arange(1, m + 1)
    sym = 0.5 * (curve[..., center_index + offsets] + curve[..., center_index - offsets])
    return jnp.mean(sym - curve[..., center_index, None], axis=-1)


def direction_variance(curves: Any, ddof: int = 0) -> jax.Array:
    """Mean over grid points of the across-direction variance of ``curves (n_dirs, n_alphas)``.

    All points are averaged, as the reference does (the centre point contributes
    ~0 variance when every direction starts at the same loss).

    >>> direction_variance(jnp.array([[0.0, 1.0], [0.0, 3.0]])).item()
    0.5
    """
    return jnp.mean(jnp.var(jnp.asarray(curves, jnp.float32), axis=0, ddof=ddof))


def centered_profile(curves: Any, center_index: int = DEFAULT_CENTER_INDEX) -> jax.Array:
    """``curves - curves[..., c]``: each curve (``(n_alphas,)`` or ``(n_dirs, n_alphas)``) relative to its centre.

    >>> centered_profile(jnp.array([3.0, 2.0, 5.0]), 1).tolist()
    [1.0, 0.0, 3.0]
    """
    curves = jnp.asarray(curves, jnp.float32)
    return curves - curves[..., center_index, None]
