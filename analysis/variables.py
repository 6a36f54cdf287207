"""Which model variables a probe moves: the trainable parameters, or every float variable.

The reference (NamrataRShivagunde/low-rank-geometry) works on a PyTorch model's
``named_parameters()``, which include parameters that do not train, such as
ReLoRA's frozen base weight: its random directions perturb them
(``loss-landscape/LLMLandscape``'s direction over every named parameter), its
top-k directions are built from them (``3b_landscape_2d_pca_topk_components_variants.py``
``build_directions_for_k``) and its interpolation moves them
(``7_1d_interpolation.py`` ``_interpolate_and_eval``: every ``named_parameters()``
tensor is set to ``(1 - a) A + a B``).

In the Flax model those live in the checkpoint's ``model_state`` (LoRA's
``FrozenWeight`` kernels), next to variables that are not weights at all
(SLTrain's int32 sparse support, dropout RNG streams). :func:`probe_variables`
returns the floating-point ones as one pytree ``{"params": ..., "state": [...]}``
that a direction or an interpolation moves, and :func:`probe_loss` the loss of
such a tree, with the remaining (non-float) variables passed through unchanged.
One loss callable per (graph definition, state layout), so every jitted metric
compiles once per architecture.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from analysis import runs as R

__all__ = ["ProbeVariables", "probe_loss", "probe_variables"]


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


@dataclass(frozen=True)
class ProbeVariables:
    """The variables a probe moves and what it needs to evaluate the loss.

    Attributes:
      tree: ``{"params": nnx.State, "state": [float arrays]}``: the trainable parameters
        and, with ``include_state``, the float leaves of ``model_state`` (tree order).
      rest: the model-state leaves that are not moved (all of them without ``include_state``).
      loss_fn: ``loss(tree, (batch, rest)) -> (loss, aux)``.
    """

    tree: Any
    rest: tuple[Any, ...]
    loss_fn: Any

    def inputs(self, batch: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]]:
        """The second argument of :attr:`loss_fn` for ``batch``."""
        return batch, self.rest


@functools.lru_cache(maxsize=64)
def probe_loss(graphdef: Any, state_def: Any, moved: tuple[bool, ...]) -> Any:
    """``loss(tree, (batch, rest))``: the model's next-token loss with ``tree["state"]``
    put back at the ``moved`` positions of a model state of structure ``state_def``.

    Cached per argument, so it is one static callable (one compiled program) per
    architecture and state layout.
    """
    base = R.checkpoint_loss(graphdef)

    def loss(tree: Any, inputs: tuple[dict[str, Any], tuple[Any, ...]]) -> Any:
        batch, rest = inputs
        floats, others = iter(tree["state"]), iter(rest)
        leaves = [next(floats) if m else next(others) for m in moved]
        return base(tree["params"], (batch, state_def.unflatten(leaves)))

    return loss


def probe_variables(ckpt: R.Checkpoint, include_state: bool) -> ProbeVariables:
    """The variables of ``ckpt`` a direction or an interpolation moves.

    Args:
      ckpt: a restored checkpoint.
      include_state: also move the float leaves of ``ckpt.model_state`` (frozen
        weights); ``False`` moves the trainable parameters only.

    Returns:
      :class:`ProbeVariables`; for a model without float model state both choices
      give the same tree (and the same random directions).
    """
    leaves, state_def = jax.tree.flatten(ckpt.model_state)
    moved = tuple(bool(include_state and _is_float(x)) for x in leaves)
    floats = [x for x, m in zip(leaves, moved) if m]
    rest = tuple(x for x, m in zip(leaves, moved) if not m)
    return ProbeVariables({"params": ckpt.params, "state": floats}, rest,
                          probe_loss(ckpt.graphdef, state_def, moved))
