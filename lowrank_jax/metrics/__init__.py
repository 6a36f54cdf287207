"""Geometry metrics of "Beyond Perplexity" as pure, jit/vmap-friendly functions.

* directions: :func:`gaussian_direction`, :func:`filter_normalized_direction`,
  :func:`rank1_svd_direction`, :func:`rank1_svd_directions`, :func:`svd_factors`,
  :func:`trajectory_pca_directions`,
  :func:`random_directions`, :func:`stack_directions`;
* landscape: :func:`landscape_1d`, :func:`expected_sharpness`,
  :func:`direction_variance`, :func:`centered_profile`;
* top-k landscapes: :data:`PCA_ALPHAS_REFERENCE`, :data:`PCA_ALPHAS_CENTERED`,
  :func:`aggregate_topk`, :func:`reference_center_index`;
* interpolation: :func:`interpolate_losses`, :func:`barrier_height`, CCBH/IMBH;
* spectra: effective/stable rank, gap, counts, :func:`matrix_spectra`; the reference's
  rank table :func:`rank_metrics` / :func:`matrix_rank_metrics`, :func:`update_norms`,
  :func:`layer_means`;
* activations: L2, relative L2, mean norm, cosine, linear CKA, debiased linear CKA,
  :func:`mean_over_layers`;
* subspace: :func:`subspace_overlap`, :func:`consecutive_overlaps`, :func:`anchor_overlaps`.
"""

from lowrank_jax.metrics.activations import (
    cosine_similarity,
    debiased_linear_cka,
    l2_distance,
    linear_cka,
    mean_norm,
    mean_over_layers,
    relative_l2_distance,
)
from lowrank_jax.metrics.directions import (
    filter_normalized_direction,
    gaussian_direction,
    random_directions,
    rank1_svd_direction,
    rank1_svd_directions,
    stack_directions,
    svd_factors,
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
    layer_means,
    layer_of,
    matrix_rank,
    matrix_rank_metrics,
    matrix_spectra,
    rank_metrics,
    singular_value_ratio,
    spectral_gap,
    spectrum_metrics,
    stable_rank,
    top_singular,
    update_norms,
    weight_delta,
)
from lowrank_jax.metrics.subspace import anchor_overlaps, consecutive_overlaps, subspace_overlap
from lowrank_jax.metrics.topk_landscape import (
    DEFAULT_TOPK,
    PCA_ALPHAS_CENTERED,
    PCA_ALPHAS_REFERENCE,
    TOPK_SUBSETS,
    aggregate_topk,
    reference_center_index,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_CENTER_INDEX",
    "DEFAULT_NUM_DIRECTIONS",
    "DEFAULT_TOPK",
    "PCA_ALPHAS_CENTERED",
    "PCA_ALPHAS_REFERENCE",
    "TOPK_SUBSETS",
    "aggregate_topk",
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
    "layer_means",
    "layer_of",
    "linear_cka",
    "matrix_rank",
    "matrix_rank_metrics",
    "matrix_spectra",
    "mean_norm",
    "mean_over_layers",
    "random_directions",
    "rank1_svd_direction",
    "rank1_svd_directions",
    "rank_metrics",
    "reference_center_index",
    "relative_l2_distance",
    "singular_value_ratio",
    "spectral_gap",
    "spectrum_metrics",
    "stable_rank",
    "stack_directions",
    "subspace_overlap",
    "svd_factors",
    "top_singular",
    "trajectory_pca_directions",
    "update_norms",
    "weight_delta",
]
