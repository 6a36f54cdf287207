"""Nested mappings (YAML) <-> :class:`~train.config.schema.TrainConfig`, with type checks.

Values are checked against the dataclass annotations and lightly converted
(``1e-3`` read by YAML as a string becomes a float, ``2.0`` for an int field
becomes ``2``); an unknown key is reported with the closest valid one.

>>> cfg = config_from_dict({"optimizer": {"name": "galore_adamw", "rank": 32}})
>>> cfg.optimizer.rank, cfg.schedule.min_lr_ratio
(32, 0.1)
>>> config_from_dict({"optimizer": {"rnak": 32}})
Traceback (most recent call last):
...
train.config.schema.ConfigError: unknown config key 'optimizer.rnak'; did you mean 'optimizer.rank'?
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from train.config.schema import ConfigError, TrainConfig

__all__ = ["apply_overrides", "config_from_dict", "config_to_dict", "suggest"]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{where} must be an integer, got {value!r}")


def _to_float(value: Any, where: str) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return number


def _to_str(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be a string, got {value!r}")


#: a number as YAML 1.2 writes it; YAML 1.1 (PyYAML) leaves ``1e-8`` (no dot) a string
_NUMBER = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")


def _numbers(value: Any) -> Any:
    """``value`` with the strings YAML 1.1 left from exponent numbers (``"1e-8"``) as floats."""
    if isinstance(value, Mapping):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def _to_dict(value: Any, where: str) -> dict[str, Any]:
    """A free-form mapping (``optimizer.kwargs``, ``model.overrides``, ``mesh.rules``);
    ``eps: 1e-8`` in it is a float, as in the typed fields."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return _numbers(dict(value))


_SCALARS: dict[Any, Callable[[Any, str], Any]] = {
    bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, dict: _to_dict}


def _to_union(value: Any, tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where} must be {_type_name(tp)}, got null")
    options = [arg for arg in args if arg is not type(None)]
    if len(options) == 1 and options[0] in _SCALARS:  # ``X | None``: X's own message
        try:
            return coerce(value, options[0], where)
        except ConfigError as e:
            raise ConfigError(f"{e} (or null)") from None
    for arg in options:
        try:
            return coerce(value, arg, where)
        except ConfigError:
            pass
    raise ConfigError(
        f"{where} must be {' or '.join(_type_name(a) for a in args)}, got {value!r}")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked (and lightly converted) against the annotation ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _to_union(value, tp, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, _to_dict(value, where), where)
    convert = _SCALARS.get(origin or tp)
    if convert is None:
        raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")
    return convert(value, where)


def suggest(key: str, known: Sequence[str], prefix: str) -> str:
    """``did you mean 'x'?`` for the closest of ``known``, else the list of valid keys."""
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
                f"unknown config key {prefix + str(key)!r}; {suggest(str(key), names, prefix)}")
        kwargs[key] = coerce(value, hints[key], prefix + key)
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
    """The annotation reached by following ``path`` from :class:`TrainConfig`."""
    tp: Any = TrainConfig
    for i, key in enumerate(path):
        if not dataclasses.is_dataclass(tp):
            return None  # inside a free-form dict: anything goes
        hints = typing.get_type_hints(tp)
        if key not in hints:
            prefix = ".".join(path[:i]) + "." if i else ""
            raise ConfigError(
                f"unknown config key {'.'.join(path[: i + 1])!r}; "
                f"{suggest(key, list(hints), prefix)}")
        tp = hints[key]
    return tp


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with each ``"a.b.c=value"`` applied (value parsed by ``yaml.safe_load``).

    Keys under ``vars.`` set composition variables (:mod:`train.config.compose`).

    >>> apply_overrides({"optimizer": {"rank": 8}}, ["optimizer.rank=64", "steps=10"])
    {'optimizer': {'rank': 64}, 'steps': 10}
    """
    out: dict[str, Any] = deep_copy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        path = key.split(".")
        if path[0] != "vars":
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


def deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested mappings (leaves shared)."""
    return {k: deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}
