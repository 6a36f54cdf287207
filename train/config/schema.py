"""The fields of a pre-training run: frozen dataclasses (plain data, no behaviour).

A run is described by one :class:`TrainConfig`::

    model:      ModelConfig       preset name + overrides (max_seq_len, dtypes, ...)
    optimizer:  OptimizerConfig   name in ``lowrank_jax.OPTIMIZERS``, lr, rank, ...
    schedule:   ScheduleConfig    linear warmup + cosine to ``min_lr_ratio`` (GaLore)
    data:       DataConfig        owned by :mod:`train.data.config`
    relora:     ReLoRAConfig      periodic merge-and-restart of a ``linear: lora`` model
    eval:       EvalConfig        every / batches
    checkpoint: CheckpointConfig  every / keep / async_save
    mesh:       MeshConfig        device mesh sizes and logical-axis rules
    profile:    ProfileConfig     a JAX profiler trace of a few updates
    nonfinite:  NonFiniteConfig   what a step with a NaN/inf loss or gradient does
    steps, batch_size, seq_len, seed, run_dir, log_every, ...

A new field is one annotated attribute with a default here (the YAML loader
reads the annotation to type-check it) and, when it has a valid range, one
check in :mod:`train.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.data.config import DataConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MeshConfig",
    "ModelConfig",
    "NonFiniteConfig",
    "OptimizerConfig",
    "ProfileConfig",
    "ReLoRAConfig",
    "ScheduleConfig",
    "TrainConfig",
]


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line meant for the user."""


