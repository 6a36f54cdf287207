"""Subspace overlap of projector bases over time (SARA's frozen-subspace diagnostic).

``overlap(U, V) = ||U^T V||_F^2 / r`` for orthonormal bases ``(d, r)``: 1 for the
same subspace, about ``r / d`` for independent random ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from lowrank_jax.state_utils import subspace_overlap


def consecutive_overlaps(bases: Sequence[jax.Array]) -> jax.Array:
    """``overlap(bases[i], bases[i + 1])`` for each ``i``: array ``(len(bases) - 1,)``.

    >>> e = jnp.eye(4)
    >>> consecutive_overlaps([e[:, :2], e[:, :2], e[:, 2:]]).tolist()
    [1.0, 0.0]
    """
    if len(bases) < 2:
        return jnp.zeros((0,), jnp.float32)
    return jnp.stack([subspace_overlap(u, v) for u, v in itertools.pairwise(bases)])


def anchor_overlaps(bases: Sequence[jax.Array], anchor_index: int = 0) -> jax.Array:
    """``overlap(bases[anchor_index], bases[i])`` for every ``i``: array ``(len(bases),)``.

    A curve that stays near 1 means the projector never leaves its first
    subspace (a frozen subspace).

    >>> e = jnp.eye(4)
    >>> anchor_overlaps([e[:, :2], e[:, 1:3]]).tolist()
    [1.0, 0.5]
    """
    anchor = bases[anchor_index]
    return jnp.stack([subspace_overlap(anchor, b) for b in bases])


__all__ = ["anchor_overlaps", "consecutive_overlaps", "subspace_overlap"]
