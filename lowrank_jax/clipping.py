"""Gradient clipping by global norm, as ``torch.nn.utils.clip_grad_norm_`` computes it.

The reference pre-training loops (GaLore, Fira, ReLoRA, ...) clip with PyTorch::

    total = sqrt(sum_i ||g_i||^2)
    coef  = min(1, max_norm / (total + 1e-6))
    g_i  <- g_i * coef

``optax.clip_by_global_norm`` instead divides every element by the norm when it
exceeds ``max_norm`` (``g / total * max_norm``, no ``1e-6``).  Besides matching
the reference, multiplying every element by one scalar makes the result
independent of how XLA fuses the element-wise work, so a step ``jax.vmap``-ed
over several runs gives each run exactly the bits it gets alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["clip_by_global_norm_torch"]


def clip_by_global_norm_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (global_norm + eps))`` (stateless).

    Args:
      max_norm: the largest global L2 norm let through; must be > 0.
      eps: added to the norm before dividing (PyTorch uses 1e-6).

    >>> import jax.numpy as jnp
    >>> tx = clip_by_global_norm_torch(1.0)
    >>> u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(None))
    >>> [round(float(x), 4) for x in u["w"]]
    [0.6, 0.8]
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}; use no clipping instead of 0")

    def update_fn(updates, state, params=None):
        del params
        total = optax.tree.norm(updates)
        coef = jnp.minimum(1.0, max_norm / (total + eps))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
