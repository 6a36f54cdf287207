"""The settings of an analysis: landscape grid, directions, interpolation, thresholds.

Every unit of work declares which of them its result depends on (its cache key
holds only those, see :class:`analysis.units.base.Unit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    """Metric settings (all part of the cache key).

    Attributes:
      directions: random directions per landscape (the paper uses 100).
      alpha_max / alpha_points: the grid ``linspace(-alpha_max, alpha_max, alpha_points)``
        (odd; the paper: 0.003 and 25 points).
      direction_kind: ``"gaussian"`` (the paper's, unnormalised) or ``"filter"`` (Li et al.).
      one_d: 1-D leaves of filter-normalised directions: ``zero``/``keep``/``copy``.
      sequences: validation sequences in the evaluation batch.
      interp_points: points of each interpolation path (the paper: 21).
      threshold: singular values counted above this.
      seed: PRNG seed of the directions (the same directions for every run and step).
      chunk_size / alpha_chunk_size: landscape chunking (memory bound; see
        ``lowrank_jax.metrics.landscape_1d``).
      steps: analyse only these checkpoint steps (``None``: all).
      trajectory_components: components of the trajectory PCA.
    """

    directions: int = 8
    alpha_max: float = 0.003
    alpha_points: int = 13
    direction_kind: str = "gaussian"
    one_d: str = "zero"
    sequences: int = 8
    interp_points: int = 11
    threshold: float = 0.1
    seed: int = 0
    chunk_size: int = 1
    alpha_chunk_size: int = 1
    steps: tuple[int, ...] | None = None
    trajectory_components: int = 2

    def __post_init__(self) -> None:
        if self.alpha_points < 3 or self.alpha_points % 2 == 0:
            raise ValueError(f"alpha_points must be odd and >= 3 (the centre is alpha=0), "
                             f"got {self.alpha_points}")
        if self.directions < 1:
            raise ValueError(f"directions must be >= 1, got {self.directions}")
        if self.interp_points < 3:
            raise ValueError(f"interp_points must be >= 3, got {self.interp_points}")
        if self.sequences < 4:
            raise ValueError(f"sequences must be >= 4 (debiased CKA), got {self.sequences}")
        if self.direction_kind not in ("gaussian", "filter"):
            raise ValueError(f"direction_kind must be 'gaussian' or 'filter', "
                             f"got {self.direction_kind!r}")

    @property
    def alphas(self) -> np.ndarray:
        """``(alpha_points,)`` float32 grid, centre at index ``alpha_points // 2``."""
        return np.linspace(-self.alpha_max, self.alpha_max, self.alpha_points).astype(np.float32)

    @property
    def centre(self) -> int:
        """Index of alpha = 0 in :attr:`alphas`."""
        return self.alpha_points // 2


