"""The projection methods by name: ``"dense"``, ``"cola"``, ``"sltrain"``, ``"lora"``, ``"lost"``.

Each method is a :class:`~lowrank_jax.models.layers.LinearSpec` (its settings as
a frozen dataclass) whose ``build`` makes its layer.  A new method is one spec
class and one layer class in their own module, plus one entry in
:data:`LINEAR_SPECS`.

Configs written as flat keys (``linear: lora`` with ``linear_rank``,
``lora_alpha``, ``lora_dropout``, ``sltrain_density``, ``sltrain_alpha``,
``sltrain_sparse_impl``, ``lost_channel_fraction``, ``lost_gamma``,
``lost_activation``) are turned into a spec by :func:`linear_spec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lowrank_jax.models.cola import CoLASpec
from lowrank_jax.models.layers import DenseSpec, LinearSpec
from lowrank_jax.models.lora import LoRASpec
from lowrank_jax.models.lost import LOSTSpec
from lowrank_jax.models.sltrain import SLTrainSpec

__all__ = ["FLAT_KEYS", "LINEAR_SPECS", "linear_spec"]

#: method name -> spec class.
LINEAR_SPECS: dict[str, type[LinearSpec]] = {
    spec.name: spec for spec in (DenseSpec, CoLASpec, SLTrainSpec, LoRASpec, LOSTSpec)
}

#: flat config key -> (the methods it applies to, the spec field it sets).
FLAT_KEYS: dict[str, tuple[tuple[str, ...], str]] = {
    "linear_rank": (("cola", "sltrain", "lora", "lost"), "rank"),
    "lora_alpha": (("lora",), "alpha"),
    "lora_dropout": (("lora",), "dropout"),
    "sltrain_density": (("sltrain",), "density"),
    "sltrain_alpha": (("sltrain",), "alpha"),
    "sltrain_sparse_impl": (("sltrain",), "sparse_impl"),
    "lost_channel_fraction": (("lost",), "channel_fraction"),
    "lost_gamma": (("lost",), "gamma"),
    "lost_activation": (("lost",), "activation"),
}


def linear_spec(linear: str | LinearSpec, flat: Mapping[str, Any] | None = None) -> LinearSpec:
    """The spec of ``linear`` (a name or a spec) with the flat keys of ``flat`` applied.

    A flat key that belongs to another method (``lora_alpha`` with ``"cola"``) is
    ignored, as configs that switch methods keep their settings; an unknown key
    or method is a ``ValueError`` naming the valid ones.

    >>> linear_spec("lora", {"linear_rank": 8, "sltrain_density": 0.1})
    LoRASpec(rank=8, alpha=32.0, dropout=0.0)
    """
    if isinstance(linear, LinearSpec):
        spec = linear
    elif linear in LINEAR_SPECS:
        spec = LINEAR_SPECS[linear]()
    else:
        raise ValueError(f"unknown linear type {linear!r}; valid: {sorted(LINEAR_SPECS)}")
    settings = {}
    for key, value in (flat or {}).items():
        if key not in FLAT_KEYS:
            raise ValueError(f"unknown linear setting {key!r}; valid: {sorted(FLAT_KEYS)}")
        methods, field = FLAT_KEYS[key]
        if spec.name in methods:
            settings[field] = value
    return dataclasses.replace(spec, **settings) if settings else spec
