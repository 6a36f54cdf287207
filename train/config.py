"""Configuration of a pre-training run: frozen dataclasses, YAML + ``key=value`` overrides.

A run is described by one :class:`TrainConfig`::

    model:      ModelConfig       preset name + overrides (max_seq_len, dtypes, ...)
    optimizer:  OptimizerConfig   name in ``lowrank_jax.OPTIMIZERS``, lr, rank, ...
    schedule:   ScheduleConfig    linear warmup + cosine to ``min_lr_ratio`` (GaLore)
    data:       DataConfig        owned by :mod:`train.data.config`
    relora:     ReLoRAConfig      periodic merge-and-restart of a ``linear: lora`` model
    eval:       EvalConfig        every / batches
    checkpoint: CheckpointConfig  every / keep / async_save
    steps, batch_size, seq_len, seed, run_dir, log_every, ...

Load with :func:`load_config` (a YAML file, then dotted overrides such as
``optimizer.rank=64``; values are parsed with ``yaml.safe_load`` and checked
against the field's type) and check with :func:`validate`. Every problem is a
:class:`ConfigError` (a ``ValueError``) whose message is one line.

>>> cfg = config_from_dict({"optimizer": {"name": "galore_adamw", "rank": 32}})
>>> cfg.optimizer.rank, cfg.schedule.min_lr_ratio
(32, 0.1)
>>> config_from_dict({"optimizer": {"rnak": 32}})
Traceback (most recent call last):
...
train.config.ConfigError: unknown config key 'optimizer.rnak'; did you mean 'optimizer.rank'?
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from train.data.config import DataConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ReLoRAConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "mesh_shape",
    "validate",
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
      overrides: any other ``LlamaConfig`` field, e.g. ``{"num_layers": 2}``.
    """

    preset: str = "llama_demo"
    max_seq_len: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    linear: str = "dense"
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
    """

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def as_dict(self) -> dict[str, int]:
        """``{"data": ..., "fsdp": ..., "tensor": ...}``."""
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


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
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    relora: ReLoRAConfig = field(default_factory=ReLoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
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


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked (and lightly converted) against the annotation ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must be {_type_name(tp)}, got null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(
            f"{where} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _suggest(key: str, known: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    if close:
        return f"did you mean {prefix + close[0]!r}?"
    return f"valid keys: {', '.join(sorted(known))}"


def _build(cls: type, raw: Mapping[str, Any], where: str) -> Any:
    """Instantiate the dataclass ``cls`` from ``raw`` with type checks."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(
                f"unknown config key {prefix + str(key)!r}; {_suggest(str(key), names, prefix)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e).splitlines()[0]) from e


