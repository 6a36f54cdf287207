"""Grass: structured sparse projections that select (and rescale) gradient rows.

Muhamed et al. 2024, "Grass: Compute Efficient Low-Memory LLM Training with Structured
Sparse Gradients" (arXiv 2406.17660). The projection ``P^T = rho B`` keeps ``r`` of the
``d`` coordinates of the reduced axis (``B`` a row selection) with a diagonal scaling
``rho``; the projected gradient is those ``r`` rows times ``rho`` and the update is
scattered back through the same ``P``:

* ``selection="top"``: the ``r`` coordinates with the largest gradient norm,
  ``rho = 1`` (deterministic, biased);
* ``selection="norm"``: ``r`` draws with replacement from ``q_j = ||G_j||^2 / ||G||_F^2``,
  ``rho_j = 1 / sqrt(r q_j)`` (so ``E[P P^T] = I``: unbiased);
* ``selection="uniform"``: ``r`` uniform draws with replacement, ``rho = sqrt(d / r)``.

The state is ``r`` int32 indices and ``r`` float32 scales. The authors' repository
(aashiqmuhamed/GRASS) holds only a README: this module follows the paper's equations;
see ``docs/methods/grass.md`` for what is and is not pinned down by them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.torch_adam import scale_by_torch_adam
from lowrank_jax.transform import scale_by_lowrank

__all__ = ["GRASS_SELECTIONS", "GrassProjector", "GrassState", "grass_adamw"]

GRASS_SELECTIONS = ("top", "norm", "uniform")


class GrassState(NamedTuple):
    """State of :class:`GrassProjector`: selected coordinates and their scales."""

    indices: jax.Array  # (r,) int32
    scales: jax.Array   # (r,) float32, rho


@dataclasses.dataclass(frozen=True)
class GrassProjector:
    """Grass's sparse projector (projector protocol of :mod:`lowrank_jax.projectors`).

    Works on the ``(k, d)`` view ``x`` of a gradient (last axis reduced): coordinate
    ``j`` of the reduced axis has norm ``||x[:, j]||``. The basis is the ``(d, r)``
    matrix with ``rho_i`` at ``(indices_i, i)``, so ``x @ B`` selects and scales and
    ``n @ B^T`` scatters back (adding up repeated draws).

    >>> import jax, jax.numpy as jnp
    >>> p = GrassProjector("top")
    >>> x = jnp.array([[0.0, 3.0, 1.0, 2.0]])
    >>> s = p.compute(jax.random.key(0), x, 2, p.init(4, 2, jnp.float32), 0)
    >>> s.indices.tolist(), s.scales.tolist()
    ([1, 3], [1.0, 1.0])
    """

    selection: str = "top"
    name: str = "grass"

    def __post_init__(self):
        if self.selection not in GRASS_SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not supported; use one of "
                             f"{list(GRASS_SELECTIONS)}.")

    def init(self, d, rank, dtype):
        del d, dtype
        return GrassState(jnp.zeros((rank,), jnp.int32), jnp.zeros((rank,), jnp.float32))

    def compute(self, key, x, rank, previous, count):
        del previous, count
        x32 = x.astype(jnp.float32)
        d = x.shape[-1]
        sq = jnp.sum(x32 * x32, axis=0)                             # (d,) squared norms
        if self.selection == "top":
            _, idx = jax.lax.top_k(sq, rank)
            return GrassState(jnp.sort(idx).astype(jnp.int32), jnp.ones((rank,), jnp.float32))
        if self.selection == "norm":
            total = jnp.sum(sq)
            q = jnp.where(total > 0, sq / jnp.where(total > 0, total, 1.0), 1.0 / d)
        else:
            q = jnp.full((d,), 1.0 / d, jnp.float32)
        idx = jax.random.choice(key, d, (rank,), replace=True, p=q)
        idx = jnp.sort(idx).astype(jnp.int32)
        return GrassState(idx, jax.lax.rsqrt(rank * q[idx]).astype(jnp.float32))

    def basis(self, state, d, dtype):
        return (jax.nn.one_hot(state.indices, d, dtype=jnp.float32).T
                * state.scales[None, :]).astype(dtype)

    def nbytes(self, d, rank, dtype):
        del d, dtype
        return 8 * rank


def grass_adamw(
    learning_rate: Any, rank: int = 128, update_proj_gap: int = 200, scale: float = 1.0,
    selection: str = "top", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "left",
    layout: str = "flax", seed: int = 0,
) -> optax.GradientTransformation:
    """Grass with Adam (Muhamed et al. 2024): ``W -= lr * scale * P Adam(P^T G)``.

    Selected matrices: :class:`GrassProjector` refreshed every ``update_proj_gap`` steps
    (``std`` refresh rule: 0-based steps 0, T, 2T, ...), Adam
    (``m_hat / (sqrt(v_hat) + eps)``, :func:`lowrank_jax.torch_adam.scale_by_torch_adam`)
    on the ``r`` selected rows, its moments and step count reset at every refresh; ``scale`` (the paper's
    ``alpha``) on the scattered update. ``proj_type="left"`` selects rows of the torch
    weight ``(out, in)`` (output neurons: the rows of ``delta x^T`` the paper computes
    without materialising the gradient). Other leaves: the same Adam at full size.
    Decoupled weight decay before the update (``torch.optim.AdamW``).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = grass_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    from lowrank_jax.alias import _assemble

    lowrank = scale_by_lowrank(scale_by_torch_adam(b1, b2, eps), rank=rank,
                               projector=GrassProjector(selection), update_every=update_proj_gap,
                               scale=scale, proj_type=proj_type, moments="reset", seed=seed,
                               layout=layout)
    return _assemble(learning_rate, lowrank, scale_by_torch_adam(b1, b2, eps), labels=labels,
                     weight_decay=weight_decay, decay_after_update=False)
