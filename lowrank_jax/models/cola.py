"""CoLA projection: ``y = silu(x A) B`` (Liu et al., "CoLA: Compute-efficient
pre-training of LLMs via low-rank activation"; reference ``alvin-zyl/CoLA``).

Every attention/MLP projection of the decoder becomes this low-rank,
*nonlinear* bottleneck; the SwiGLU around the MLP stays as it is.  Parameters
(Flax layout, ``y = x @ ...``)::

    cola_a  (in, r)   N(0, 1) * r^-1/4 * (in + out)^-1/4    axes (in_axis, None)
    cola_b  (r, out)  N(0, 1) * r^-1/4 * (in + out)^-1/4    axes (None, out_axis)

(the reference draws ``randn / r^(1/4) * sqrt((in+out)^-1/2)``); no bias.  With
``linear=CoLASpec(rank)`` (or ``"cola"``) the parameter paths read
``layers/<i>/attn/q_proj/cola_a`` etc., so GaLore's ``attn``/``mlp`` rule still selects them (both are 2-D).

Because of the SiLU between the factors there is no matrix ``W_eff`` with
``y = x W_eff``: :meth:`CoLALinear.dense_equivalent` raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
from flax import nnx

from lowrank_jax.models.layers import LinearDims, LinearSpec, Projection, make_param, token_matmul

NO_DENSE_MESSAGE = (
    "CoLA has no dense equivalent: y = silu(x A) B puts a nonlinearity between "
    "the factors, so there is no matrix W_eff with y = x W_eff"
)


def cola_init_std(in_features: int, out_features: int, rank: int) -> float:
    """Standard deviation ``r^-1/4 * (in + out)^-1/4`` of both CoLA factors."""
    return float(rank) ** -0.25 * float(in_features + out_features) ** -0.25


@dataclasses.dataclass(frozen=True)
class CoLASpec(LinearSpec):
    """CoLA's settings: the rank ``r`` of the factors."""

    name: ClassVar[str] = "cola"
    rank: int = 128

    def __post_init__(self) -> None:
        if int(self.rank) <= 0:
            raise ValueError(f"CoLA rank must be positive, got {self.rank}")

    def build(self, dims: LinearDims, rngs: nnx.Rngs) -> nnx.Module:
        return CoLALinear(self, dims, rngs=rngs)

    def param_count(self, in_features: int, out_features: int) -> int:
        """Trainable scalars of one projection: ``r * (in + out)``."""
        return int(self.rank) * (in_features + out_features)

    def dense_kernel(self, node: Mapping[str, Any]) -> jax.Array:
        """Always raises ``ValueError``: CoLA has no dense ``W_eff``."""
        raise ValueError(NO_DENSE_MESSAGE)


class CoLALinear(Projection):
    """``(..., in) -> (..., out)``: ``silu(x @ cola_a) @ cola_b``; factors ``(in, r)``, ``(r, out)``.

    ``dims.init_std`` (the dense init) is not used: CoLA has its own scale.
    """

    def __init__(self, spec: CoLASpec, dims: LinearDims, *, rngs: nnx.Rngs):
        super().__init__(dims)
        self.rank = rank = int(spec.rank)
        std = cola_init_std(dims.in_features, dims.out_features, rank)
        in_axis, out_axis = dims.axes
        self.cola_a = make_param(rngs, (dims.in_features, rank), std, dims.param_dtype,
                                 (in_axis, None))
        self.cola_b = make_param(rngs, (rank, dims.out_features), std, dims.param_dtype,
                                 (None, out_axis))

    def dense_equivalent(self) -> jax.Array:
        """Always raises ``ValueError``: CoLA has no dense ``W_eff``."""
        raise ValueError(NO_DENSE_MESSAGE)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        h = token_matmul(x.astype(self.dtype), self._cast(self.cola_a))  # (..., r)
        return token_matmul(jax.nn.silu(h), self._cast(self.cola_b))
