"""Building blocks of the LLaMA decoder: dense projection, embedding, RMSNorm, RoPE.

Every parameter is an ``nnx.Param`` carrying its logical axis names in the
``out_sharding`` metadata (``eager_sharding=False``, so creating a model needs
no mesh).  Shard later with ``nnx.get_partition_spec`` under
``nnx.logical_axis_rules`` or with :func:`lowrank_jax.models.logical_axes`.

Kernels use the Flax layout ``(in_features, out_features)``: ``y = x @ kernel``.

Projections inside attention and MLP blocks are built only through
:func:`make_linear`; a new layer type is added by putting a builder with the
signature of :class:`DenseLinear` into :data:`LINEAR_BUILDERS` and naming it in
``LlamaConfig.linear``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

if TYPE_CHECKING:  # pragma: no cover - typing only, avoids an import cycle
    from lowrank_jax.models.llama import LlamaConfig

Axes = tuple[str | None, ...]

DTYPES: dict[str, jnp.dtype] = {
    "float32": jnp.dtype(jnp.float32),
    "bfloat16": jnp.dtype(jnp.bfloat16),
}


def to_dtype(name: str) -> jnp.dtype:
    """Map a dtype name (``"float32"`` or ``"bfloat16"``) to a ``jnp.dtype``."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def make_param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    std: float,
    param_dtype: jnp.dtype,
    axes: Axes,
) -> nnx.Param:
    """A ``Param`` drawn from N(0, std^2) in float32, then cast to ``param_dtype``.

    Drawing in float32 first makes a bf16 model the rounded copy of the float32
    model built from the same seed.
    """
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return _param(value.astype(param_dtype), axes)


def _param(value: jax.Array, axes: Axes) -> nnx.Param:
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} axis names {axes} for a {value.ndim}-D parameter")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class DenseLinear(nnx.Module):
    """Bias-free dense projection ``(..., in) -> (..., out)``; kernel ``(in, out)``."""

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
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = make_param(
            rngs, (in_features, out_features), init_std, param_dtype, logical_axes
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


LinearBuilder = Callable[..., nnx.Module]

#: ``LlamaConfig.linear`` name -> builder called as
#: ``builder(in_features, out_features, logical_axes=, init_std=, param_dtype=, dtype=, rngs=)``
#: plus the keywords returned by the builder's optional ``config_kwargs(cfg)``.
#: ``"cola"``, ``"sltrain"`` and ``"lora"`` are registered at the end of this module.
LINEAR_BUILDERS: dict[str, LinearBuilder] = {"dense": DenseLinear}


def make_linear(
    cfg: LlamaConfig,
    in_features: int,
    out_features: int,
    logical_axes: Axes,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Build one attention/MLP projection ``(..., in) -> (..., out)`` of type ``cfg.linear``.

    Args:
      cfg: model config; reads ``linear``, ``init_std``, ``param_dtype``, ``dtype``.
      in_features, out_features: projection sizes.
      logical_axes: two logical axis names of the ``(in, out)`` kernel.
      rngs: random streams for initialisation.
    """
    builder = LINEAR_BUILDERS.get(cfg.linear)
    if builder is None:
        raise ValueError(
            f"unknown linear type {cfg.linear!r}; valid: {sorted(LINEAR_BUILDERS)}"
        )
    # A builder may read more config fields (rank, alpha, ...) through an optional
    # ``config_kwargs(cfg) -> dict`` attribute; DenseLinear has none.
    config_kwargs = getattr(builder, "config_kwargs", None)
    extra = config_kwargs(cfg) if config_kwargs is not None else {}
    return builder(
        in_features,
        out_features,
        logical_axes=tuple(logical_axes),
        init_std=cfg.init_std,
        param_dtype=to_dtype(cfg.param_dtype),
        dtype=to_dtype(cfg.dtype),
        rngs=rngs,
        **extra,
    )


class Embed(nnx.Module):
    """Token embedding table ``embedding``: ``(vocab, hidden)``, axes ``("vocab", "embed")``."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        init_std: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = make_param(
            rngs, (num_embeddings, features), init_std, param_dtype, ("vocab", "embed")
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens``: ``(...)`` int -> ``(..., hidden)`` in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x * scale / sqrt(mean(x^2, -1) + eps)`` over the last axis, in float32.

    ``x``: ``(..., d)``, ``scale``: ``(d,)``; returns float32 ``(..., d)``.
    """
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return x32 * inv_rms * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale`` ``(d,)`` (init 1), axes ``("embed",)``."""

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = _param(jnp.ones((features,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., d)`` -> ``(..., d)`` in the compute dtype (statistics in float32)."""
        return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


def rope_cos_sin(
    positions: jax.Array, head_dim: int, base: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """Rotary tables in the HF LLaMA (rotate-half) layout.

    ``positions``: ``(..., L)`` int. Returns ``cos, sin`` of shape ``(..., L, head_dim)``
    (float32) with angle ``pos * base^(-2i/head_dim)`` at columns ``i`` and ``i + head_dim/2``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (base**exponents)  # (head_dim/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., L, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (..., L, head_dim)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
    """``(..., D)`` -> ``(..., D)``: ``[x1, x2] -> [-x2, x1]`` with halves of size ``D/2``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate queries or keys ``x``: ``(B, L, H, D)`` by tables ``(L, D)`` or ``(B, L, D)``.

    Computed in float32, returned in ``x.dtype``.
    """
    cos = cos[..., None, :]  # broadcast over heads
    sin = sin[..., None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal softmax attention; ``q, k, v``: ``(B, L, H, D)`` -> ``(B, L, H, D)``.

    Scores, mask and softmax in float32; the output is in ``v.dtype``.
    """
    seq_len, head_dim = q.shape[1], q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def param_logical_axes(param: nnx.Variable) -> Any:
    """Logical axis names stored on one parameter (``None`` when it has none)."""
    return param.get_metadata().get("out_sharding")


# Architecture methods (CoLA, SLTrain, LoRA).  Their modules import this one, so
# they are imported last, once everything above is defined.
from lowrank_jax.models.cola import CoLALinear
from lowrank_jax.models.lora import LoRALinear
from lowrank_jax.models.sltrain import SLTrainLinear

LINEAR_BUILDERS.update(cola=CoLALinear, sltrain=SLTrainLinear, lora=LoRALinear)

from lowrank_jax.models.lost import LOSTLinear

LINEAR_BUILDERS["lost"] = LOSTLinear
