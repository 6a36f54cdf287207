"""lowrank-jax: low-rank gradient projection optimizers as optax transformations.

>>> import lowrank_jax as lj
>>> tx = lj.galore_adamw(1e-2, rank=128)   # GaLore-AdamW with the reference defaults
"""

from lowrank_jax import block_subspace, projectors, residuals, sharding, steps
from lowrank_jax.adam_mini import scale_by_adam_mini
from lowrank_jax.alias import (
    LOWRANK_OPTIMIZERS,
    OPTIMIZERS,
    adam_mini,
    adamw,
    apollo_adamw,
    apollo_mini,
    dct_adamw,
    fira_adamw,
    flora,
    frugal,
    frugal_projection,
    galore_adafactor,
    galore_adam_mini,
    galore_adamw,
    galore_adamw8bit,
    golore_adamw,
    sara_adamw,
    validate_alias_kwargs,
)
from lowrank_jax.block_subspace import scale_by_block_subspace
from lowrank_jax.clipping import clip_by_global_norm_torch
from lowrank_jax.coap import coap_adamw, scale_by_coap
from lowrank_jax.compressed_momentum import CompressedMomentumState, scale_by_compressed_momentum
from lowrank_jax.grass import grass_adamw
from lowrank_jax.gum import gum_muon, scale_by_gum
from lowrank_jax.inner import (
    scale_by_adam_bias_correction,
    scale_by_reference_adafactor,
    scale_by_reference_adam,
    scale_by_torch_adam,
)
from lowrank_jax.projectors import dct_basis, get_projector
from lowrank_jax.qgalore import LazyRefreshCounts, lazy_refresh_counts, qgalore_adamw8bit
from lowrank_jax.quantized import scale_by_adam_8bit
from lowrank_jax.residuals import (
    ApolloScaling,
    BackProjection,
    FiraResidual,
    ResidualInputs,
    StateFreeResidual,
)
from lowrank_jax.selection import default_lowrank_labels, matrix_labels
from lowrank_jax.state_reader import projector_bases, projector_overlaps, refreshed_leaves
from lowrank_jax.state_utils import find_lowrank_states, state_nbytes, subspace_overlap
from lowrank_jax.steps import DimensionNumbers
from lowrank_jax.transform import ScaleByLowRankState, scale_by_lowrank
from lowrank_jax.weight_decay import add_decayed_weights_after_update

__version__ = "0.1.0"

__all__ = [
    "LOWRANK_OPTIMIZERS",
    "OPTIMIZERS",
    "ApolloScaling",
    "BackProjection",
    "CompressedMomentumState",
    "DimensionNumbers",
    "FiraResidual",
    "LazyRefreshCounts",
    "ResidualInputs",
    "ScaleByLowRankState",
    "StateFreeResidual",
    "adam_mini",
    "adamw",
    "add_decayed_weights_after_update",
    "apollo_adamw",
    "apollo_mini",
    "block_subspace",
    "clip_by_global_norm_torch",
    "coap_adamw",
    "dct_adamw",
    "dct_basis",
    "default_lowrank_labels",
    "find_lowrank_states",
    "fira_adamw",
    "flora",
    "frugal",
    "frugal_projection",
    "galore_adafactor",
    "galore_adam_mini",
    "galore_adamw",
    "galore_adamw8bit",
    "get_projector",
    "golore_adamw",
    "grass_adamw",
    "gum_muon",
    "lazy_refresh_counts",
    "matrix_labels",
    "projector_bases",
    "projector_overlaps",
    "projectors",
    "qgalore_adamw8bit",
    "refreshed_leaves",
    "residuals",
    "sara_adamw",
    "scale_by_adam_8bit",
    "scale_by_adam_bias_correction",
    "scale_by_adam_mini",
    "scale_by_block_subspace",
    "scale_by_coap",
    "scale_by_compressed_momentum",
    "scale_by_gum",
    "scale_by_lowrank",
    "scale_by_reference_adafactor",
    "scale_by_reference_adam",
    "scale_by_torch_adam",
    "sharding",
    "state_nbytes",
    "steps",
    "subspace_overlap",
    "validate_alias_kwargs",
]
