"""Configuration of a pre-training run: YAML files that compose, ``key=value`` overrides.

* :mod:`train.config.schema`   the fields (frozen dataclasses, plain data);
* :mod:`train.config.compose`  ``defaults:`` lists and ``${name}`` variables;
* :mod:`train.config.parse`    mappings <-> dataclasses with type checks, overrides;
* :mod:`train.config.validate` one small check per rule;
* :mod:`train.config.derived`  the model's ``LlamaConfig``, mesh sizes, axis rules.

Load with :func:`load_config`: the YAML file(s) composed, then dotted overrides
such as ``optimizer.rank=64`` (values parsed with ``yaml.safe_load`` and checked
against the field's type), then ``${name}`` variables resolved and the result
validated. Every problem is a :class:`ConfigError` (a ``ValueError``) whose
message is one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from train.config.compose import compose_files, resolve_vars
from train.config.derived import axis_rules, mesh_shape, model_config
from train.config.parse import apply_overrides, config_from_dict, config_to_dict
from train.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    MeshConfig,
    ModelConfig,
    NonFiniteConfig,
    OptimizerConfig,
    ProfileConfig,
    ReLoRAConfig,
    ScheduleConfig,
    TrainConfig,
)
from train.config.validate import validate

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "MeshConfig",
           "ModelConfig", "NonFiniteConfig", "OptimizerConfig", "ProfileConfig",
           "ReLoRAConfig", "ScheduleConfig", "TrainConfig", "apply_overrides", "axis_rules",
           "config_from_dict", "config_to_dict", "config_yaml", "load_config", "mesh_shape",
           "model_config", "validate"]


def load_config(path: str | Path | Sequence[str | Path] | None,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """Read YAML config(s) (``None``: all defaults), apply overrides, build and validate.

    Args:
      path: one file, or several composed in order (as if listed in ``defaults``).
      overrides: ``"a.b.c=value"`` strings; ``vars.NAME=value`` sets a variable.

    Raises:
      FileNotFoundError: a YAML file does not exist.
      ConfigError: any problem with the content (one-line message).
    """
    if path is None:
        paths: list[str | Path] = []
    elif isinstance(path, (str, Path)):
        paths = [path]
    else:
        paths = list(path)
    raw = compose_files(paths)
    cfg = config_from_dict(resolve_vars(apply_overrides(raw, overrides)))
    validate(cfg)
    return cfg


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what a run writes to ``<run_dir>/config.yaml``)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
