"""LoRA / ReLoRA projection: ``y = x W + dropout(x) A B * alpha / r``.

Reference: ``Guitaricet/relora`` (ReLoRA keeps this layer and periodically
merges ``A B alpha/r`` into ``W``; see :mod:`lowrank_jax.models.relora`).
Variables (Flax layout ``(in, out)``, ``y = x @ ...``)::

    kernel  (in, out)  FrozenWeight  N(0, init_std^2)       frozen base weight W
    lora_a  (in, r)    Param         U(-1/sqrt(in), 1/sqrt(in))  (kaiming-uniform, a=sqrt(5))
    lora_b  (r, out)   Param         zeros

``kernel`` is an :class:`FrozenWeight` (an ``nnx.Variable`` that is not an
``nnx.Param``): it is part of ``nnx.state(model)`` (saved, merged into) but not
of ``nnx.state(model, nnx.Param)``, so optimizers built on the ``Param`` state
never update it.  Split such a model with ``nnx.split(model, nnx.Param, ...)``
(the plain ``nnx.split(model, nnx.Param)`` refuses a non-exhaustive filter).

Settings (:class:`LoRASpec`): ``rank``, ``alpha``, ``dropout``.
Dropout on the LoRA branch input uses ``nnx.Dropout`` (stream ``"dropout"``,
falling back to ``"default"``); with ``lora_dropout == 0`` no RNG state is kept.
Call ``model.eval()`` / ``model.train()`` to switch dropout off / on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.layers import (
    Axes,
    LinearDims,
    LinearSpec,
    Projection,
    axes_param,
    make_param,
    token_matmul,
)


class FrozenWeight(nnx.Variable):
    """A weight that is saved with the model but not trained (not an ``nnx.Param``)."""


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """float32 ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's ``kaiming_uniform_(a=sqrt(5))``."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def uniform_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, param_dtype: jnp.dtype, axes: Axes
) -> nnx.Param:
    """``Param`` drawn from :func:`kaiming_uniform` in float32, cast to ``param_dtype``."""
    return axes_param(kaiming_uniform(rngs.params(), shape, fan_in).astype(param_dtype), axes)


def low_rank_factors(spec: Any, dims: LinearDims, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """``lora_a`` ``(in, r)`` kaiming-uniform and ``lora_b`` ``(r, out)`` zeros (LoRA, SLTrain)."""
    in_axis, out_axis = dims.axes
    rank = int(spec.rank)
    a = uniform_param(rngs, (dims.in_features, rank), dims.in_features, dims.param_dtype,
                      (in_axis, None))
    b = axes_param(jnp.zeros((rank, dims.out_features), dims.param_dtype), (None, out_axis))
    return a, b


@dataclasses.dataclass(frozen=True)
class LoRASpec(LinearSpec):
    """LoRA's settings: rank ``r``, scale ``alpha / r`` and dropout on the branch input."""

    name: ClassVar[str] = "lora"
    rank: int = 128
    alpha: float = 32.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if int(self.rank) <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    def build(self, dims: LinearDims, rngs: nnx.Rngs) -> nnx.Module:
        return LoRALinear(self, dims, rngs=rngs)

    def param_count(self, in_features: int, out_features: int) -> int:
        """Trainable scalars of one projection: ``r * (in + out)`` (``W`` is frozen)."""
        return int(self.rank) * (in_features + out_features)

    def dense_kernel(self, node: Mapping[str, Any]) -> jax.Array:
        """``W + A B alpha/r`` ``(in, out)`` (float32) from a pure-dict module state."""
        a = jnp.asarray(node["lora_a"], jnp.float32)
        b = jnp.asarray(node["lora_b"], jnp.float32)
        scale = float(self.alpha) / a.shape[-1]
        return jnp.asarray(node["kernel"], jnp.float32) + scale * (a @ b)


class LoRALinear(Projection):
    """``(..., in) -> (..., out)``: ``x @ kernel + dropout(x) @ lora_a @ lora_b * alpha/r``."""

    def __init__(self, spec: LoRASpec, dims: LinearDims, *, rngs: nnx.Rngs):
        super().__init__(dims)
        self.rank = int(spec.rank)
        self.alpha = float(spec.alpha)
        base = make_param(rngs, (dims.in_features, dims.out_features), dims.init_std,
                          dims.param_dtype, tuple(dims.axes))
        self.kernel = FrozenWeight(base[...], out_sharding=tuple(dims.axes),
                                   eager_sharding=False)
        self.lora_a, self.lora_b = low_rank_factors(spec, dims, rngs)
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs if spec.dropout > 0 else None)

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    def dense_equivalent(self) -> jax.Array:
        """``W_eff = kernel + lora_a @ lora_b * alpha/r``: ``(in, out)`` float32."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return self.kernel[...].astype(jnp.float32) + self.scale * (a @ b)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        x = x.astype(self.dtype)
        y = token_matmul(x, self._cast(self.kernel))
        h = token_matmul(self.dropout(x), self._cast(self.lora_a))  # (..., r)
        return y + token_matmul(h, self._cast(self.lora_b)) * jnp.asarray(self.scale, self.dtype)
