"""The settings of an analysis: landscape grid, directions, interpolation, thresholds.

Every unit of work declares which of them its result depends on (its cache key
holds only those, see :class:`analysis.units.base.Unit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DOWNSTREAM_METRICS", "PCA_GRIDS", "PERTURB", "SPECTRA_OF", "TOPK_STEPS", "Settings"]

PERTURB = ("all", "trainable")
PCA_GRIDS = ("centered", "reference")
TOPK_STEPS = ("all", "final")
SPECTRA_OF = ("dense", "stored")
DOWNSTREAM_METRICS = ("headline", "acc")


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
      perturb: which model variables the random and top-k directions perturb:
        ``"all"`` (default: every floating-point variable, the trainable parameters and the
        frozen ones such as ReLoRA's base kernel, as the reference perturbs every
        ``named_parameters()`` tensor) or ``"trainable"`` (the ``nnx.Param`` s only).
      topk: components ``k = 1..topk`` of the "top-k PCA" landscapes (0: none; the paper 20).
      pca_grid: grid of the top-k landscapes, ``"centered"`` (default,
        :data:`lowrank_jax.metrics.PCA_ALPHAS_CENTERED`, alpha = 0 at the centre) or
        ``"reference"`` (:data:`lowrank_jax.metrics.PCA_ALPHAS_REFERENCE`, 26 points without
        alpha = 0, read at index 13 as the reference does).
      topk_steps: ``"all"`` checkpoints (default) or only the ``"final"`` one of each run.
      spectra_of: ``"dense"`` (default: dense-equivalent weights of LoRA/ReLoRA/SLTrain) or
        ``"stored"`` (the matrices as stored: factors, ReLoRA's frozen base; the reference's).
      downstream_metric: the per-task accuracy the report and the predictor read from
        ``lowrank-eval`` results: ``"headline"`` (each task's own headline metric) or
        ``"acc"`` (the paper's).
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
    perturb: str = "all"
    topk: int = 20
    pca_grid: str = "centered"
    topk_steps: str = "all"
    spectra_of: str = "dense"
    downstream_metric: str = "headline"

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
        choices = {"perturb": PERTURB, "pca_grid": PCA_GRIDS, "topk_steps": TOPK_STEPS,
                   "spectra_of": SPECTRA_OF, "downstream_metric": DOWNSTREAM_METRICS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name.replace('_', '-')} must be one of "
                                 f"{', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0 (0: no top-k landscapes), got {self.topk}")

    @property
    def alphas(self) -> np.ndarray:
        """``(alpha_points,)`` float32 grid, centre at index ``alpha_points // 2``."""
        return np.linspace(-self.alpha_max, self.alpha_max, self.alpha_points).astype(np.float32)

    @property
    def centre(self) -> int:
        """Index of alpha = 0 in :attr:`alphas`."""
        return self.alpha_points // 2

    @property
    def pca_alphas(self) -> np.ndarray:
        """The top-k landscapes' grid (:attr:`pca_grid`), float32."""
        from lowrank_jax.metrics import PCA_ALPHAS_CENTERED, PCA_ALPHAS_REFERENCE

        grid = PCA_ALPHAS_REFERENCE if self.pca_grid == "reference" else PCA_ALPHAS_CENTERED
        return np.asarray(grid, np.float32)

    @property
    def pca_centre(self) -> int:
        """Where the top-k sharpness is read: ``len(grid) // 2`` (alpha = 0 on the centred
        grid, alpha = +0.002 on the reference's)."""
        from lowrank_jax.metrics import reference_center_index

        return reference_center_index(len(self.pca_alphas))


