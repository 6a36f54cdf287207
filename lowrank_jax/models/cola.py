"""CoLA projection: ``y = silu(x A) B`` (Liu et al., "CoLA: Compute-efficient
pre-training of LLMs via low-rank activation"; reference ``alvin-zyl/CoLA``).

Every attention/MLP projection of the decoder becomes this low-rank,
*nonlinear* bottleneck; the SwiGLU around the MLP stays as it is.  Parameters
(Flax layout, ``y = x @ ...``)::

    cola_a  (in, r)   N(0, 1) * r^-1/4 * (in + out)^-1/4    axes (in_axis, None)
    cola_b  (r, out)  N(0, 1) * r^-1/4 * (in + out)^-1/4    axes (None, out_axis)

(the reference draws ``randn / r^(1/4) * sqrt((in+out)^-1/2)``); no bias.  With
``linear="cola"`` the parameter paths read ``layers/<i>/attn/q_proj/cola_a`` etc.,
so GaLore's ``attn``/``mlp`` rule still selects them (both are 2-D).

Because of the SiLU between the factors there is no matrix ``W_eff`` with
``y = x W_eff``: :meth:`CoLALinear.dense_equivalent` raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.layers import Axes, make_param

if TYPE_CHECKING:  # pragma: no cover
    from lowrank_jax.models.llama import LlamaConfig

NO_DENSE_MESSAGE = (
    "CoLA has no dense equivalent: y = silu(x A) B puts a nonlinearity between "
    "the factors, so there is no matrix W_eff with y = x W_eff"
)


def cola_init_std(in_features: int, out_features: int, rank: int) -> float:
    """Standard deviation ``r^-1/4 * (in + out)^-1/4`` of both CoLA factors."""
    return float(rank) ** -0.25 * float(in_features + out_features) ** -0.25


class CoLALinear(nnx.Module):
    """``(..., in) -> (..., out)``: ``silu(x @ cola_a) @ cola_b``; factors ``(in, r)``, ``(r, out)``.

    The signature matches :class:`lowrank_jax.models.layers.DenseLinear` plus
    ``rank``; ``init_std`` (the dense init) is not used.
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
    ):
        del init_std  # CoLA has its own scale
        if rank <= 0:
            raise ValueError(f"CoLA rank must be positive, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.dtype = dtype
        std = cola_init_std(in_features, out_features, rank)
        in_axis, out_axis = logical_axes
        self.cola_a = make_param(rngs, (in_features, rank), std, param_dtype, (in_axis, None))
        self.cola_b = make_param(rngs, (rank, out_features), std, param_dtype, (None, out_axis))

    @staticmethod
    def config_kwargs(cfg: LlamaConfig) -> dict[str, Any]:
        """Extra constructor keywords read from the model config (``rank``)."""
        return {"rank": int(cfg.linear_rank)}

    @staticmethod
    def param_count(in_features: int, out_features: int, cfg: LlamaConfig) -> int:
        """Trainable scalars of one projection: ``r * (in + out)``."""
        return int(cfg.linear_rank) * (in_features + out_features)

    @staticmethod
    def dense_kernel(node: Mapping[str, Any], cfg: LlamaConfig) -> jax.Array:
        """Always raises ``ValueError``: CoLA has no dense ``W_eff``."""
        raise ValueError(NO_DENSE_MESSAGE)

    def dense_equivalent(self) -> jax.Array:
        """Always raises ``ValueError``: CoLA has no dense ``W_eff``."""
        raise ValueError(NO_DENSE_MESSAGE)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(..., in)`` -> ``(..., out)`` in the compute dtype."""
        h = jnp.dot(x.astype(self.dtype), self.cola_a[...].astype(self.dtype))  # (..., r)
        return jnp.dot(jax.nn.silu(h), self.cola_b[...].astype(self.dtype))
