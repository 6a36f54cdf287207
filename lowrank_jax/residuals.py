"""Residual rules: what the complement of the projected subspace receives.

``None`` (GaLore) gives it nothing. ``"apollo"`` (Zhu et al. 2024,
zhuhanqing/APOLLO ``apollo_torch/``) replaces the whole update by the raw
gradient scaled channel- or tensor-wise by ``||N|| / ||R||``, with Fira's
limiter. ``"signsgd"`` / ``"sgd"`` (FRUGAL) add the state-free step on the
complement ``G - P P^T G`` (computed in :mod:`lowrank_jax.transform`). ``"fira"`` (Chen et al. 2024, xichen-fy/Fira
``optimizer_torch/fira_adamw.py``) scales the residual gradient by the ratio of
the inner update's norm to the projected gradient's norm, column- or row-wise
along the projected axis, and limits its norm growth between steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class FiraState(NamedTuple):
    """Per-leaf state of the Fira norm-growth limiter."""

    prev_norm: jax.Array  # float32 scalar: ||S_res|| after limiting, last step
    has_prev: jax.Array   # bool scalar


def init_state(residual: str | None):
    """Per-leaf residual state for ``residual`` (``()`` when there is none)."""
    if residual in ("fira", "apollo"):
        return FiraState(jnp.zeros([], jnp.float32), jnp.asarray(False))
    return ()


def fira(g: jax.Array, r: jax.Array, n: jax.Array, s_in: jax.Array, rank_axis: int,
         state: FiraState, gamma: float = 1.01, tiny: float = 1e-8
         ) -> tuple[jax.Array, FiraState]:
    """Fira's scaled residual for one matrix.

    ``phi = ||N||_k / (||R||_k + 1e-8)`` with norms taken along ``rank_axis`` of the
    small matrices (one factor per row for a right projector, per column for a
    left one); ``S = (G - S_in) * phi`` where ``S_in = scale * Back(R)`` (so the
    scale factor is inside, as in the reference); then the limiter: when a
    previous norm exists, ``l = max(||S|| / (prev + 1e-8), gamma) / gamma``,
    ``S /= l`` and ``prev = ||S_before|| / l``; otherwise ``prev = ||S||``.

    Args:
      g: full gradient ``(a, b)``.
      r: projected gradient (small shape).
      n: inner update on ``r`` (small shape), e.g. ``m / (sqrt(v) + eps)``.
      s_in: ``scale * Back(r)``, shape ``(a, b)``.
      rank_axis: axis of the small matrices that has length ``rank``.
      state: the limiter state.

    Returns:
      ``(S_res, new_state)`` with ``S_res`` of shape ``(a, b)`` in float32.
    """
    n32, r32 = n.astype(jnp.float32), r.astype(jnp.float32)
    phi = jnp.linalg.norm(n32, axis=rank_axis, keepdims=True) / (
        jnp.linalg.norm(r32, axis=rank_axis, keepdims=True) + tiny)
    s_res = (g.astype(jnp.float32) - s_in.astype(jnp.float32)) * phi
    norm = jnp.linalg.norm(s_res)
    limiter = jnp.where(state.has_prev,
                        jnp.maximum(norm / (state.prev_norm + tiny), gamma) / gamma, 1.0)
    s_res = s_res / limiter
    return s_res, FiraState((norm / limiter).astype(jnp.float32), jnp.asarray(True))


def apollo(g: jax.Array, r: jax.Array, n: jax.Array, rank_axis: int, state: FiraState,
           scaling: str = "channel", scale: float = 1.0, scale_front: bool = False,
           gamma: float = 1.01, tiny: float = 1e-8) -> tuple[jax.Array, FiraState]:
    """APOLLO's update for one matrix: the raw gradient, rescaled.

    ``s = ||N||_k / (||R||_k + 1e-8)`` with norms over ``rank_axis`` of the small
    matrices (``scaling="channel"``: one factor per index of the kept axis) or
    ``s = ||N||_F / (||R||_F + 1e-8)`` (``"tensor"``); ``U = G * s``. ``sqrt(scale)``
    multiplies ``U`` before the norm-growth limiter when ``scale_front`` and after
    it otherwise; the limiter is Fira's (``l = max(||U|| / (prev + 1e-8), gamma) /
    gamma``, ``U /= l``, ``prev = ||U_before|| / l``; first step: ``prev = ||U||``).

    Args:
      g: full gradient ``(a, b)``.
      r: projected gradient (small shape).
      n: inner update on ``r`` (small shape), e.g. ``m / (sqrt(v) + eps)``.
      rank_axis: axis of the small matrices that has length ``rank``.
      state: the limiter state.

    Returns:
      ``(U, new_state)`` with ``U`` of shape ``(a, b)`` in float32.
    """
    n32, r32 = n.astype(jnp.float32), r.astype(jnp.float32)
    if scaling == "channel":
        s = jnp.linalg.norm(n32, axis=rank_axis, keepdims=True) / (
            jnp.linalg.norm(r32, axis=rank_axis, keepdims=True) + tiny)
    else:
        s = jnp.linalg.norm(n32) / (jnp.linalg.norm(r32) + tiny)
    u = g.astype(jnp.float32) * s
    root = jnp.sqrt(jnp.asarray(scale, jnp.float32))
    if scale_front:
        u = u * root
    norm = jnp.linalg.norm(u)
    limiter = jnp.where(state.has_prev,
                        jnp.maximum(norm / (state.prev_norm + tiny), gamma) / gamma, 1.0)
    u = u / limiter
    if not scale_front:
        u = u * root
    return u, FiraState((norm / limiter).astype(jnp.float32), jnp.asarray(True))
