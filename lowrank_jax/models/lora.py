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

Dropout on the LoRA branch input uses ``nnx.Dropout`` (stream ``"dropout"``,
falling back to ``"default"``); with ``lora_dropout == 0`` no RNG state is kept.
Call ``model.eval()`` / ``model.train()`` to switch dropout off / on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.layers import Axes, _param, make_param

if TYPE_CHECKING:  # pragma: no cover
    from lowrank_jax.models.llama import LlamaConfig


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
    return _param(kaiming_uniform(rngs.params(), shape, fan_in).astype(param_dtype), axes)


class LoRALinear(nnx.Module):
    """``(..., in) -> (..., out)``: ``x @ kernel + dropout(x) @ lora_a @ lora_b * alpha/r``.

    Signature of :class:`lowrank_jax.models.layers.DenseLinear` plus ``rank``,
    ``alpha`` and ``dropout`` (from ``LlamaConfig.linear_rank``, ``lora_alpha``,
    ``lora_dropout``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        logical_axes: Axes,
        init_std: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        rank: int = 128,
        alpha: float = 32.0,
        dropout: float = 0.0,
    ):
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.dtype = dtype
        in_axis, out_axis = logical_axes
        base = make_param(rngs, (in_features, out_features), init_std, param_dtype,
                          tuple(logical_axes))
        self.kernel = FrozenWeight(base[...], out_sharding=tuple(logical_axes),
                                   eager_sharding=False)
        self.lora_a = uniform_param(rngs, (in_features, rank), in_features, param_dtype,
                                    (in_axis, None))
        self.lora_b = _param(jnp.zeros((rank, out_features), param_dtype), (None, out_axis))
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    @staticmethod
    def config_kwargs(cfg: LlamaConfig) -> dict[str, Any]:
        """Extra constructor keywords read from the model config."""
        return {"rank": int(cfg.linear_rank), "alpha": float(cfg.lora_alpha),
                "dropout": float(cfg.lora_dropout)}

    @staticmethod
    def param_count(in_features: int, out_features: int, cfg: LlamaConfig) -> int:
        """Trainable scalars of one projection: ``r * (in + out)`` (``W`` is frozen)."""
        return int(cfg.linear_rank) * (in_features + out_features)

    @staticmethod
    def dense_kernel(node: Mapping[str, Any], cfg: LlamaConfig) -> jax.Array:
        """``W + A B alpha/r`` ``(in, out)`` (float32) from a pure-dict module state."""
        a = jnp.asarray(node["lora_a"], jnp.float32)
        b = jnp.asarray(node["lora_b"], jnp.float32)
        scale = float(cfg.lora_alpha) / a.shape[-1]
        return jnp.asarray(node["kernel"], jnp.float32) + scale * (a @ b)

    def dense_equivalent(self) -> jax.Array:
        """``W_eff = kernel + lora_a @ lora_b * alpha/r``: ``(in, out)`` float32."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        return self.kernel[...].astype(jnp.float32) + self.scale * (a @ b)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        h = jnp.dot(self.dropout(x), self.lora_a[...].astype(self.dtype))  # (..., r)
        return y + jnp.dot(h, self.lora_b[...].astype(self.dtype)) * jnp.asarray(
            self.scale, self.dtype)
