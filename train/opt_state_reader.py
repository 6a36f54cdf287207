"""The library's public reader of optimizer state, or a stand-in until it lands.

REMOVE THIS MODULE once ``lowrank_jax`` exports ``projector_bases``,
``projector_overlaps`` and ``refreshed_leaves``: import them from ``lowrank_jax``
in its users (``train/hooks.py``, ``analysis/units/consecutive.py``) and drop
:func:`may_have_refreshed`.

Until then the stand-ins derive bases and overlaps from
``lowrank_jax.find_lowrank_states`` (names ``layers/0/attn/q_proj/kernel``,
prefixed ``<i>:`` when an optimizer holds several low-rank states), and
:func:`refreshed` is ``None``: the optimizer has no "refreshed" flag, so the
telemetry falls back to the refresh schedule (:func:`may_have_refreshed`).
"""

from __future__ import annotations

from typing import Any

import jax

import lowrank_jax as lj
from lowrank_jax.tree_util import path_string

__all__ = ["may_have_refreshed", "projector_bases", "projector_overlaps", "refreshed"]


def _named_leaves(trees: list[Any]) -> list[tuple[str, Any]]:
    out = []
    for i, tree in enumerate(trees):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = path_string(path).removesuffix("/value")
            out.append((f"{i}:{name}" if len(trees) > 1 else name, leaf))
    return out


def _projector_bases(opt_state: Any) -> dict[str, tuple[jax.Array, ...]]:
    """``{param path: (basis (d, r),)}`` of every 2-D projector in the state."""
    states = lj.find_lowrank_states(opt_state)
    return {name: (leaf,) for name, leaf in _named_leaves([s.projector for s in states])
            if getattr(leaf, "ndim", 0) == 2}


def _projector_overlaps(opt_state: Any) -> dict[str, jax.Array]:
    """``{param path: overlap of the last two projectors}`` (``-1`` before the second refresh)."""
    states = lj.find_lowrank_states(opt_state)
    return dict(_named_leaves([s.overlap for s in states]))


projector_bases = getattr(lj, "projector_bases", _projector_bases)
projector_overlaps = getattr(lj, "projector_overlaps", _projector_overlaps)
_refreshed_leaves = getattr(lj, "refreshed_leaves", None)


def refreshed(opt_state: Any) -> dict[str, jax.Array] | None:
    """``{param path: bool}``: refreshed by the last update; ``None`` without the flag."""
    return None if _refreshed_leaves is None else _refreshed_leaves(opt_state)


def may_have_refreshed(step: int, gap: int) -> bool:
    """Without the flag: could update ``step`` (1-based) have refreshed a projector?"""
    if _refreshed_leaves is not None:
        return True
    return (step - 1) % gap == 0 or step % gap == 0
