"""LLaMA-style decoder in Flax NNX, its presets, its projection methods and its loss.

Module layering (no cycles): ``layers`` (leaf helpers) <- ``cola``, ``lora``,
``sltrain``, ``lost`` (one projection method each) <- ``linears`` (the registry) <-
``llama`` <- ``presets``; ``stacking`` and ``relora`` stand beside them.
"""

from lowrank_jax.models.cola import CoLASpec
from lowrank_jax.models.layers import DenseLinear, DenseSpec, LinearDims, LinearSpec, RMSNorm
from lowrank_jax.models.linears import LINEAR_SPECS, linear_spec
from lowrank_jax.models.llama import (
    REMAT_CHOICES,
    Llama,
    LlamaConfig,
    apply_block,
    count_params,
    effective_weights,
    logical_axes,
    loss_from_state,
    make_linear,
    next_token_loss,
    param_count_formula,
    token_loss,
    trainable_param_count_formula,
)
from lowrank_jax.models.lora import LoRASpec
from lowrank_jax.models.lost import LOSTSpec
from lowrank_jax.models.presets import OVERRIDE_KEYS, PRESETS, get_preset
from lowrank_jax.models.relora import cosine_with_restarts_schedule, relora_merge_and_reinit
from lowrank_jax.models.sltrain import SLTrainSpec
from lowrank_jax.models.stacking import is_stacked, stack_layers, unstack_layers

#: method name -> spec class (the older name of :data:`LINEAR_SPECS`).
LINEAR_BUILDERS = LINEAR_SPECS

__all__ = [
    "LINEAR_BUILDERS",
    "LINEAR_SPECS",
    "OVERRIDE_KEYS",
    "PRESETS",
    "REMAT_CHOICES",
    "CoLASpec",
    "DenseLinear",
    "DenseSpec",
    "LOSTSpec",
    "LinearDims",
    "LinearSpec",
    "Llama",
    "LlamaConfig",
    "LoRASpec",
    "RMSNorm",
    "SLTrainSpec",
    "apply_block",
    "cosine_with_restarts_schedule",
    "count_params",
    "effective_weights",
    "get_preset",
    "is_stacked",
    "linear_spec",
    "logical_axes",
    "loss_from_state",
    "make_linear",
    "next_token_loss",
    "param_count_formula",
    "relora_merge_and_reinit",
    "stack_layers",
    "token_loss",
    "trainable_param_count_formula",
    "unstack_layers",
]
