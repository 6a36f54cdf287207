"""Projection geometry: which axis of a weight matrix is reduced, and to what rank.

GaLore states its rule on a torch weight ``(out, in) = (m, n)``: ``std`` reduces
the smaller dimension (a right projector when ``m >= n``, so the square case
reduces ``in``); ``reverse_std`` the larger one (square: ``out``); ``left``
always reduces ``out``, ``right`` always ``in``; ``full`` both. A Flax kernel is
``(in, out)``, the transpose, so the same rule is applied to the named
dimensions and then mapped to array axes through ``layout``.
"""

from __future__ import annotations

import dataclasses

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
LAYOUTS = ("flax", "torch")


@dataclasses.dataclass(frozen=True)
class LeafGeometry:
    """How one 2-D leaf is projected.

    Attributes:
      shape: the stored shape ``(a, b)``.
      reduced: the reduced array axes: ``(0,)``, ``(1,)`` or ``(0, 1)``.
      rank: the effective rank (clamped to ``min(a, b)``).
    """

    shape: tuple[int, int]
    reduced: tuple[int, ...]
    rank: int

    @property
    def small_shape(self) -> tuple[int, int]:
        """Shape of the projected gradient (the inner state's shape)."""
        a, b = self.shape
        return (self.rank if 0 in self.reduced else a, self.rank if 1 in self.reduced else b)

    def reduced_size(self, axis: int) -> int:
        """Length of a reduced axis (the ``d`` of its projector)."""
        return self.shape[axis]


def reduced_axes(shape: tuple[int, int], proj_type: str, layout: str) -> tuple[int, ...]:
    """Array axes reduced for a 2-D leaf of ``shape`` stored in ``layout``.

    >>> reduced_axes((512, 1376), "std", "flax")   # kernel (in, out): reduce in
    (0,)
    >>> reduced_axes((1376, 512), "std", "torch")  # weight (out, in): reduce in
    (1,)
    """
    a, b = shape
    out_axis, in_axis = (0, 1) if layout == "torch" else (1, 0)
    m, n = shape[out_axis], shape[in_axis]
    del a, b
    if proj_type == "std":
        side = "in" if m >= n else "out"
    elif proj_type == "reverse_std":
        side = "out" if m >= n else "in"
    elif proj_type == "right":
        side = "in"
    elif proj_type == "left":
        side = "out"
    elif proj_type == "full":
        return (0, 1)
    else:  # validated earlier; kept for direct callers
        raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}")
    return (in_axis,) if side == "in" else (out_axis,)


def leaf_geometry(shape: tuple[int, ...], rank: int, proj_type: str, layout: str) -> LeafGeometry:
    """Geometry of one leaf; the rank is clamped to ``min(shape)``."""
    a, b = shape
    return LeafGeometry((a, b), reduced_axes((a, b), proj_type, layout), min(rank, a, b))
