"""NumPy re-statement of GUM (GaLore Unbiased with Muon) on one torch-layout weight.

No implementation by the authors could be found (see ``docs/methods/gum.md``); this
follows the update rule of the paper (Pan, Luo, Liu, You, Zhang 2025, "Unbiased Gradient
Low-Rank Projection", arXiv 2510.17802): per period of ``K`` steps, the projector ``P``
(top-``r`` singular vectors, GaLore's ``std`` side) of the period's first gradient, a
full-rank draw with probability ``q = gamma / N``, and

    low-rank:  R <- beta R + P^T G / (1 - q),          W <- W - lr P NS(R)
    full-rank: R <- beta R + (G - P P^T G) / q,        W <- W - lr NS(R)

with the momentum starting from zero each period. ``NS`` is Muon's quintic
Newton-Schulz iteration as in KellerJordan/Muon ``muon.py`` (``zeropower_via_newtonschulz5``:
``X = G / (||G||_F + eps)``, transposed when it has more rows than columns, then
``A = X X^T``, ``B = b A + c A^2``, ``X = a X + B X`` five times with
``(a, b, c) = (3.4445, -4.7750, 2.0315)``) in float64 and eps 1e-8 (optax's value;
the original runs in bfloat16 with eps 1e-7). Decoupled weight decay before the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
    a, b, c = COEFFS
    x = np.asarray(g, np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (np.linalg.norm(x) + eps)
    for _ in range(steps):
        aa = x @ x.T
        x = a * x + (b * aa + c * aa @ aa) @ x
    return x.T if tall else x


def _back(x: np.ndarray, basis: np.ndarray, right: bool) -> np.ndarray:
    return x @ basis.T if right else basis @ x


def gum_reference(
    w0: np.ndarray, grads: Sequence[np.ndarray], *, rank: int, period: int, q: float,
    beta: float, lr: float, full: Callable[[int], bool], weight_decay: float = 0.0,
    align: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Weights after each step. ``full(t)``: whether the matrix is full-rank in the period
    that starts at 1-based step ``t`` (the draw cannot be matched across frameworks).
    ``align(t, basis)`` may flip the SVD's column signs (``basis`` is ``(d, r)``)."""
    m, n = w0.shape
    right = m >= n
    r = min(rank, m, n)
    w = np.asarray(w0, np.float64).copy()
    out = []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        t = it + 1
        if it % period == 0:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            basis = vh[:r].T if right else u[:, :r]
            if align is not None:
                basis = align(t, basis)
            is_full = full(t)
            mom = np.zeros((m, n)) if is_full else (np.zeros((m, r)) if right else
                                                    np.zeros((r, n)))
        low = g @ basis if right else basis.T @ g
        if is_full:
            mom = beta * mom + (g - _back(low, basis, right)) / q
            step = newton_schulz(mom)
        else:
            mom = beta * mom + low / (1 - q)
            step = _back(newton_schulz(mom), basis, right)
        w = w * (1 - lr * weight_decay)
        w = w - lr * step
        out.append(w.copy())
    return {"params": out}
