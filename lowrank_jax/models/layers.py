"""Building blocks of the LLaMA decoder: parameters, projections, RMSNorm, RoPE, attention.

This is the leaf module of :mod:`lowrank_jax.models`: it imports nothing from the
package, and every layer module (dense, CoLA, SLTrain, LoRA) builds on it.

Every parameter is an ``nnx.Param`` carrying its logical axis names in the
``out_sharding`` metadata (``eager_sharding=False``, so creating a model needs
no mesh).  Shard later with ``nnx.get_partition_spec`` under
``nnx.logical_axis_rules`` or with :func:`lowrank_jax.models.logical_axes`.

Kernels use the Flax layout ``(in_features, out_features)``: ``y = x @ kernel``.
A projection multiplies the tokens as one ``(tokens, in)`` matrix
(:func:`token_matmul`), so the weight gradient is one ``(tokens, in)^T (tokens,
out)`` product that XLA:CPU runs without copying either operand into a transposed
layout (a contraction over the two axes ``(batch, length)`` made it write the
``(tokens, out)`` gradient transposed first).

Attention and MLP projections are configured by a :class:`LinearSpec` (one small
frozen dataclass per method: :class:`DenseSpec` here, ``CoLASpec``, ``SLTrainSpec``,
``LoRASpec`` in their modules) whose :meth:`LinearSpec.build` makes the layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import sharding as sh

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


def axes_param(value: jax.Array, axes: Axes) -> nnx.Param:
    """``nnx.Param(value)`` with the logical axis names ``axes`` (one per dimension)."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} axis names {axes} for a {value.ndim}-D parameter")
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


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
    return axes_param(value.astype(param_dtype), axes)


def param_logical_axes(param: nnx.Variable) -> Any:
    """Logical axis names stored on one parameter (``None`` when it has none)."""
    return param.get_metadata().get("out_sharding")


