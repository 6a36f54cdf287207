"""NumPy re-statement of Grass-Adam on one torch-layout weight ``(m, n)``, float64.

The authors' repository (aashiqmuhamed/GRASS, commits a388962 and bc1cb62) contains only
a README and a licence, so this follows the paper's equations (Muhamed et al. 2024,
arXiv 2406.17660, Sec. 3: ``P^T = rho B``, ``g_t = P^T grad``, Adam on ``g_t``,
``theta -= alpha eta P Delta_t``, the projection refreshed every ``K`` steps with the
moments reset), with the choices listed in ``docs/methods/grass.md``: rows of the torch
weight are selected (output neurons); ``top`` takes the ``r`` rows of largest norm
with ``rho = 1``; ``norm`` draws ``r`` rows with replacement from
``q_i = ||G_i||^2 / ||G||_F^2`` with ``rho = 1 / sqrt(r q_i)``; Adam's step count
restarts with the moments; decoupled weight decay before the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def grass_adamw_reference(
    w0: np.ndarray, grads: Sequence[np.ndarray], *, rank: int, update_proj_gap: int,
    scale: float, lr: float, selection: str, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0,
    drawn: Callable[[int], np.ndarray] | None = None,
) -> dict:
    """Weights after each step. ``drawn(t)`` gives the sampled rows at 1-based refresh
    step ``t`` for the random selections (random streams cannot be matched)."""
    m, n = w0.shape
    w = np.asarray(w0, np.float64).copy()
    out = []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        t = it + 1
        if it % update_proj_gap == 0:
            sq = np.sum(g * g, axis=1)                         # squared row norms
            if selection == "top":
                idx = np.sort(np.argsort(-sq, kind="stable")[:rank])
                rho = np.ones(rank)
            else:
                q = sq / sq.sum() if selection == "norm" else np.full(m, 1.0 / m)
                idx = np.asarray(drawn(t))
                rho = 1.0 / np.sqrt(rank * q[idx])
            mom = np.zeros((rank, n))
            vel = np.zeros((rank, n))
            k = 0
        low = rho[:, None] * g[idx]
        k += 1
        mom = b1 * mom + (1 - b1) * low
        vel = b2 * vel + (1 - b2) * low * low
        delta = (mom / (1 - b1 ** k)) / (np.sqrt(vel / (1 - b2 ** k)) + eps)
        back = np.zeros((m, n))
        np.add.at(back, idx, rho[:, None] * delta)
        w = w * (1 - lr * weight_decay)
        w = w - lr * scale * back
        out.append(w.copy())
    return {"params": out}
