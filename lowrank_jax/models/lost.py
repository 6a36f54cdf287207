"""LOST projection: SVD-split low-rank factors plus channel-wise sparse columns.

Li et al. 2025, "LOST: Low-rank and Sparse Pre-training for Large Language Models"
(arXiv 2508.02668). Each projection starts from a dense initial weight ``W``
(torch layout ``(out, in)``, ``N(0, init_std^2)`` as the dense layer), split by its SVD
``W = U S V^T``:

* low-rank part, the top ``r`` singular triplets, as two trainable factors
  (Flax layout, ``y = x @ ...``)::

      lost_a  (in, r)   V_r sqrt(S_r)
      lost_b  (r, out)  sqrt(S_r) U_r^T

* sparse part from the rest ``W_c = W - U_r S_r V_r^T``: the ``k`` input channels
  (columns of ``W_c``) of largest L2 norm, ``k = max(1, round(channel_fraction * in))``;
  their indices ``I`` are fixed (a :class:`SparseSupport` variable, saved, not trained)
  and the values ``lost_s`` ``(k, out) = W_c[:, I]^T`` are trained.

Forward: ``y = gamma * f(x @ lost_a) @ lost_b + (1 - gamma) * x[..., I] @ lost_s`` with
``f`` the identity (``activation=None``) or SiLU. With ``f`` the identity the initial
layer is ``gamma W_r + (1 - gamma) W_c`` restricted to the columns ``I`` in its sparse part.

No implementation by the authors could be had here (the repository the paper names
is not reachable); this layer follows the paper's description as summarised in
``docs/methods/lost.md``, where the open choices (``gamma``, the activation, the
factor split) are listed. They are fields of :class:`LOSTSpec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.layers import LinearDims, LinearSpec, Projection, axes_param
from lowrank_jax.models.sltrain import SparseSupport

ACTIVATIONS = (None, "silu")

NO_DENSE_MESSAGE = ("LOST with activation='silu' has no dense equivalent: the SiLU between "
                    "the factors leaves no matrix W_eff with y = x W_eff")


def lost_channels(in_features: int, channel_fraction: float) -> int:
    """Number of sparse input channels ``max(1, round(channel_fraction * in))``."""
    return max(1, round(channel_fraction * in_features))


def lost_split(kernel: jax.Array, rank: int, channels: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Split a Flax kernel ``(in, out)`` into LOST's factors and sparse columns.

    Args:
      kernel: dense initial weight ``W^T`` ``(in, out)``.
      rank: ``r``, singular triplets kept in the low-rank part.
      channels: ``k``, input channels kept in the sparse part.

    Returns:
      ``(lost_a (in, r), lost_b (r, out), indices (k,) int32 sorted, lost_s (k, out))``,
      float32.

    >>> import jax, jax.numpy as jnp
    >>> a, b, idx, s = lost_split(jax.random.normal(jax.random.key(0), (6, 4)), 2, 3)
    >>> a.shape, b.shape, idx.shape, s.shape
    ((6, 2), (2, 4), (3,), (3, 4))
    """
    w = kernel.astype(jnp.float32).T                                   # torch (out, in)
    u, s, vh = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    lost_a = vh[:rank].T * root                                         # (in, r)
    lost_b = root[:, None] * u[:, :rank].T                              # (r, out)
    rest = w - (u[:, :rank] * s[:rank]) @ vh[:rank]                     # (out, in)
    _, idx = jax.lax.top_k(jnp.linalg.norm(rest, axis=0), channels)
    idx = jnp.sort(idx).astype(jnp.int32)
    return lost_a, lost_b, idx, rest[:, idx].T