def token_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` with the leading axes of ``x`` flattened: ``(..., k) x (k, n) -> (..., n)``.

    bfloat16 operands multiply with float32 accumulation (the ``BF16_BF16_F32`` dot
    algorithm, what GPUs do by default) and the result is rounded to bfloat16; the
    explicit algorithm also keeps XLA:CPU from converting the weights to float32
    copies (which it otherwise keeps alive for the backward pass).

    >>> token_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5))).shape
    (2, 3, 5)
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _bf16_matmul(x2, w) if x.dtype == w.dtype == jnp.bfloat16 else jnp.dot(x2, w)
    return y.reshape(*lead, w.shape[-1])


_BF16_DOT = jax.lax.DotAlgorithmPreset.BF16_BF16_F32


def _bf16_dot(a: jax.Array, b: jax.Array, dims: tuple) -> jax.Array:
    """``dot_general`` of bf16 operands, accumulated in float32, rounded to bf16."""
    out = jax.lax.dot_general(a, b, (dims, ((), ())), precision=_BF16_DOT,
                              preferred_element_type=jnp.float32)
    return out.astype(jnp.bfloat16)


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``(t, k) @ (k, n)`` in bf16 with float32 accumulation, and a backward that stays in bf16.

    The backward multiplies the bf16 cotangent (``dx = g w^T``, ``dw = x^T g``);
    differentiating the float32-accumulated product instead would hand XLA a
    float32 cotangent and a bf16 weight, and XLA converts the weight.
    """
    return _bf16_dot(x, w, ((1,), (0,)))


def _bf16_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple]:
    return _bf16_dot(x, w, ((1,), (0,))), (x, w)


def _bf16_matmul_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    return _bf16_dot(g, w, ((1,), (1,))), _bf16_dot(x, g, ((0,), (0,)))


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


# --------------------------------------------------------------------------- projections


@dataclasses.dataclass(frozen=True)
class LinearDims:
    """What every attention/MLP projection is built from, whatever its method.

    Attributes:
      in_features, out_features: the projection ``(..., in) -> (..., out)``.
      axes: the two logical axis names of the ``(in, out)`` matrix.
      init_std: standard deviation of a dense kernel's N(0, std^2) init.
      param_dtype, dtype: stored parameters / activations.
    """

    in_features: int
    out_features: int
    axes: Axes
    init_std: float
    param_dtype: jnp.dtype
    dtype: jnp.dtype


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """Settings of one projection method (plain data, hashable); subclasses add fields.

    A method is one spec class plus one layer class: ``build(dims, rngs)`` makes
    the layer, ``param_count`` counts its trainable scalars and ``dense_kernel``
    turns a saved module (a pure dict) into the dense ``(in, out)`` matrix.
    """

    name: ClassVar[str] = ""

    def __str__(self) -> str:
        """The method's name (``"dense"``, ``"cola"``, ...), as configs write it."""
        return self.name

    def build(self, dims: LinearDims, rngs: nnx.Rngs) -> nnx.Module:
        """The projection module ``(..., in) -> (..., out)``."""
        raise NotImplementedError

    def param_count(self, in_features: int, out_features: int) -> int:
        """Trainable scalars of one ``(in, out)`` projection."""
        return in_features * out_features

    def dense_kernel(self, node: Mapping[str, Any]) -> jax.Array:
        """``W_eff`` ``(in, out)`` from a module's pure-dict state (``ValueError`` if none)."""
        return node["kernel"]


class Projection(nnx.Module):
    """Common part of every projection: its sizes and compute dtype."""

    def __init__(self, dims: LinearDims):
        self.in_features = dims.in_features
        self.out_features = dims.out_features
        self.dtype = dims.dtype

    def _cast(self, var: nnx.Variable) -> jax.Array:
        return var[...].astype(self.dtype)


class DenseLinear(Projection):
    """Bias-free dense projection ``(..., in) -> (..., out)``; kernel ``(in, out)``."""

    def __init__(self, dims: LinearDims, *, rngs: nnx.Rngs):
        super().__init__(dims)
        self.kernel = make_param(rngs, (dims.in_features, dims.out_features), dims.init_std,
                                 dims.param_dtype, dims.axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        return token_matmul(x.astype(self.dtype), self._cast(self.kernel))


@dataclasses.dataclass(frozen=True)
class DenseSpec(LinearSpec):
    """A plain dense kernel ``(in, out)`` (the default)."""

    name: ClassVar[str] = "dense"

    def build(self, dims: LinearDims, rngs: nnx.Rngs) -> nnx.Module:
        return DenseLinear(dims, rngs=rngs)


# --------------------------------------------------------------------------- other layers


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
        self.scale = axes_param(jnp.ones((features,), param_dtype), ("embed",))

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


#: ``LlamaConfig.attention`` -> ``implementation`` of ``jax.nn.dot_product_attention``.
ATTENTION_IMPLS: dict[str, str | None] = {"auto": None, "xla": "xla", "cudnn": "cudnn"}


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Causal softmax attention; ``q, k, v``: ``(B, L, H, D)`` -> ``(B, L, H, D)``.

    ``jax.nn.dot_product_attention`` with ``is_causal=True``: scores ``q k^T /
    sqrt(D)`` and the softmax in float32, the output in ``v.dtype``. ``impl``:
    ``"auto"`` (a fused kernel where the backend has one, else XLA), ``"xla"`` or
    ``"cudnn"``.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: "
                         f"{sorted(ATTENTION_IMPLS)}")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                        implementation=ATTENTION_IMPLS[impl])


# --------------------------------------------------------------------------- activation sharding

Rules = Sequence[tuple[str, Any]]


def constrain(x: jax.Array, logical: Axes, rules: Rules | None) -> jax.Array:
    """``x`` with a sharding constraint from logical axis names, under the current mesh.

    Resolved by :func:`lowrank_jax.sharding.logical_to_spec` with ``rules`` (the
    table that shards the parameters; ``None``: its default rules) against the
    abstract mesh of the trace (``jax.sharding.use_mesh``); without a mesh, or on
    a mesh of one device, ``x`` is returned unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = sh.logical_to_spec(logical, x.shape, dict(mesh.shape),
                              sh.DEFAULT_RULES if rules is None else rules)
    return jax.lax.with_sharding_constraint(x, spec)
