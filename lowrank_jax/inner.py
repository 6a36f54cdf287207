"""Inner optimizers with the reference implementations' exact formulas.

Any optax transformation that does not need ``params`` can run inside
:func:`lowrank_jax.scale_by_lowrank`; these are the ones needed to reproduce the
GaLore / Fira reference code bit for bit:

* :func:`scale_by_reference_adam` — Adam with ``eps`` added to the
  *uncorrected* ``sqrt(v)`` and the bias correction folded into the step
  (GaLore ``galore_torch/adamw.py``; optax's ``scale_by_adam`` adds eps to the
  corrected root, a difference of ``eps / sqrt(1 - b2^t)``).
* :func:`scale_by_adam_bias_correction` — the step factor
  ``sqrt(1 - b2^t) / (1 - b1^t)`` on its own (Fira applies its residual rule to
  the uncorrected Adam direction, then this factor to the sum).
* :func:`scale_by_reference_adafactor` — Hugging Face Adafactor as GaLore uses
  it (decay rate -0.8, update clipping 1, eps 1e-30, no relative step, no
  parameter scaling, no first moment).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.tree_util import map_unzip

__all__ = [
    "BiasCorrectionState",
    "ReferenceAdafactorState",
    "ScaleByReferenceAdamState",
    "scale_by_adam_bias_correction",
    "scale_by_reference_adafactor",
    "scale_by_reference_adam",
    "scale_by_torch_adam",
]


def _one_minus_power(b, t: jax.Array) -> jax.Array:
    """``1 - b^t`` in float32 without rounding ``b`` first (``-expm1(t log b)``).

    ``b = 0.999`` is not a float32 number; rounding it costs ~1e-5 relative in
    ``1 - b^t`` at small ``t``, so ``log b`` is taken in float64 when ``b`` is a
    Python number (the reference computes these factors in Python floats).
    """
    log_b = math.log(b) if isinstance(b, (int, float)) else jnp.log(jnp.asarray(b, jnp.float32))
    return -jnp.expm1(t * jnp.asarray(log_b, jnp.float32))


def _bias_factor(count: jax.Array, b1: float, b2: float) -> jax.Array:
    """``sqrt(1 - b2^t) / (1 - b1^t)`` for the 1-based step ``t = count``."""
    t = count.astype(jnp.float32)
    return jnp.sqrt(_one_minus_power(b2, t)) / _one_minus_power(b1, t)


class ScaleByReferenceAdamState(NamedTuple):
    """State of :func:`scale_by_reference_adam` (field names as optax's Adam)."""

    count: jax.Array  # int32 scalar, number of updates done
    mu: optax.Updates
    nu: optax.Updates


def scale_by_reference_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, bias_correction: bool = True,
    mu_dtype: Any = None, eps_on_corrected_root: bool = False,
) -> optax.GradientTransformation:
    """Adam as the GaLore/Fira reference computes it.

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``,
    ``u = m / (sqrt(v) + eps)``, times ``sqrt(1-b2^t)/(1-b1^t)`` when
    ``bias_correction``. The sign is that of the gradient (chain a negative
    learning rate after it, as optax does).

    Args:
      b1, b2: moment decay rates.
      eps: added to the uncorrected ``sqrt(v)``.
      bias_correction: fold the bias correction into the step.
      eps_on_corrected_root: torch's ``Adam``/``AdamW`` form instead,
        ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`` (:func:`scale_by_torch_adam`).
      mu_dtype: dtype of the stored first moment (e.g. ``jnp.bfloat16``, as
        ``optax.scale_by_adam``'s ``mu_dtype``); ``None``: the updates' dtype. The
        arithmetic is done in the updates' dtype, the moment rounded when stored.

    Returns:
      An optax ``GradientTransformation``; ``nu`` has the updates' dtype.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_reference_adam()
    >>> u, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> float(u[0])  # sqrt(0.001)/0.1 * 0.1/(sqrt(0.001)+1e-6) at t=1
    0.99996...
    """

    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params):
        zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
        return ScaleByReferenceAdamState(jnp.zeros([], jnp.int32), zeros,
                                         jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m.astype(g.dtype) + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        count = optax.safe_increment(state.count)
        factor = _bias_factor(count, b1, b2) if bias_correction else None

        def direction(m, v):
            if eps_on_corrected_root:
                t = count.astype(jnp.float32)
                bc1 = _one_minus_power(b1, t).astype(m.dtype)
                root_bc2 = jnp.sqrt(_one_minus_power(b2, t)).astype(m.dtype)
                return ((m / bc1) / (jnp.sqrt(v) / root_bc2 + eps)).astype(m.dtype)
            u = m / (jnp.sqrt(v) + eps)
            if factor is not None:
                u = u * factor.astype(u.dtype)
            return u.astype(m.dtype)

        out = jax.tree.map(direction, mu, nu)
        out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, updates)
        if mu_dtype is not None:
            mu = jax.tree.map(lambda m: m.astype(mu_dtype), mu)
        return out, ScaleByReferenceAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        mu_dtype: Any = None) -> optax.GradientTransformation:
    """Adam as ``torch.optim.Adam(W)`` computes it: ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``.

    The same formula as ``optax.scale_by_adam``, with the bias corrections ``1 - b^t``
    computed without rounding ``b`` to float32 first (optax's costs ~1e-5 relative at
    small ``t``, the float32 rounding of 0.999); FRUGAL, the DCT reference and the AdamW
    baselines use this form.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_torch_adam()
    >>> u, _ = tx.update(jnp.array([2.0, -3.0]), tx.init(jnp.zeros(2)))
    >>> [round(float(x), 6) for x in u]
    [1.0, -1.0]
    """
    return scale_by_reference_adam(b1, b2, eps, bias_correction=False, mu_dtype=mu_dtype,
                                   eps_on_corrected_root=True)


