"""Helpers shared by the parity tests of COAP, Q-GaLore, GUM and Grass.

Tolerance: at every step and for every leaf, the implementation's update (float32)
must match the reference's ``W_t - W_{t-1}`` (float64) within ``RTOL`` times the largest
entry of that reference update, and the parameters must match within the sum of those
bounds plus the float32 rounding of ``W`` (two roundings per step).
"""

from __future__ import annotations

import numpy as np

RTOL = 1e-5


def lowrank_grad(rng: np.random.Generator, shape: tuple[int, int], rank: int,
                 scale: float = 1.0) -> np.ndarray:
    """Float32 ``(m, n)`` matrix of exact rank ``rank`` with singular values ``3 .. 1``."""
    m, n = shape
    u = np.linalg.qr(rng.standard_normal((m, rank)))[0]
    v = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    s = scale * np.linspace(3.0, 1.0, rank)
    return ((u * s) @ v.T).astype(np.float32)


def assert_updates_match(name: str, w0: np.ndarray, ref_params: list, got_params: list,
                         got_updates: list, steps: int, rtol: float = RTOL) -> float:
    """Per-step update and parameter check (see the module docstring); returns the
    largest relative update error seen."""
    prev = np.asarray(w0, np.float64)
    wmax = max(np.abs(prev).max(), max(np.abs(w).max() for w in ref_params[:steps]))
    cum, worst = 0.0, 0.0
    for t in range(steps):
        d_ref = np.asarray(ref_params[t], np.float64) - prev
        size = np.abs(d_ref).max()
        cum += size
        err = np.abs(np.asarray(got_updates[t]) - d_ref).max()
        worst = max(worst, err / size)
        assert err <= rtol * size, f"{name}: update at step {t + 1}: {err / size:.2e} relative"
        np.testing.assert_allclose(
            got_params[t], ref_params[t], rtol=0,
            atol=rtol * cum + 2 * (t + 1) * np.finfo(np.float32).eps * wmax,
            err_msg=f"{name}: params after step {t + 1}")
        prev = np.asarray(ref_params[t], np.float64)
    return worst


def separated_grad(rng: np.random.Generator, shape: tuple[int, int], scale: float = 1.0,
                   near: tuple[np.ndarray, np.ndarray] | None = None,
                   jitter: float = 0.05) -> np.ndarray:
    """Float32 ``(m, n)`` matrix with singular values ``scale * geomspace(4, 1/4, k)``.

    Consecutive singular values differ by a factor ``16^(1/(k-1))`` (1.36 for ``k = 10``),
    so a float32 SVD determines every singular vector to ~1e-7. With ``near = (U, V)``
    (orthonormal ``(m, k)``, ``(n, k)``) the singular vectors are those perturbed by
    ``jitter`` and re-orthonormalised (gradients that drift slowly, signs kept).
    """
    m, n = shape
    k = min(m, n)
    if near is None:
        u = np.linalg.qr(rng.standard_normal((m, k)))[0]
        v = np.linalg.qr(rng.standard_normal((n, k)))[0]
    else:
        u = np.linalg.qr(near[0] + jitter * rng.standard_normal((m, k)) / np.sqrt(m))[0]
        v = np.linalg.qr(near[1] + jitter * rng.standard_normal((n, k)) / np.sqrt(n))[0]
        u = u * np.sign(np.sum(u * near[0], axis=0))
        v = v * np.sign(np.sum(v * near[1], axis=0))
    s = scale * np.geomspace(4.0, 0.25, k)
    return ((u * s) @ v.T).astype(np.float32)
