"""NumPy re-statement of COAP-AdamW, written from the official code (bytedance/coap).

One weight in torch layout ``(m, n)``, float64. Sources (commit deabc3a):

* ``coap_torch/optimizer/adamw.py``
  - L53-56: ``right`` when ``m >= n`` else ``left``;
  - L58-61 / L88-91: the first call (``ortho_matrix is None``) computes the projector
    with ``get_orthogonal_matrix``;
  - L62 / L92: later, only when ``iter % update_interval == 0`` (``iter`` is
    ``state["step"]`` *before* this step's increment, L51 and L317);
  - L69-73 / L98-101: when also ``iter % (update_interval * reproject_factor) == 0``:
    recompute with ``get_orthogonal_matrix`` (which then starts from the current
    projector), else ``update_proj`` (L75-80 / L103-108) with the stored first moment;
  - L86 / L114: ``low = G P^T`` (right, ``P`` ``(r, n)``) or ``A^T G`` (left, ``A`` ``(m, r)``);
  - L320-336: Adam with ``denom = sqrt(v) + eps`` and
    ``step_size = lr sqrt(1 - b2^t) / (1 - b1^t)``, ``W -= step_size * scale * Back(m / denom)``;
  - L345-346: then ``W -= lr * wd * W``.
* ``coap_torch/projection/coap_matrix.py``
  - L68-103 ``update_proj``: loss ``mse_loss(G P^T P, G)`` (right) or
    ``mse_loss(A A^T G, G)`` (left), times ``1 - mean(cosine_similarity(E, G, dim=1))``
    with ``E = M P`` (right) or ``A M`` (left); backward, ``clip_grad_norm_(proj, 1.0)``,
    ``proj -= grad * 0.1``;
  - L119-147 ``get_orthogonal_matrix``: right: ``compute_orthogonal(G, r, P^T)``; left:
    ``A = compute_orthogonal(G^T, r, A)^T`` (``omega`` ``None`` on the first call).
* ``coap_torch/utils/orthogonal.py`` L17-47 ``compute_orthogonal``: ``Y = X omega``,
  ``Q = qr(Y)``, return ``Vh`` of ``svd(Q^T X)``; ``omega`` is seeded ``randn`` when absent.

The gradient of the projector loss is derived by hand here (no autodiff):
with ``f = ||E||^2 / (m n)``, ``E = G P^T P - G`` (right),
``df/dP = 2/(mn) (P E^T G + P G^T E)``; for ``A``: ``E = A A^T G - G``,
``df/dA = 2/(mn) (E G^T A + G E^T A)``; and for the cosine factor
``h = 1 - mean_i cos(x_i, g_i)`` over rows ``i``, ``dh/dX = -D / m`` with
``D_i = g_i / (|x_i| |g_i|) - cos_i x_i / |x_i|^2``, chained through ``X = M P`` or ``A M``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def compute_orthogonal(x: np.ndarray, rank: int, omega: np.ndarray) -> np.ndarray:
    """``Vh`` ``(rank, n)`` of ``svd(Q^T x)`` with ``Q = qr(x omega)`` (orthogonal.py L38-47)."""
    y = x @ omega
    q, _ = np.linalg.qr(y, mode="reduced")
    _, _, vh = np.linalg.svd(q.T @ x, full_matrices=False)
    return vh[:rank]


def _cos_rows(x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row cosines of ``x`` and ``g`` and their derivative ``D`` with respect to ``x``."""
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    ng = np.linalg.norm(g, axis=1, keepdims=True)
    cos = np.sum(x * g, axis=1, keepdims=True) / (nx * ng)
    d = g / (nx * ng) - cos * x / nx ** 2
    return cos[:, 0], d


def projector_loss_and_grad(proj: np.ndarray, moment: np.ndarray, g: np.ndarray,
                            right: bool) -> tuple[float, np.ndarray]:
    """COAP's ``update_proj`` loss and its gradient with respect to ``proj`` (by hand)."""
    m, n = g.shape
    if right:                                   # proj = P (r, n), moment (m, r)
        e = g @ proj.T @ proj - g
        grad_f = 2.0 / (m * n) * (proj @ e.T @ g + proj @ g.T @ e)
        x = moment @ proj
    else:                                       # proj = A (m, r), moment (r, n)
        e = proj @ proj.T @ g - g
        grad_f = 2.0 / (m * n) * (e @ g.T @ proj + g @ e.T @ proj)
        x = proj @ moment
    f = float(np.sum(e * e) / (m * n))
    cos, dcos = _cos_rows(x, g)
    h = 1.0 - float(np.mean(cos))
    dx = -dcos / m
    grad_h = moment.T @ dx if right else dx @ moment.T
    return f * h, grad_f * h + f * grad_h


def update_proj(proj: np.ndarray, moment: np.ndarray, g: np.ndarray, right: bool,
                lr: float = 0.1, max_norm: float = 1.0) -> np.ndarray:
    """coap_matrix.py L88-99: one clipped gradient step on the projector."""
    _, grad = projector_loss_and_grad(proj, moment, g, right)
    total = np.linalg.norm(grad)
    coef = min(1.0, max_norm / (total + 1e-6))
    return proj - grad * coef * lr


def coap_adamw_reference(
    w0: np.ndarray, grads: Sequence[np.ndarray], *, rank: int, update_interval: int,
    reproject_factor: int, scale: float, lr: float, omega0: np.ndarray,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
    align: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """COAP-AdamW on one matrix; returns the weights after each step and the projectors.

    ``omega0``: the first test matrix (``(n, r)`` right, ``(m, r)`` left), drawn by the
    caller. ``align(t, basis)``, called after every SVD at 1-based step ``t`` with the
    basis as ``(d, r)`` columns, may flip column signs (the SVD's free choice).
    """
    m, n = w0.shape
    right = m >= n
    r = min(rank, m, n)
    w = np.asarray(w0, np.float64).copy()
    proj = None
    exp_avg = exp_avg_sq = None
    params, projectors = [], []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        t = it + 1

        def orthogonal(g, t, omega):
            if right:
                basis = compute_orthogonal(g, r, omega).T          # (n, r)
            else:
                basis = compute_orthogonal(g.T, r, omega).T        # (m, r)
            if align is not None:
                basis = align(t, basis)
            return basis.T if right else basis

        if proj is None:
            proj = orthogonal(g, t, omega0)
        elif it % update_interval == 0:
            if it % (update_interval * reproject_factor) == 0:
                proj = orthogonal(g, t, proj.T if right else proj)
            else:
                proj = update_proj(proj, exp_avg, g, right)
        low = g @ proj.T if right else proj.T @ g
        if exp_avg is None:
            exp_avg = np.zeros_like(low)
            exp_avg_sq = np.zeros_like(low)
        exp_avg = b1 * exp_avg + (1 - b1) * low
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * low * low
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        norm_grad = exp_avg / (np.sqrt(exp_avg_sq) + eps)
        back = norm_grad @ proj if right else proj @ norm_grad
        w = w - step_size * scale * back
        if weight_decay > 0:
            w = w - lr * weight_decay * w
        params.append(w.copy())
        projectors.append((proj.T if right else proj).copy())
    return {"params": params, "projectors": projectors}
