"""LLaMA-style decoder in Flax NNX, its presets and its next-token loss."""

from lowrank_jax.models.layers import LINEAR_BUILDERS, DenseLinear, RMSNorm, make_linear
from lowrank_jax.models.llama import (
    Llama,
    LlamaConfig,
    count_params,
    effective_weights,
    logical_axes,
    loss_from_state,
    next_token_loss,
    param_count_formula,
    trainable_param_count_formula,
)
from lowrank_jax.models.presets import PRESETS, get_preset
from lowrank_jax.models.relora import cosine_with_restarts_schedule, relora_merge_and_reinit

__all__ = [
    "LINEAR_BUILDERS",
    "PRESETS",
    "DenseLinear",
    "Llama",
    "LlamaConfig",
    "RMSNorm",
    "cosine_with_restarts_schedule",
    "count_params",
    "effective_weights",
    "get_preset",
    "logical_axes",
    "loss_from_state",
    "make_linear",
    "next_token_loss",
    "param_count_formula",
    "relora_merge_and_reinit",
    "trainable_param_count_formula",
]