def config_from_dict(raw: Mapping[str, Any] | None) -> TrainConfig:
    """A :class:`TrainConfig` from a nested mapping (the YAML structure).

    Raises:
      ConfigError: unknown key (with a "did you mean") or a value of the wrong type.
    """
    return _build(TrainConfig, dict(raw or {}), "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML/JSON friendly)."""
    return dataclasses.asdict(cfg)


def _schema_at(path: list[str]) -> Any:
    """The annotation reached by following ``path`` from :class:`TrainConfig` (or ``None``)."""
    tp: Any = TrainConfig
    for i, key in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            return None  # inside a free-form dict: anything goes
        hints = typing.get_type_hints(tp)
        if key not in hints:
            prefix = ".".join(path[:i]) + "." if i else ""
            raise ConfigError(
                f"unknown config key {'.'.join(path[: i + 1])!r}; "
                f"{_suggest(key, list(hints), prefix)}")
        tp = hints[key]
    return tp


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with each ``"a.b.c=value"`` applied (value parsed by ``yaml.safe_load``).

    >>> apply_overrides({"optimizer": {"rank": 8}}, ["optimizer.rank=64", "steps=10"])
    {'optimizer': {'rank': 64}, 'steps': 10}
    """
    out: dict[str, Any] = _deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        path = key.split(".")
        _schema_at(path)  # unknown keys fail here, with a suggestion
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse the value of {key}: {text!r} ({e.problem})") from e
        node = out
        for k in path[:-1]:
            child = node.get(k)
            if not isinstance(child, dict):
                child = {}
                node[k] = child
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (``None``: all defaults), apply overrides, build and validate.

    Raises:
      FileNotFoundError: the YAML file does not exist.
      ConfigError: any problem with the content (one-line message).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        raw = dict(loaded or {})
    cfg = config_from_dict(apply_overrides(raw, overrides))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _alias_accepts(fn: Any) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind != inspect.Parameter.VAR_KEYWORD}
    return names, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def validate(cfg: TrainConfig) -> None:
    """Check a config against the model presets and optimizers; raise one clear line.

    Raises:
      ConfigError: unknown preset or optimizer (the valid ones listed), a bad
        number, a rank larger than the projected matrices allow, ...
    """
    from lowrank_jax import LOWRANK_OPTIMIZERS, OPTIMIZERS
    from lowrank_jax.models import PRESETS

    m, o = cfg.model, cfg.optimizer
    if m.preset not in PRESETS:
        raise ConfigError(
            f"unknown model preset {m.preset!r}; valid presets: {', '.join(PRESETS)}")
    if o.name not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {o.name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    from lowrank_jax.models import LINEAR_BUILDERS

    if "linear" in m.overrides and m.overrides["linear"] != m.linear:
        raise ConfigError(
            f"model.overrides.linear={m.overrides['linear']!r} contradicts "
            f"model.linear={m.linear!r}; set model.linear only")
    if m.linear not in LINEAR_BUILDERS:
        raise ConfigError(f"unknown model.linear {m.linear!r}; valid: "
                          f"{', '.join(sorted(LINEAR_BUILDERS))}")
    _validate_relora(cfg)
    if cfg.seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {cfg.seeds}")
    if cfg.seed_data not in ("same", "per_seed"):
        raise ConfigError(f"unknown seed_data {cfg.seed_data!r}; valid: same, per_seed")
    if cfg.seeds_mode not in ("auto", "vmap", "sequential"):
        raise ConfigError(f"unknown seeds_mode {cfg.seeds_mode!r}; valid: auto, vmap, sequential")
    for name in ("steps", "batch_size", "seq_len", "log_every", "data_parallel"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if o.accumulate < 1:
        raise ConfigError(f"optimizer.accumulate must be >= 1, got {o.accumulate}")
    if cfg.batch_size % o.accumulate:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not divisible by optimizer.accumulate "
            f"{o.accumulate}")
    if cfg.micro_batch_size % cfg.data_parallel:
        raise ConfigError(
            f"micro-batch size {cfg.micro_batch_size} is not divisible by data_parallel "
            f"{cfg.data_parallel}")
    _validate_mesh(cfg)
    if o.lr <= 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {o.lr}")
    if o.grad_clip < 0 or o.weight_decay < 0:
        raise ConfigError("optimizer.grad_clip and optimizer.weight_decay must be >= 0")
    if cfg.schedule.name not in ("cosine", "constant"):
        raise ConfigError(
            f"unknown schedule {cfg.schedule.name!r}; valid schedules: cosine, constant")
    if not 0.0 <= cfg.schedule.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio must lie in [0, 1], got "
                          f"{cfg.schedule.min_lr_ratio}")
    if not 0.0 <= cfg.schedule.warmup_fraction < 1.0:
        raise ConfigError(f"schedule.warmup_fraction must lie in [0, 1), got "
                          f"{cfg.schedule.warmup_fraction}")
    if not 0 <= cfg.warmup_steps <= cfg.steps:
        raise ConfigError(f"schedule.warmup_steps must lie in [0, steps], got {cfg.warmup_steps}")
    if cfg.eval.every < 0 or cfg.eval.batches < 1:
        raise ConfigError("eval.every must be >= 0 and eval.batches >= 1")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")

    preset = PRESETS[m.preset]
    fields = {f.name for f in dataclasses.fields(preset)}
    bad = sorted(set(m.overrides) - fields)
    if bad:
        raise ConfigError(
            f"unknown model override(s) {bad}; valid: {', '.join(sorted(fields))}")
    max_len = m.max_seq_len if m.max_seq_len is not None else cfg.seq_len
    if cfg.seq_len > max_len:
        raise ConfigError(f"seq_len {cfg.seq_len} is longer than model.max_seq_len {max_len}")
    try:
        model_cfg = model_config(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from e

    if o.name in LOWRANK_OPTIMIZERS:
        if o.rank < 1 or o.update_proj_gap < 1:
            raise ConfigError("optimizer.rank and optimizer.update_proj_gap must be >= 1")
        limit = min(model_cfg.hidden_size, model_cfg.intermediate_size)
        if o.rank > limit:
            raise ConfigError(
                f"optimizer.rank {o.rank} is too large for preset {m.preset!r}: the projected "
                f"matrices have min dimension {limit} (hidden size {model_cfg.hidden_size})")
    fn = OPTIMIZERS[o.name]
    names, var_kw = _alias_accepts(fn)
    if o.name == "sara_adamw":  # forwards **kwargs to galore_adamw
        names |= _alias_accepts(LOWRANK_OPTIMIZERS["galore_adamw"])[0]
        var_kw = False
    reserved = {"learning_rate", "rank", "update_proj_gap", "scale", "weight_decay"}
    for key in o.kwargs:
        if key in reserved:
            raise ConfigError(f"optimizer.kwargs.{key}: set optimizer.{key} instead")
        if key not in names and not var_kw:
            raise ConfigError(
                f"optimizer {o.name!r} has no argument {key!r}; "
                f"{_suggest(key, sorted(names - reserved), '')}")


def mesh_shape(cfg: TrainConfig) -> dict[str, int]:
    """The requested mesh sizes (``-1`` unresolved); ``data_parallel`` fills ``data``."""
    shape = cfg.mesh.as_dict()
    if cfg.data_parallel != 1:
        shape["data"] = cfg.data_parallel
    return shape


def _validate_mesh(cfg: TrainConfig) -> None:
    m = cfg.mesh
    if cfg.data_parallel != 1 and m.data != 1:
        raise ConfigError(f"data_parallel={cfg.data_parallel} and mesh.data={m.data} are both "
                          "set; use mesh.data only")
    sizes = mesh_shape(cfg)
    if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
        raise ConfigError(f"mesh sizes must be >= 1 with at most one -1, got {sizes}")
    split = [sizes[a] for a in ("data", "fsdp")]
    if -1 not in split and cfg.micro_batch_size % (split[0] * split[1]):
        raise ConfigError(
            f"micro-batch size {cfg.micro_batch_size} is not divisible by mesh.data x mesh.fsdp "
            f"= {split[0] * split[1]} (the batch is split over both)")


def _validate_relora(cfg: TrainConfig) -> None:
    from lowrank_jax.models.relora import PRUNE_MODES

    r = cfg.relora
    if r.reset_every < 0 or r.restart_warmup_steps < 0:
        raise ConfigError("relora.reset_every and relora.restart_warmup_steps must be >= 0")
    if r.reset_every == 0:
        return
    if cfg.model.linear != "lora":
        raise ConfigError(f"relora.reset_every={r.reset_every} needs model.linear=lora "
                          f"(got {cfg.model.linear!r})")
    if r.prune not in PRUNE_MODES:
        raise ConfigError(f"unknown relora.prune {r.prune!r}; valid: {', '.join(PRUNE_MODES)}")
    if not 0.0 <= r.prune_fraction <= 1.0:
        raise ConfigError(f"relora.prune_fraction must lie in [0, 1], got {r.prune_fraction}")
    if cfg.schedule.name != "cosine":
        raise ConfigError("ReLoRA uses cosine with restarts: set schedule.name=cosine "
                          f"(got {cfg.schedule.name!r})")
    if r.restart_warmup_steps >= r.reset_every:
        raise ConfigError(f"relora.restart_warmup_steps {r.restart_warmup_steps} must be "
                          f"shorter than relora.reset_every {r.reset_every}")


def model_config(cfg: TrainConfig) -> Any:
    """The ``LlamaConfig`` of a run (preset + overrides, ``max_seq_len`` defaulting to ``seq_len``)."""
    from lowrank_jax.models import get_preset

    m = cfg.model
    max_len = m.max_seq_len if m.max_seq_len is not None else cfg.seq_len
    overrides = {"linear": m.linear, **m.overrides}
    return get_preset(m.preset, max_seq_len=max_len, param_dtype=m.param_dtype,
                      dtype=m.dtype, **overrides)
