"""Per-layer activations of the LLaMA decoder (the inputs of the activation metrics)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["layer_activations", "layer_names"]


def layer_names(num_layers: int) -> list[str]:
    """``["embed", "block_0", ..., "block_{n-1}", "final_norm"]``."""
    return ["embed", *[f"block_{i}" for i in range(num_layers)], "final_norm"]


@partial(jax.jit, static_argnames=("graphdef",))
def _activations(graphdef: Any, params: Any, model_state: Any, tokens: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params, model_state)
    x = model.embed(tokens)
    outs = [x]
    for block in model.layers:
        x = block(x)
        outs.append(x)
    outs.append(model.final_norm(x))
    stacked = jnp.stack([o.astype(jnp.float32) for o in outs])       # (n_layers + 2, B, L, d)
    return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])


def layer_activations(graphdef: Any, params: Any, model_state: Any, tokens: Any) -> jax.Array:
    """The residual stream after the embedding, after each block and after the final norm.

    Args:
      graphdef / params / model_state: the model, ``nnx.merge(graphdef, params, model_state)``
        (graphdef split as ``nnx.split(model, nnx.Param, ...)``).
      tokens: ``(B, L)`` int32 input tokens.

    Returns:
      float32 ``(num_layers + 2, B * L, hidden)``; row order follows
      :func:`layer_names` and every token is one example.
    """
    return _activations(graphdef, params, model_state, jnp.asarray(tokens, jnp.int32))
