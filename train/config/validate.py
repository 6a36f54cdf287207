"""Checks of a :class:`~train.config.schema.TrainConfig`: each one small, each one clear line.

:func:`validate` runs :data:`CHECKS` in order; the first problem raises a
:class:`~train.config.schema.ConfigError` naming the parameter and the fix.
Simple ranges are data (:data:`AT_LEAST`); a new check is one function added
to :data:`CHECKS`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

from train.config.derived import mesh_shape, model_config
from train.config.schema import ConfigError, TrainConfig

__all__ = ["AT_LEAST", "CHECKS", "validate"]

#: ``(dotted field, lowest valid value)``
AT_LEAST: tuple[tuple[str, int], ...] = (
    ("steps", 1), ("batch_size", 1), ("seq_len", 1), ("log_every", 1), ("data_parallel", 1),
    ("seeds", 1), ("optimizer.accumulate", 1), ("eval.every", 0), ("eval.batches", 1),
    ("checkpoint.every", 0), ("checkpoint.keep", 1), ("relora.reset_every", 0),
    ("relora.restart_warmup_steps", 0), ("profile.steps", 0), ("profile.start", 0),
    ("optimizer.grad_clip", 0), ("optimizer.weight_decay", 0), ("nonfinite.max_consecutive", 0),
)
_CHOICES = (("seed_data", ("same", "per_seed")), ("seeds_mode", ("auto", "vmap", "sequential")),
            ("schedule.name", ("cosine", "constant")),
            ("optimizer.state_dtype", ("param", "float32")))


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


#: free-form mappings whose values YAML 1.1 may leave as strings (``nan`` is the string 'nan')
_FREE_FORM = ("optimizer.kwargs", "model.overrides")


def _non_finite(value: Any, strings: bool) -> bool:
    """A float that is NaN or infinite (with ``strings``, also a string spelling one)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if strings and isinstance(value, str):
        try:
            return not math.isfinite(float(value))
        except ValueError:
            return False
    return False


def _first_non_finite(tree: Any, where: str, strings: bool = False) -> tuple[str, Any] | None:
    """The first ``(dotted key, value)`` of a nested dict/list that is not a finite number."""
    if isinstance(tree, dict):
        items: Any = ((f"{where}.{k}" if where else str(k), v) for k, v in tree.items())
    elif isinstance(tree, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(tree))
    else:
        return (where, tree) if _non_finite(tree, strings) else None
    for key, value in items:
        found = _first_non_finite(value, key, strings or key in _FREE_FORM)
        if found:
            return found
    return None


def check_finite(cfg: TrainConfig) -> None:
    """No NaN or infinity anywhere: typed fields and the free-form ``optimizer.kwargs`` /
    ``model.overrides`` alike (``optimizer.grad_clip=.nan`` would silently disable clipping,
    ``optimizer.lr=.inf`` train to NaN)."""
    found = _first_non_finite(dataclasses.asdict(cfg), "")
    if found:
        key, value = found
        raise ConfigError(f"{key} must be a finite number, got {value!r}")


def check_ranges(cfg: TrainConfig) -> None:
    """Every field of :data:`AT_LEAST` at or above its bound; ``optimizer.lr`` above 0."""
    for name, low in AT_LEAST:
        value = _get(cfg, name)
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")


