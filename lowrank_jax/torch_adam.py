"""Adam with torch's formula and torch's (float64) bias corrections.

``optax.scale_by_adam`` has torch's formula, ``m_hat / (sqrt(v_hat) + eps)``, but forms
``1 - b^t`` in float32 from ``b`` rounded to float32: for ``b2 = 0.999`` that is
1.3e-5 off in relative terms at ``t = 1`` (6e-6 in the step). The references
(``torch.optim.AdamW``, bitsandbytes' 32-bit kernel) form the corrections from the
exact constants; :func:`scale_by_torch_adam` does too
(:func:`lowrank_jax.inner._one_minus_power`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.inner import ScaleByReferenceAdamState, _one_minus_power

__all__ = ["scale_by_torch_adam"]


def scale_by_torch_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                        ) -> optax.GradientTransformation:
    """``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``u = m_hat / (sqrt(v_hat) + eps)``.

    ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)`` with the corrections computed
    without rounding ``b1``, ``b2`` to float32. The state has optax's field names
    (``count``, ``mu``, ``nu``), so ``moments="reset"``/``"transport"`` work.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_torch_adam()
    >>> u, _ = tx.update(jnp.array([2.0, -1.0]), tx.init(jnp.zeros(2)))
    >>> [round(float(x), 6) for x in u]
    [1.0, -1.0]
    """

    def init_fn(params):
        return ScaleByReferenceAdamState(jnp.zeros([], jnp.int32),
                                         jax.tree.map(jnp.zeros_like, params),
                                         jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = _one_minus_power(b1, t), _one_minus_power(b2, t)
        out = jax.tree.map(
            lambda m, v: ((m / bc1.astype(m.dtype))
                          / (jnp.sqrt(v / bc2.astype(v.dtype)) + eps)).astype(m.dtype), mu, nu)
        return out, ScaleByReferenceAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