def _dense_lost(a: jax.Array, b: jax.Array, index: jax.Array, s: jax.Array,
                gamma: float) -> jax.Array:
    """``gamma A B + (1 - gamma) scatter(I, S)`` ``(in, out)`` float32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    sparse = jnp.zeros((a.shape[0], b.shape[1]), jnp.float32).at[index].set(
        s.astype(jnp.float32))
    return gamma * (a @ b) + (1.0 - gamma) * sparse


@dataclasses.dataclass(frozen=True)
class LOSTSpec(LinearSpec):
    """LOST's settings: rank ``r``, sparse channel fraction, mix ``gamma``, factor activation."""

    name: ClassVar[str] = "lost"
    rank: int = 128
    channel_fraction: float = 0.05
    gamma: float = 0.5
    activation: str | None = None

    def __post_init__(self) -> None:
        if int(self.rank) <= 0:
            raise ValueError(f"LOST rank must be positive, got {self.rank}")
        if not 0.0 < float(self.channel_fraction) <= 1.0:
            raise ValueError(f"LOST channel_fraction must be in (0, 1], got "
                             f"{self.channel_fraction}")
        if not 0.0 <= float(self.gamma) <= 1.0:
            raise ValueError(f"LOST gamma must be in [0, 1], got {self.gamma}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"LOST activation must be one of {ACTIVATIONS}, got "
                             f"{self.activation!r}")

    def build(self, dims: LinearDims, rngs: nnx.Rngs) -> nnx.Module:
        return LOSTLinear(self, dims, rngs=rngs)

    def param_count(self, in_features: int, out_features: int) -> int:
        """Trainable scalars of one projection: ``r (in + out) + k out``."""
        return (int(self.rank) * (in_features + out_features)
                + lost_channels(in_features, float(self.channel_fraction)) * out_features)

    def dense_kernel(self, node: Mapping[str, Any]) -> jax.Array:
        """``W_eff (in, out)`` from a pure-dict module state (identity activation only)."""
        if self.activation is not None:
            raise ValueError(NO_DENSE_MESSAGE)
        return _dense_lost(jnp.asarray(node["lost_a"]), jnp.asarray(node["lost_b"]),
                           jnp.asarray(node["sparse_index"]), jnp.asarray(node["lost_s"]),
                           float(self.gamma))


class LOSTLinear(Projection):
    """``(..., in) -> (..., out)``: ``gamma f(x A) B + (1 - gamma) x[..., I] S``.

    ``dims.init_std`` is the standard deviation of the dense weight that is split.
    """

    def __init__(self, spec: LOSTSpec, dims: LinearDims, *, rngs: nnx.Rngs):
        super().__init__(dims)
        rank, in_features, out_features = int(spec.rank), dims.in_features, dims.out_features
        if rank > min(in_features, out_features):
            raise ValueError(f"LOST rank must be in [1, {min(in_features, out_features)}] for a "
                             f"({in_features}, {out_features}) projection, got {rank}")
        self.rank = rank
        self.gamma = float(spec.gamma)
        self.activation = spec.activation
        in_axis, out_axis = dims.axes
        dense = dims.init_std * jax.random.normal(rngs.params(), (in_features, out_features),
                                                  jnp.float32)
        a, b, idx, s = lost_split(dense, rank,
                                  lost_channels(in_features, float(spec.channel_fraction)))
        self.lost_a = axes_param(a.astype(dims.param_dtype), (in_axis, None))
        self.lost_b = axes_param(b.astype(dims.param_dtype), (None, out_axis))
        self.sparse_index = SparseSupport(idx)
        self.lost_s = axes_param(s.astype(dims.param_dtype), (None, out_axis))

    def dense_equivalent(self) -> jax.Array:
        """``W_eff = gamma A B + (1 - gamma) scatter(I, S)``: ``(in, out)`` float32."""
        if self.activation is not None:
            raise ValueError(NO_DENSE_MESSAGE)
        return _dense_lost(self.lost_a[...], self.lost_b[...], self.sparse_index[...],
                           self.lost_s[...], self.gamma)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        x = x.astype(self.dtype)
        h = jnp.dot(x, self._cast(self.lost_a))                                 # (..., r)
        if self.activation == "silu":
            h = jax.nn.silu(h)
        low = jnp.dot(h, self._cast(self.lost_b))
        picked = jnp.take(x, self.sparse_index[...], axis=-1)                     # (..., k)
        sparse = jnp.dot(picked, self._cast(self.lost_s))
        return (self.gamma * low + (1.0 - self.gamma) * sparse).astype(self.dtype)