def check_choices(cfg: TrainConfig) -> None:
    """String fields with a fixed set of values."""
    for name, valid in _CHOICES:
        value = _get(cfg, name)
        if value not in valid:
            what = name.removesuffix(".name")
            raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def check_names(cfg: TrainConfig) -> None:
    """The model preset, the optimizer and the projection type exist."""
    from lowrank_jax import OPTIMIZERS
    from lowrank_jax.models import LINEAR_BUILDERS, PRESETS

    m, o = cfg.model, cfg.optimizer
    if m.preset not in PRESETS:
        raise ConfigError(
            f"unknown model preset {m.preset!r}; valid presets: {', '.join(PRESETS)}")
    if o.name not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optimizer {o.name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    if "linear" in m.overrides and m.overrides["linear"] != m.linear:
        raise ConfigError(
            f"model.overrides.linear={m.overrides['linear']!r} contradicts "
            f"model.linear={m.linear!r}; set model.linear only")
    if m.linear not in LINEAR_BUILDERS:
        raise ConfigError(f"unknown model.linear {m.linear!r}; valid: "
                          f"{', '.join(sorted(LINEAR_BUILDERS))}")


def check_batch_split(cfg: TrainConfig) -> None:
    """The batch splits into micro-batches, and those over the data-parallel devices."""
    acc = cfg.optimizer.accumulate
    if cfg.batch_size % acc:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is not divisible by optimizer.accumulate {acc}")
    if cfg.micro_batch_size % cfg.data_parallel:
        raise ConfigError(
            f"micro-batch size {cfg.micro_batch_size} is not divisible by data_parallel "
            f"{cfg.data_parallel}")


def check_mesh(cfg: TrainConfig) -> None:
    """Mesh sizes (at most one ``-1``) that split the micro-batch; known logical-axis rules."""
    from lowrank_jax.sharding import MESH_AXES

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
    for name, axes in m.rules.items():
        listed = axes if isinstance(axes, list) else [axes] if axes is not None else []
        bad = [a for a in listed if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axis {bad[0]!r}; use one of "
                              f"{', '.join(MESH_AXES)}, a list of them, or null")


def check_schedule(cfg: TrainConfig) -> None:
    """The schedule's ratios and warmup length lie in range."""
    s = cfg.schedule
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio must lie in [0, 1], got {s.min_lr_ratio}")
    if not 0.0 <= s.warmup_fraction < 1.0:
        raise ConfigError(f"schedule.warmup_fraction must lie in [0, 1), got {s.warmup_fraction}")
    if not 0 <= cfg.warmup_steps <= cfg.steps:
        raise ConfigError(f"schedule.warmup_steps must lie in [0, steps], got {cfg.warmup_steps}")


def check_relora(cfg: TrainConfig) -> None:
    """ReLoRA needs LoRA layers, a known prune mode and a re-warmup shorter than a cycle."""
    from lowrank_jax.models.relora import PRUNE_MODES

    r = cfg.relora
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


def check_layout(cfg: TrainConfig) -> None:
    """Scanned layers and per-layer updates with what they cannot combine with."""
    from lowrank_jax.models import REMAT_CHOICES

    if cfg.model.remat not in REMAT_CHOICES:
        raise ConfigError(f"unknown model.remat {cfg.model.remat!r}; valid: "
                          f"{', '.join(REMAT_CHOICES)}")
    if cfg.relora.reset_every and (cfg.model.scan_layers or cfg.per_layer_update):
        raise ConfigError("relora.reset_every needs the unrolled layout and the standard step: "
                          "set model.scan_layers=false and per_layer_update=false")


def check_model(cfg: TrainConfig) -> None:
    """Known overrides, a sequence the model accepts, and a model the preset can build."""
    from lowrank_jax.models import OVERRIDE_KEYS

    m = cfg.model
    fields = set(OVERRIDE_KEYS)
    bad = sorted(set(m.overrides) - fields)
    if bad:
        raise ConfigError(f"unknown model override(s) {bad}; valid: {', '.join(sorted(fields))}")
    max_len = m.max_seq_len if m.max_seq_len is not None else cfg.seq_len
    if cfg.seq_len > max_len:
        raise ConfigError(f"seq_len {cfg.seq_len} is longer than model.max_seq_len {max_len}")
    try:
        model_config(cfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {str(e).splitlines()[0]}") from e


def check_rank(cfg: TrainConfig) -> None:
    """A projection rank and refresh period the model's matrices allow."""
    from lowrank_jax import LOWRANK_OPTIMIZERS

    o = cfg.optimizer
    if o.name not in LOWRANK_OPTIMIZERS:
        return
    if o.rank < 1 or o.update_proj_gap < 1:
        raise ConfigError("optimizer.rank and optimizer.update_proj_gap must be >= 1")
    model_cfg = model_config(cfg)
    limit = min(model_cfg.hidden_size, model_cfg.intermediate_size)
    if o.rank > limit:
        raise ConfigError(
            f"optimizer.rank {o.rank} is too large for preset {cfg.model.preset!r}: the projected "
            f"matrices have min dimension {limit} (hidden size {model_cfg.hidden_size})")


def check_optimizer_kwargs(cfg: TrainConfig) -> None:
    """``optimizer.kwargs`` names arguments the alias has (and none set elsewhere)."""
    from lowrank_jax import validate_alias_kwargs

    o = cfg.optimizer
    reserved = {"learning_rate", "rank", "update_proj_gap", "scale", "weight_decay"}
    for key in o.kwargs:
        if key in reserved:
            raise ConfigError(f"optimizer.kwargs.{key}: set optimizer.{key} instead")
    try:
        validate_alias_kwargs(o.name, o.kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_optimizer_kwarg_types(cfg: TrainConfig) -> None:
    """A number where the alias's argument has a number default (``optimizer.kwargs.b1=abc``
    would otherwise fail deep inside the optimizer with an unrelated message)."""
    from lowrank_jax import OPTIMIZERS

    o = cfg.optimizer
    params = inspect.signature(OPTIMIZERS[o.name]).parameters
    for key, value in o.kwargs.items():
        default = params[key].default if key in params else None
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"optimizer.kwargs.{key} must be a number (its default is "
                              f"{default!r}), got {value!r}")


#: run in this order by :func:`validate`; the checks that need no import of JAX come first,
#: so that a bad number fails in a fraction of a second
CHECKS: tuple[Callable[[TrainConfig], None], ...] = (
    check_finite, check_ranges, check_choices, check_batch_split, check_schedule, check_names,
    check_relora, check_mesh, check_layout, check_model, check_rank, check_optimizer_kwargs,
    check_optimizer_kwarg_types,
)


def validate(cfg: TrainConfig) -> None:
    """Check a config against the model presets and optimizers; raise one clear line.

    Raises:
      ConfigError: unknown preset or optimizer (the valid ones listed), a bad
        number, a rank larger than the projected matrices allow, ...
    """
    for check in CHECKS:
        check(cfg)
