"""YAML configs that compose: ``defaults:`` lists and ``${name}`` variables.

A config file is a mapping of :class:`~train.config.schema.TrainConfig` keys plus
two composition keys, both removed from the result:

``defaults: [base/c4, presets/llama_60m, methods/galore]``
    files merged first, in order (later ones win), then the file's own keys on
    top. Names are paths relative to the file that lists them, ``.yaml`` optional;
    a listed file may list its own defaults. Mappings merge key by key; any other
    value (a list, a number) is replaced whole.
``vars: {rank: 128}``
    names that any file of the composition refers to as ``${rank}``. A value that
    is exactly ``${name}`` takes the variable's value (and type); ``${name}``
    inside a longer string is replaced by its text. ``vars.NAME=...`` on the
    command line sets one.

So a model preset holds what depends on the scale (its ``rank``, steps, batch
split) and a method file holds what depends on the method, written once for
every scale::

    # configs/methods/cola.yaml
    model:
      linear: cola
      overrides:
        linear_rank: ${rank}       # in a flow mapping {...}, quote it: '${rank}'
    optimizer: {name: adamw, lr: 6.0e-3}

>>> resolve_vars({"vars": {"rank": 8}, "optimizer": {"rank": "${rank}"}, "run_dir": "r${rank}"})
{'optimizer': {'rank': 8}, 'run_dir': 'r8'}
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from train.config.schema import ConfigError

__all__ = ["compose_files", "merge", "read_composed", "resolve_vars"]

DEFAULTS = "defaults"
VARS = "vars"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` merged onto ``base``: mappings key by key, anything else replaced.

    >>> merge({"a": {"x": 1, "y": 2}, "b": [1]}, {"a": {"y": 3}, "b": [2]})
    {'a': {'x': 1, 'y': 3}, 'b': [2]}
    """
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} is not a file; give the path of a "
                          "YAML file (see configs/)")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start}); "
                          "give a YAML file") from e
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e.strerror}); "
                          "check its permissions") from e
    if loaded is not None and not isinstance(loaded, Mapping):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return dict(loaded or {})


def _default_path(name: Any, parent: Path) -> Path:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{parent}: every entry of defaults must be a file name, got {name!r}")
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    return path if path.is_absolute() else parent / path


def read_composed(path: str | Path, _stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of one config file with its ``defaults`` merged in (``vars`` kept).

    Raises:
      FileNotFoundError: the file, or a file it lists, does not exist.
      ConfigError: invalid YAML, a top level that is not a mapping, a bad
        ``defaults`` entry or a file that lists itself (directly or not).
    """
    path = Path(path).resolve()
    if path in _stack:
        cycle = " -> ".join(p.name for p in (*_stack, path))
        raise ConfigError(f"config files list each other in defaults: {cycle}")
    own = _read_yaml(path)
    names = own.pop(DEFAULTS, None) or []
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list):
        raise ConfigError(f"{path}: defaults must be a list of file names, got {names!r}")
    out: dict[str, Any] = {}
    for name in names:
        out = merge(out, read_composed(_default_path(name, path.parent), (*_stack, path)))
    return merge(out, own)


def compose_files(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Several files composed in order, as if one file listed them in ``defaults``."""
    out: dict[str, Any] = {}
    for path in paths:
        out = merge(out, read_composed(path))
    return out


def _substitute(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, Mapping):
        return {k: _substitute(v, variables, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    for name in _REF.findall(value):
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise ConfigError(f"{where} refers to ${{{name}}}, which no vars entry defines "
                              f"(defined: {known}); add vars.{name} to a config file")
    whole = _REF.fullmatch(value)
    if whole:
        return variables[whole.group(1)]
    return _REF.sub(lambda m: str(variables[m.group(1)]), value)


def resolve_vars(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` without its ``vars`` and with every ``${name}`` replaced."""
    variables = raw.get(VARS) or {}
    if not isinstance(variables, Mapping):
        raise ConfigError(f"vars must be a mapping of names to values, got {variables!r}")
    body = {k: v for k, v in raw.items() if k != VARS}
    return _substitute(body, variables, "")
