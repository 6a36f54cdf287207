"""SLTrain projection: ``W = B (A alpha/r) + S`` (Han et al., "SLTrain: a sparse
plus low-rank approach for parameter and memory efficient pretraining";
reference ``andyjm3/SLTrain``).

The reference stores PyTorch ``(out, in)`` factors ``B (out, r)`` (zeros) and
``A (r, in)`` (kaiming-uniform).  In the Flax ``(in, out)`` layout
``W_flax = W^T = A^T B^T alpha/r + S^T``, so this module stores the transposes::

    lora_a         (in, r)   Param          U(-1/sqrt(in), 1/sqrt(in))  (= A^T)
    lora_b         (r, out)  Param          zeros                       (= B^T)
    sparse_values  (nnz,)    Param          U(-1/sqrt(in), 1/sqrt(in))
    sparse_index   (nnz,)    SparseSupport  int32 flat row-major indices i*out + j
                                            into the (in, out) matrix, fixed

and ``W_eff (in, out) = lora_a @ lora_b * alpha/r + scatter(sparse_index, sparse_values)``
with ``nnz = max(1, int(density * in * out))`` distinct random positions drawn at
init (ordered by column ``j``, then row ``i``).  Only ``lora_a``, ``lora_b`` and
the support values train; the support itself is a :class:`SparseSupport`
variable (not an ``nnx.Param``): saved with the model, ignored by optimizers.

Forward ``y = ((x @ lora_a) @ lora_b) * alpha/r + x @ S`` with the sparse
product in one of two forms (``sparse_impl``):

* ``"dense"``: scatter ``S`` into a dense ``(in, out)`` matrix, then ``x @ S``;
* ``"gather"``: gather ``x[..., i_k] * v_k`` for every support entry and
  ``segment_sum`` them into output column ``j_k`` (memory ``O(tokens * nnz)``).

On 2 CPU cores at the ``llama_60m`` shapes the dense form was faster for
forward+backward (see ``tests/test_arch_methods.py`` / the project report), so
it is the default of ``SLTrainSpec.sparse_impl``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.layers import (
    LinearDims,
    LinearSpec,
    Projection,
    axes_param,
    token_matmul,
)
from lowrank_jax.models.lora import kaiming_uniform, low_rank_factors

SPARSE_IMPLS = ("dense", "gather")


class SparseSupport(nnx.Variable):
    """Fixed int32 indices of a sparse support: saved with the model, never trained."""


def sltrain_nnz(in_features: int, out_features: int, density: float) -> int:
    """Number of support entries ``max(1, int(density * in * out))``."""
    return max(1, int(density * in_features * out_features))


def random_support(key: jax.Array, in_features: int, out_features: int, nnz: int) -> jax.Array:
    """``nnz`` distinct flat indices ``i*out + j`` (int32), sorted by column ``j`` then row ``i``."""
    size = in_features * out_features
    flat = jax.random.permutation(key, size)[:nnz]
    rows, cols = flat // out_features, flat % out_features
    order = jnp.argsort(cols * in_features + rows)
    return flat[order].astype(jnp.int32)


def scatter_dense(
    index: jax.Array, values: jax.Array, in_features: int, out_features: int
) -> jax.Array:
    """Dense ``(in, out)`` matrix with ``values`` ``(nnz,)`` at flat ``index`` ``(nnz,)``."""
    flat = jnp.zeros((in_features * out_features,), values.dtype)
    return flat.at[index].set(values, unique_indices=True).reshape(in_features, out_features)


def sparse_matmul(
    x: jax.Array,
    index: jax.Array,
    values: jax.Array,
    out_features: int,
    impl: str = "dense",
) -> jax.Array:
    """``x @ S``: ``x`` ``(..., in)``, ``S`` given by flat ``index``/``values`` ``(nnz,)`` -> ``(..., out)``.

    ``impl="dense"`` scatters ``S`` to ``(in, out)`` and multiplies; ``impl="gather"``
    forms ``x[..., i_k] * v_k`` ``(tokens, nnz)`` and segment-sums into columns ``j_k``
    (``index`` must be ordered by column, as :func:`random_support` makes it).
    """
    in_features = x.shape[-1]
    if impl == "dense":
        return token_matmul(x, scatter_dense(index, values, in_features, out_features))
    if impl == "gather":
        rows, cols = index // out_features, index % out_features
        lead = x.shape[:-1]
        xt = x.reshape(-1, in_features).T  # (in, tokens)
        contrib = xt[rows] * values[:, None]  # (nnz, tokens)
        out = jax.ops.segment_sum(contrib, cols, num_segments=out_features,
                                  indices_are_sorted=True)  # (out, tokens)
        return out.T.reshape(*lead, out_features)
    raise ValueError(f"unknown sparse_impl {impl!r}; valid: {SPARSE_IMPLS}")


@dataclasses.dataclass(frozen=True)
class SLTrainSpec(LinearSpec):
    """SLTrain's settings: rank ``r``, scale ``alpha / r``, support density and sparse product."""

    name: ClassVar[str] = "sltrain"
    rank: int = 128
    alpha: float = 32.0
    density: float = 0.03
    sparse_impl: str = "dense"

    def __post_init__(self) -> None:
        if int(self.rank) <= 0:
            raise ValueError(f"SLTrain rank must be positive, got {self.rank}")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"SLTrain density must be in (0, 1], got {self.density}")
        if self.sparse_impl not in SPARSE_IMPLS:
            raise ValueError(f"unknown sparse_impl {self.sparse_impl!r}; valid: {SPARSE_IMPLS}")

    def build(self, dims: LinearDims, rngs: nnx.Rngs) -> nnx.Module:
        return SLTrainLinear(self, dims, rngs=rngs)

    def param_count(self, in_features: int, out_features: int) -> int:
        """Trainable scalars of one projection: ``r * (in + out) + nnz``."""
        return (int(self.rank) * (in_features + out_features)
                + sltrain_nnz(in_features, out_features, float(self.density)))

    def dense_kernel(self, node: Mapping[str, Any]) -> jax.Array:
        """``lora_a @ lora_b * alpha/r + S`` ``(in, out)`` (float32) from a pure-dict module state."""
        a = jnp.asarray(node["lora_a"], jnp.float32)
        b = jnp.asarray(node["lora_b"], jnp.float32)
        s = scatter_dense(jnp.asarray(node["sparse_index"]),
                          jnp.asarray(node["sparse_values"], jnp.float32),
                          a.shape[0], b.shape[1])
        return float(self.alpha) / a.shape[-1] * (a @ b) + s