class BiasCorrectionState(NamedTuple):
    """State of :func:`scale_by_adam_bias_correction`."""

    count: jax.Array  # int32


def scale_by_adam_bias_correction(b1: float = 0.9, b2: float = 0.999
                                  ) -> optax.GradientTransformation:
    """Multiply updates by ``sqrt(1 - b2^t) / (1 - b1^t)`` (1-based ``t``)."""

    def init_fn(params):
        del params
        return BiasCorrectionState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        factor = _bias_factor(count, b1, b2)
        out = jax.tree.map(lambda u: (u * factor.astype(u.dtype)).astype(u.dtype), updates)
        return out, BiasCorrectionState(count)

    return optax.GradientTransformation(init_fn, update_fn)


class _FactoredMoment(NamedTuple):
    v_row: jax.Array  # shape[:-1] for ndim >= 2, else (1,)
    v_col: jax.Array  # shape[:-2] + shape[-1:] for ndim >= 2, else (1,)
    v: jax.Array      # full shape for ndim < 2, else (1,)


class ReferenceAdafactorState(NamedTuple):
    """State of :func:`scale_by_reference_adafactor`."""

    count: jax.Array  # int32
    moments: optax.Updates  # per leaf _FactoredMoment


def scale_by_reference_adafactor(
    decay_rate: float = -0.8, eps: float = 1e-30, clip_threshold: float | None = 1.0
) -> optax.GradientTransformation:
    """Hugging Face Adafactor as used by GaLore's ``galore_torch/adafactor.py``.

    With ``relative_step=False, scale_parameter=False, beta1=None``: at 1-based
    step ``t``, ``beta2_t = 1 - t^decay_rate``; for matrices the row and column
    means of ``g^2 + eps`` are averaged with ``beta2_t`` and the update is
    ``g * rsqrt(row / mean(row)) * rsqrt(col)``; vectors keep a full second
    moment. The update is then divided by ``max(rms(update) / clip, 1)`` (no clipping
    when ``clip_threshold`` is ``None``: Flora clips after its momentum).
    Computed in float32, returned in the updates' dtype.
    """

    def init_leaf(p):
        if p.ndim >= 2:
            return _FactoredMoment(jnp.zeros(p.shape[:-1], jnp.float32),
                                   jnp.zeros(p.shape[:-2] + p.shape[-1:], jnp.float32),
                                   jnp.zeros((1,), jnp.float32))
        return _FactoredMoment(jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32),
                               jnp.zeros(p.shape, jnp.float32))

    def init_fn(params):
        return ReferenceAdafactorState(jnp.zeros([], jnp.int32), jax.tree.map(init_leaf, params))

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        beta2 = 1.0 - count.astype(jnp.float32) ** decay_rate

        def leaf(g, mom):
            g32 = g.astype(jnp.float32)
            sq = g32 * g32 + eps
            if g.ndim >= 2:
                v_row = beta2 * mom.v_row + (1 - beta2) * jnp.mean(sq, axis=-1)
                v_col = beta2 * mom.v_col + (1 - beta2) * jnp.mean(sq, axis=-2)
                r = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=-1, keepdims=True))
                u = r[..., None] * jax.lax.rsqrt(v_col)[..., None, :] * g32
                new = _FactoredMoment(v_row, v_col, mom.v)
            else:
                v = beta2 * mom.v + (1 - beta2) * sq
                u = jax.lax.rsqrt(v) * g32
                new = _FactoredMoment(mom.v_row, mom.v_col, v)
            if clip_threshold is not None:
                rms = jnp.sqrt(jnp.mean(u * u))
                u = u / jnp.maximum(rms / clip_threshold, 1.0)
            return u.astype(g.dtype), new

        out, moments = map_unzip(leaf, updates, state.moments, n_out=2)
        return out, ReferenceAdafactorState(count, moments)

    return optax.GradientTransformation(init_fn, update_fn)