@dataclass(frozen=True)
class ModelConfig:
    """Which model: a preset of :data:`lowrank_jax.models.PRESETS` plus overrides.

    Attributes:
      preset: preset name, e.g. ``"llama_60m"``.
      max_seq_len: longest sequence the model accepts; ``None`` uses the run's ``seq_len``.
      param_dtype: dtype of the stored parameters, ``"float32"`` or ``"bfloat16"``.
      dtype: dtype of the activations.
      linear: the attention/MLP projection type: ``"dense"``, ``"cola"``, ``"sltrain"``
        or ``"lora"`` (:data:`lowrank_jax.models.LINEAR_BUILDERS`). Their settings are
        ``LlamaConfig`` fields set through ``overrides``: ``linear_rank``,
        ``lora_alpha``, ``lora_dropout``, ``sltrain_density``, ``sltrain_alpha``,
        ``sltrain_sparse_impl``.
      scan_layers: stack the blocks under ``jax.lax.scan`` (one compiled block, as
        MaxText does); checkpoints convert between the layouts on restore.
      remat: rematerialise each block in the backward pass: ``"none"``, ``"block"``
        or a ``jax.checkpoint_policies`` name (``lowrank_jax.models.REMAT_CHOICES``).
      overrides: any other ``LlamaConfig`` field, e.g. ``{"num_layers": 2}``.
    """

    preset: str = "llama_demo"
    max_seq_len: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    linear: str = "dense"
    scan_layers: bool = False
    remat: str = "none"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer: ``lowrank_jax.OPTIMIZERS[name](schedule, rank=..., ...)``.

    Attributes:
      name: ``"adamw"`` or a low-rank alias (``"galore_adamw"``, ``"sara_adamw"``, ...).
      lr: peak learning rate (the schedule multiplies it).
      weight_decay: decoupled weight decay.
      rank, update_proj_gap, scale: GaLore's ``rank``, ``T`` and ``scale`` (ignored by
        ``adamw``).
      kwargs: any other keyword argument of the alias (``moments``, ``proj_type``, ...).
      grad_clip: clip by global norm before the optimizer; ``0`` disables.
      accumulate: gradient accumulation steps (``optax.MultiSteps``); the batch of one
        update is ``batch_size``, each micro-batch ``batch_size // accumulate``.
      state_dtype: ``"param"``: the optimizer state and its maths in the parameters'
        dtype (the references' behaviour with bf16 weights); ``"float32"``: gradients
        and parameters are cast to float32 for the optimizer, whose state is float32,
        and the update is rounded into the parameters.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad_clip: float = 1.0
    accumulate: int = 1
    state_dtype: str = "param"


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule (see :mod:`train.schedule`).

    Attributes:
      name: ``"cosine"`` (GaLore: linear warmup, cosine to ``min_lr_ratio * lr``) or
        ``"constant"`` (linear warmup, then constant).
      warmup_steps: warmup length; ``None`` uses ``warmup_fraction * steps``.
      warmup_fraction: used when ``warmup_steps`` is ``None``.
      min_lr_ratio: floor of the cosine as a fraction of the peak.
    """

    name: str = "cosine"
    warmup_steps: int | None = None
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class ReLoRAConfig:
    """ReLoRA (``Guitaricet/relora``): merge ``W += A B alpha/r`` every ``reset_every`` updates.

    Needs ``model.linear: lora``. After update ``k * reset_every`` (``k >= 1``, not the
    last update) the LoRA factors are merged into the frozen weights, ``A`` is
    re-initialised, ``B`` zeroed and the optimizer state of ``A``/``B`` pruned; the
    learning rate follows cosine with restarts (the schedule's warmup and floor,
    a linear re-warmup of ``restart_warmup_steps`` after each reset).

    Attributes:
      reset_every: updates between resets; ``0`` (default) trains plain LoRA.
      prune: ``"random"`` (reference default) or ``"magnitude"``.
      prune_fraction: fraction of the LoRA optimizer-state entries zeroed (0.999).
      restart_warmup_steps: re-warmup length after each reset.
    """

    reset_every: int = 0
    prune: str = "random"
    prune_fraction: float = 0.999
    restart_warmup_steps: int = 50


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on a fixed set of validation batches.

    Attributes:
      every: evaluate every this many optimizer steps and at the end; ``0`` never.
      batches: number of validation batches (at most what the split provides).
    """

    every: int = 500
    batches: int = 16


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run_dir>/checkpoints``.

    Attributes:
      every: save every this many optimizer steps and at the end; ``0`` only at the end.
      keep: number of checkpoints kept (``max_to_keep``).
      async_save: write in a background thread while training continues.
    """

    every: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)`` over all devices of all processes.

    ``-1`` (at most one axis) takes the devices left over. ``data`` splits batches
    only; ``fsdp`` splits batches and the parameters / optimizer state along the
    model width; ``tensor`` splits heads, MLP units and the vocabulary (see
    ``docs/distributed.md``). The default is one device.

    ``rules`` maps each logical axis name of the model's parameters (``embed``,
    ``heads``, ``mlp``, ``vocab``) and of the batch (``batch``) to the mesh axes
    that split it: a mesh axis name, a list of them, or ``null`` (replicated).
    The default is the library's table, :data:`lowrank_jax.sharding.DEFAULT_RULES`::

        rules: {batch: [data, fsdp], embed: fsdp, heads: tensor, mlp: tensor, vocab: tensor}
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=lambda: _library_axis_rules())

    def as_dict(self) -> dict[str, int]:
        """``{"data": ..., "fsdp": ..., "tensor": ...}``."""
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


#: :data:`lowrank_jax.sharding.DEFAULT_RULES` as YAML-friendly data (tuples -> lists). A copy,
#: kept equal to the library's table by ``tests/test_bad_inputs.py``: reading the table from
#: the library would import JAX whenever a config is built, and a bad number in a config
#: should fail in a fraction of a second.
LIBRARY_AXIS_RULES: dict[str, Any] = {
    "batch": ["data", "fsdp"], "embed": "fsdp", "heads": "tensor", "mlp": "tensor",
    "vocab": "tensor"}


def _library_axis_rules() -> dict[str, Any]:
    """A fresh copy of :data:`LIBRARY_AXIS_RULES`."""
    return {name: list(axes) if isinstance(axes, list) else axes
            for name, axes in LIBRARY_AXIS_RULES.items()}


@dataclass(frozen=True)
class ProfileConfig:
    """A JAX profiler trace (``jax.profiler``) of a few updates, for TensorBoard / Perfetto.

    Attributes:
      steps: number of updates traced; ``0`` (default) traces nothing.
      start: the trace starts after this update (so compilation is left out).
      dir: where the trace goes; ``None``: ``<run_dir>/profile``.
    """

    steps: int = 0
    start: int = 1
    dir: str | None = None


@dataclass(frozen=True)
class NonFiniteConfig:
    """The non-finite step policy (:mod:`train.finite_guard`, ``docs/training.md``).

    A step (one jitted call: an update, or one micro-batch when accumulating)
    whose loss, gradient norm, new parameters or new optimizer state hold a NaN
    or an infinity is counted, and with ``skip`` it leaves the whole train
    state as it was: parameters, optimizer state (moments, projectors, its
    step counts, so the learning-rate schedule and projector refreshes do not
    advance), ``TrainState.step`` (micro-steps applied), PRNG key and model
    variables. The data iterator moves on.

    Attributes:
      skip: keep the state of a non-finite step unchanged (default); ``false``
        applies it as computed (the run then usually stays non-finite and stops).
      max_consecutive: stop the run (``lowrank-train`` exit status 3, the last
        checkpoint intact) after this many non-finite steps in a row; ``0``
        never stops.
    """

    skip: bool = True
    max_consecutive: int = 5


@dataclass(frozen=True)
class TrainConfig:
    """A whole pre-training run.

    Attributes:
      steps: optimizer updates.
      batch_size: sequences per update (split into ``optimizer.accumulate`` micro-batches).
      seq_len: tokens per sequence ``L`` (batches are ``(B, L+1)``).
      seed: model init, data order and optimizer randomness.
      data_seed: seed of the data order when it should differ from ``seed``
        (``None``: ``seed``).
      seeds: train this many seeds ``seed, seed+1, ...`` of the config, one run
        directory each (``<run_dir>/seed_<s>``), as one vmapped program
        (:mod:`train.seeds`).
      seed_data: ``"same"``: every seed sees the data order of ``seed`` (only model
        init and optimizer randomness differ); ``"per_seed"``: each its own.
      seeds_mode: ``"auto"`` (vmapped when it fits in memory, else one after the
        other), ``"vmap"`` or ``"sequential"``.
      run_dir: where checkpoints, ``metrics.jsonl`` and TensorBoard events go; a run
        started again in the same directory resumes from its latest good checkpoint.
      log_every: write a metrics line every this many steps (and at refresh steps).
      mesh: the device mesh (:class:`MeshConfig`), e.g. ``mesh: {data: -1, fsdp: 8}``.
      data_parallel: the older form of ``mesh.data`` (kept working; do not set both).
      tensorboard: also write TensorBoard event files (needs ``tensorboardX``).
      progress: show a tqdm progress bar.
      profile: a profiler trace of a few updates (:class:`ProfileConfig`).
      nonfinite: the non-finite step policy (:class:`NonFiniteConfig`).
      per_layer_update: update each block inside the backward pass, as soon as its
        gradient exists (:mod:`train.per_layer`, scanned or unrolled layers;
        ``optimizer.grad_clip`` then clips each block's gradient by its own norm).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    data_seed: int | None = None
    seeds: int = 1
    seed_data: str = "same"
    seeds_mode: str = "auto"
    run_dir: str = "runs/default"
    log_every: int = 10
    data_parallel: int = 1
    tensorboard: bool = True
    progress: bool = True
    per_layer_update: bool = False

    @property
    def micro_batch_size(self) -> int:
        """Sequences per jitted step: ``batch_size // optimizer.accumulate``."""
        return self.batch_size // self.optimizer.accumulate

    @property
    def warmup_steps(self) -> int:
        """Warmup length in optimizer steps."""
        s = self.schedule
        if s.warmup_steps is not None:
            return s.warmup_steps
        return int(s.warmup_fraction * self.steps)