class SLTrainLinear(Projection):
    """``(..., in) -> (..., out)``: ``x @ (lora_a @ lora_b * alpha/r + S)``, low rank plus sparse."""

    def __init__(self, spec: SLTrainSpec, dims: LinearDims, *, rngs: nnx.Rngs):
        super().__init__(dims)
        self.rank = int(spec.rank)
        self.alpha = float(spec.alpha)
        self.sparse_impl = spec.sparse_impl
        self.lora_a, self.lora_b = low_rank_factors(spec, dims, rngs)
        nnz = sltrain_nnz(dims.in_features, dims.out_features, float(spec.density))
        self.sparse_index = SparseSupport(
            random_support(rngs.params(), dims.in_features, dims.out_features, nnz))
        self.sparse_values = axes_param(
            kaiming_uniform(rngs.params(), (nnz,), dims.in_features).astype(dims.param_dtype),
            (None,))

    @property
    def scale(self) -> float:
        """``alpha / r``."""
        return self.alpha / self.rank

    def dense_equivalent(self) -> jax.Array:
        """``W_eff = lora_a @ lora_b * alpha/r + S``: ``(in, out)`` float32."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        s = scatter_dense(self.sparse_index[...], self.sparse_values[...].astype(jnp.float32),
                          self.in_features, self.out_features)
        return self.scale * (a @ b) + s

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        x = x.astype(self.dtype)
        h = token_matmul(x, self._cast(self.lora_a))  # (..., r)
        low = token_matmul(h, self._cast(self.lora_b)) * jnp.asarray(self.scale, self.dtype)
        sparse = sparse_matmul(x, self.sparse_index[...], self._cast(self.sparse_values),
                               self.out_features, self.sparse_impl)
        return low + sparse
