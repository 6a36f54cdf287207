"""Geometry metrics of "Beyond Perplexity" as pure, jit/vmap-friendly functions.

* directions: :func:`gaussian_direction`, :func:`filter_normalized_direction`,
  :func:`rank1_svd_direction`, :func:`trajectory_pca_directions`,
  :func:`random_directions`, :func:`stack_directions`;
* landscape: :func:`landscape_1d`, :func:`expected_sharpness`,
  :func:`direction_variance`, :func:`centered_profile`;
* interpolation: :func:`interpolate_losses`, :func:`barrier_height`, CCBH/IMBH;
* spectra: effective/stable rank, gap, counts, :func:`matrix_spectra`;
* activations: L2, cosine, linear CKA, debiased linear CKA;
* subspace: :func:`subspace_overlap`, :func:`consecutive_overlaps`, :func:`anchor_overlaps`.
"""

from lowrank_jax.metrics.activations import (
    cosine_similarity,
    debiased_linear_cka,
    l2_distance,
    linear_cka,
)
from lowrank_jax.metrics.directions import (
    filter_normalized_direction,
    gaussian_direction,
    random_directions,
    rank1_svd_direction,
    stack_directions,
    trajectory_pca_directions,
)
from lowrank_jax.metrics.interpolation import (
    barrier_height,
    ccbh,
    consecutive_checkpoint_barriers,
    imbh,
    inter_method_barrier,
    interpolate_losses,
)
from lowrank_jax.metrics.landscape import (
    DEFAULT_ALPHAS,
    DEFAULT_CENTER_INDEX,
    DEFAULT_NUM_DIRECTIONS,
    centered_profile,
    direction_variance,
    expected_sharpness,
    landscape_1d,
)
from lowrank_jax.metrics.spectra import (
    count_above,
    delta_spectra,
    effective_rank,
    matrix_spectra,
    spectral_gap,
    spectrum_metrics,
    stable_rank,
    top_singular,
    weight_delta,
)
from lowrank_jax.metrics.subspace import anchor_overlaps, consecutive_overlaps, subspace_overlap

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_CENTER_INDEX",
    "DEFAULT_NUM_DIRECTIONS",
    "anchor_overlaps",
    "barrier_height",
    "ccbh",
    "centered_profile",
    "consecutive_checkpoint_barriers",
    "consecutive_overlaps",
    "cosine_similarity",
    "count_above",
    "debiased_linear_cka",
    "delta_spectra",
    "direction_variance",
    "effective_rank",
    "expected_sharpness",
    "filter_normalized_direction",
    "gaussian_direction",
    "imbh",
    "inter_method_barrier",
    "interpolate_losses",
    "l2_distance",
    "landscape_1d",
    "linear_cka",
    "matrix_spectra",
    "random_directions",
    "rank1_svd_direction",
    "spectral_gap",
    "spectrum_metrics",
    "stable_rank",
    "stack_directions",
    "subspace_overlap",
    "top_singular",
    "trajectory_pca_directions",
    "weight_delta",
]
