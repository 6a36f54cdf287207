"""Decoupled weight decay applied after the update, as the GaLore/Fira references do.

The references step ``W <- W - lr * u`` and then ``W <- W - lr * wd * W`` on the
already-updated weight. As an optax update (``updates`` already holding
``-lr * u``) that is ``updates - lr * wd * (params + updates)``. optax's
``add_decayed_weights`` decays the weight before the update instead
(``W - lr * (u + wd * W)``); the two differ by ``lr^2 * wd * u``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class DecayAfterUpdateState(NamedTuple):
    """State of :func:`add_decayed_weights_after_update`."""

    count: jax.Array  # int32, to evaluate a learning-rate schedule


def add_decayed_weights_after_update(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    weight_decay: float,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """Decay the already-updated weight: ``updates - lr_t * wd * (params + updates)``.

    Chain it after the learning-rate scaling. ``learning_rate`` may be a schedule
    (evaluated at the same 0-based count as ``optax.scale_by_learning_rate``).

    >>> import jax.numpy as jnp
    >>> tx = add_decayed_weights_after_update(0.1, 0.5)
    >>> u, _ = tx.update(jnp.array([-0.1]), tx.init(jnp.array([1.0])), jnp.array([1.0]))
    >>> round(float(u[0]), 4)   # (1 - 0.1) * (1 - 0.05) - 1
    -0.145
    """

    def init_fn(params):
        del params
        return DecayAfterUpdateState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG if hasattr(optax, "NO_PARAMS_MSG") else
                             "add_decayed_weights_after_update needs params: pass "
                             "params to tx.update(grads, state, params).")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        coef = jnp.asarray(lr, jnp.float32) * weight_decay
        out = jax.tree.map(
            lambda u, p: (u - (coef * (p + u)).astype(u.dtype)).astype(u.dtype), updates, params)
        return out, DecayAfterUpdateState(optax.safe_increment(state.count))

    tx = optax.GradientTransformation(init_fn, update_fn)
    return optax.masked(tx, mask) if mask is not None else tx
