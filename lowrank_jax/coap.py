"""COAP: correlation-aware gradient projection (Xiao et al., CVPR 2025).

The projector of a matrix is not recomputed from scratch at every refresh. In
the ``(k, d)`` view ``x`` of the gradient (last axis reduced, basis ``B`` of
shape ``(d, r)``, GaLore's ``std`` side) and with ``count`` the 0-based step:

* first step: ``B = range_basis(x, Omega)`` with a Gaussian ``Omega`` ``(d, r)``;
* ``count`` a multiple of ``T_u * F`` (``update_proj_gap * reproject_factor``):
  ``B = range_basis(x, B)`` (one randomized range-finder pass started from the
  current projector);
* other multiples of ``T_u``: one clipped gradient step on ``B`` of
  ``L(B) = mse(x B B^T, x) * (1 - mean cos(M B^T, x))`` where ``M`` ``(k, r)`` is
  Adam's first moment in projected coordinates and the cosines are taken per
  output neuron of the weight (rows of ``x`` when ``d`` is the input axis,
  columns otherwise); ``g = dL/dB``, ``g *= min(1, 1 / (||g|| + 1e-6))``,
  ``B -= 0.1 g`` (not re-orthonormalised);

where ``range_basis(x, W) = V`` from ``Q = qr(x W)``, ``Q^T x = U S V^T``.
Adam's moments are kept across refreshes (the reference's ``restore_state=False``,
its setting for LLaMA). The rest is GaLore-AdamW: eps on the uncorrected root,
``scale`` on the back-projected update, weight decay after the update.

Reference: bytedance/coap ``coap_torch/optimizer/adamw.py`` (``COAPAdamProjector``,
``AdamW.step``), ``coap_torch/projection/coap_matrix.py`` (``update_proj``,
``get_orthogonal_matrix``), ``coap_torch/utils/orthogonal.py``
(``compute_orthogonal``); see ``docs/methods/coap.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.inner import scale_by_reference_adam
from lowrank_jax.quantized import scale_by_adam_8bit
from lowrank_jax.stateful_lowrank import scale_by_stateful_lowrank
from lowrank_jax.transform import check_static_int

__all__ = ["COAPProjector", "coap_adamw", "coap_loss", "range_basis", "scale_by_coap"]


def range_basis(x: jax.Array, omega: jax.Array) -> jax.Array:
    """Right singular vectors ``(d, r)`` of ``Q^T x`` with ``Q = qr(x omega)``.

    One pass of the randomized range finder (COAP's ``compute_orthogonal``): for
    ``x`` ``(k, d)`` and a test matrix ``omega`` ``(d, r)``, ``Q`` ``(k, r)`` is an
    orthonormal basis of ``span(x omega)`` and the result the right singular
    vectors of the ``(r, d)`` matrix ``Q^T x``, in order of descending singular value.

    >>> import jax, jax.numpy as jnp
    >>> x = jax.random.normal(jax.random.key(0), (6, 2)) @ jax.random.normal(jax.random.key(1), (2, 5))
    >>> b = range_basis(x, jax.random.normal(jax.random.key(2), (5, 2)))
    >>> b.shape, bool(jnp.allclose(x @ b @ b.T, x, atol=1e-4))
    ((5, 2), True)
    """
    y = x @ omega
    q, _ = jnp.linalg.qr(y, mode="reduced")
    _, _, vh = jnp.linalg.svd(q.T @ x, full_matrices=False)
    return vh.T


def _cosine(a: jax.Array, b: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
    """torch's ``cosine_similarity``: each norm clamped below at ``eps``."""
    na = jnp.maximum(jnp.linalg.norm(a, axis=axis), eps)
    nb = jnp.maximum(jnp.linalg.norm(b, axis=axis), eps)
    return jnp.sum(a * b, axis=axis) / (na * nb)


def coap_loss(basis: jax.Array, x: jax.Array, moment: jax.Array, cos_axis: int) -> jax.Array:
    """COAP's projector objective ``mse(x B B^T, x) * (1 - mean cos(M B^T, x))``.

    Args:
      basis: ``B`` ``(d, r)``.
      x: gradient view ``(k, d)``.
      moment: first moment ``M`` ``(k, r)`` in projected coordinates.
      cos_axis: axis of ``x`` along which one cosine is taken (1: per row).

    Returns:
      A float32 scalar.
    """
    recon = x @ basis @ basis.T
    mse = jnp.mean((recon - x) ** 2)
    cos = _cosine(moment @ basis.T, x, axis=cos_axis)
    return mse * (1.0 - jnp.mean(cos))


@dataclasses.dataclass(frozen=True)
class COAPProjector:
    """COAP's projector as a stateful projector (:mod:`lowrank_jax.stateful_lowrank`).

    The state is the basis ``B`` ``(d, r)`` itself.

    Args:
      update_interval: ``T_u``: the projector moves every ``T_u`` steps.
      reproject_factor: ``F``: every ``F``-th move is a range-finder pass instead of
        a gradient step.
      lr: step size of the gradient step (the reference's fixed 0.1).
      max_grad_norm: clipping norm of that step (the reference's 1.0).
    """

    update_interval: int = 40
    reproject_factor: int = 5
    lr: float = 0.1
    max_grad_norm: float = 1.0
    name: str = "coap"
    needs_moment: bool = True

    def init(self, d, rank, dtype, ctx):
        del ctx
        return jnp.zeros((d, rank), dtype)

    def due(self, state, count):
        del state
        return count % self.update_interval == 0

    def compute(self, key, x, rank, previous, count, ctx):
        x32 = x.astype(jnp.float32)
        prev = previous.astype(jnp.float32)
        d = x.shape[-1]
        cos_axis = 1 if ctx.reduces_input else 0

        def first():
            return range_basis(x32, jax.random.normal(key, (d, rank), jnp.float32))

        def reproject():
            return range_basis(x32, prev)

        def descend():
            g = jax.grad(coap_loss)(prev, x32, ctx.moment, cos_axis)
            coef = jnp.minimum(1.0, self.max_grad_norm / (jnp.linalg.norm(g) + 1e-6))
            return prev - self.lr * (g * coef)

        period = self.update_interval * self.reproject_factor
        index = jnp.where(ctx.initialized, jnp.where(count % period == 0, 1, 2), 0)
        new = jax.lax.switch(index, (first, reproject, descend))
        return new.astype(previous.dtype)

    def basis(self, state, d, dtype, ctx):
        del d, ctx
        return state.astype(dtype)

    def nbytes(self, d, rank, dtype):
        return d * rank * np.dtype(dtype).itemsize


def scale_by_coap(
    inner: optax.GradientTransformation,
    *,
    rank: int = 128,
    update_proj_gap: int = 40,
    reproject_factor: int = 5,
    scale: float = 0.25,
    proj_type: str = "std",
    layout: str = "flax",
    seed: int = 0,
    rank_ratio: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """COAP's projection around ``inner`` (an Adam-like transformation with a ``mu``).

    Args:
      inner: runs on the projected gradients; its ``mu`` drives the projector.
      rank: projection rank (clamped to ``min(shape)``).
      update_proj_gap, reproject_factor: ``T_u`` (the reference's ``update_interval``)
        and ``F`` (see the module docstring).
      scale: factor on the back-projected update.
      proj_type, layout, seed: as :func:`lowrank_jax.scale_by_lowrank`.
      rank_ratio: COAP's ``rank_ratio_matrix``: rank ``max(min(shape) // rank_ratio, 1)``.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_coap(scale_by_reference_adam(), rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 4))})
    >>> state.projector["w"].shape          # kernel (in=8, out=4): reduce out
    (4, 2)
    """
    proj = COAPProjector(check_static_int("update_proj_gap", update_proj_gap),
                         check_static_int("reproject_factor", reproject_factor))
    return scale_by_stateful_lowrank(inner, rank=rank, projector=proj, scale=scale,
                                     proj_type=proj_type, layout=layout, seed=seed,
                                     rank_ratio=rank_ratio)


def coap_adamw(
    learning_rate: Any, rank: int = 128, update_proj_gap: int = 40,
    reproject_factor: int = 5, scale: float = 0.25, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-6, weight_decay: float = 0.0, labels: Any = None,
    proj_type: str = "std", layout: str = "flax", seed: int = 0,
    rank_ratio: float | None = None, inner: str = "adam", block_size: int = 256,
) -> optax.GradientTransformation:
    """COAP-AdamW (bytedance/coap ``CoapAdamW``; ``inner="adam8bit"``: ``CoapAdamW8bit``).

    Selected matrices: :func:`scale_by_coap` around GaLore's Adam (eps added to
    the uncorrected ``sqrt(v)``); other leaves: the same Adam at full size; weight
    decay ``W -= lr wd W`` after the update, as the reference. Defaults are the
    reference's LLaMA-1B pre-training settings (``update_interval`` 40,
    ``reproject_factor`` 5, ``coap_scale`` 0.25).

    Args:
      learning_rate: a float or an optax schedule.
      rank, update_proj_gap, reproject_factor, scale, rank_ratio: see :func:`scale_by_coap`
        (``update_proj_gap`` is the reference's ``update_interval``).
      b1, b2, eps: Adam's constants (reference eps 1e-6).
      weight_decay: decoupled decay on every leaf.
      labels: which leaves are projected (``None``: GaLore's name rule).
      inner: ``"adam"`` or ``"adam8bit"`` (moments blockwise 8-bit,
        :func:`lowrank_jax.quantized.scale_by_adam_8bit`).
      block_size: quantisation block of ``"adam8bit"``.

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = coap_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["attn"]["q"].shape
    (16, 8)
    """
    from lowrank_jax.alias import _assemble

    if inner == "adam":
        make = lambda: scale_by_reference_adam(b1, b2, eps)
    elif inner == "adam8bit":
        make = lambda: scale_by_adam_8bit(b1, b2, eps, block_size=block_size)
    else:
        raise ValueError(f"inner={inner!r} is not supported; use 'adam' or 'adam8bit'.")
    lowrank = scale_by_coap(make(), rank=rank, update_proj_gap=update_proj_gap,
                            reproject_factor=reproject_factor, scale=scale,
                            proj_type=proj_type, layout=layout, seed=seed,
                            rank_ratio=rank_ratio)
    return _assemble(learning_rate, lowrank, make(), labels=labels, weight_decay=weight_decay,
                     decay_after_update=True)
