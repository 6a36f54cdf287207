"""NumPy re-statement of Q-GaLore-AdamW8bit, written from the official code.

VITA-Group/Q-GaLore (commit 5bd2f1c; the same files as pip ``q-galore-torch`` 1.0), one
weight in torch layout ``(m, n)``, float64:

* ``q_galore_torch/q_galore_projector.py``
  - L35 / L62: right projector when ``m >= n``, else left;
  - L36 / L63: refresh when there is no projector yet or ``iter % update_proj_gap == 0``
    (``iter`` = ``state["step"]`` before this step's increment; adamw8bit L79-81, L140);
  - L37, L110-146: ``U, s, Vh = svd(G)``; right: ``P = Vh[:r]`` ``(r, n)``; left:
    ``A = U[:, :r]`` ``(m, r)``;
  - L38-45 / L66-74: ``svd_count += 1``; from the second SVD on, the signed cosine of
    the previous and the new top vector (``P[0]`` / ``A[:, 0]``) enters a queue of length
    ``queue_size`` (oldest dropped); when full with mean ``>= cos_threshold``,
    ``update_proj_gap = int(update_proj_gap * gamma_proj)``;
  - L48-49, L148-168 ``_quantize``: rows of ``group_size`` entries of the row-major
    projector (whole rows when ``group_size <= 0``), ``scale = clamp(max - min, 1e-5) /
    (2^b - 1)``, ``zero = clamp(-round(min / scale), 0, 2^b - 1)``,
    ``code = clamp(round(x / scale) + zero, 0, 2^b - 1)``; L53-55: used as
    ``scale * (code - zero)``;
  - L60 / L89: ``low = G P^T`` or ``A^T G``; L93-107 ``project_back``: ``low P`` or
    ``A low`` (chosen by ``low.shape[0] >= low.shape[1]``), times ``scale``.
* ``q_galore_torch/q_galore_adamw8bit.py`` L72-110: the projected weight's data is
  replaced by zeros of the low-rank shape, bitsandbytes' Adam writes its update there
  with weight decay 0, then ``W = W_saved + project_back(update)`` and
  ``W -= lr * wd * W``. bitsandbytes' 32-bit Adam (used for states under 4096
  elements, ``min_8bit_size``): ``s1 = b1 s1 + (1 - b1) g``, ``s2 = b2 s2 + (1 - b2) g^2``,
  ``update = -lr sqrt(1 - b2^t) / (1 - b1^t) * s1 / (sqrt(s2) + eps sqrt(1 - b2^t))``
  (checked against ``bitsandbytes.functional.optimizer_update_32bit`` 0.50.2 on CPU in
  ``tests/test_qgalore_torch.py``).
* ``q_galore_adamw8bit_simulate.py`` L103-125 ``_quantize`` and L129-165
  ``_quantize_stochastic_round``:
  the INT8 weight simulation (groups of ``group_size`` of the row-major weight).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def quantize(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Dequantised value of ``_quantize`` (round to nearest, ties to even)."""
    shape = w.shape
    rows = w.reshape(-1, group_size) if group_size > 0 else w
    max_int = 2 ** bits - 1
    hi = rows.max(axis=1, keepdims=True)
    lo = rows.min(axis=1, keepdims=True)
    scales = np.maximum(hi - lo, 1e-5) / max_int
    zeros = np.clip(-np.round(lo / scales), 0, max_int)
    codes = np.clip(np.round(rows / scales) + zeros, 0, max_int)
    return (scales * (codes - zeros)).reshape(shape)


def _cosine(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    return float(a @ b / (max(np.linalg.norm(a), eps) * max(np.linalg.norm(b), eps)))


def qgalore_adamw_reference(
    w0: np.ndarray, grads: Sequence[np.ndarray], *, rank: int, update_proj_gap: int,
    scale: float, lr: float, bits: int | None, group_size: int, cos_threshold: float,
    gamma_proj: float, queue_size: int, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0,
    align: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Q-GaLore with bitsandbytes' 32-bit Adam on one matrix.

    ``align(t, basis)`` receives the float basis as ``(d, r)`` columns after each SVD at
    1-based step ``t`` and may flip column signs (the SVD's free choice).

    Returns a dict with the weights after each step (``params``), the dequantised
    projector as ``(d, r)`` columns (``projectors``), the refresh period in force
    after each step (``gaps``) and the number of SVDs done (``svds``).
    """
    m, n = w0.shape
    right = m >= n
    r = min(rank, m, n)
    w = np.asarray(w0, np.float64).copy()
    ortho = None
    gap = update_proj_gap
    queue: list[float] = []
    past = None
    svds = 0
    s1 = s2 = None
    params, projectors, gaps = [], [], []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        t = it + 1
        if ortho is None or it % gap == 0:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            basis = vh[:r].T if right else u[:, :r]          # (d, r)
            if align is not None:
                basis = align(t, basis)
            stored = basis.T if right else basis              # reference layout
            svds += 1
            top = stored[0] if right else stored[:, 0]
            if past is not None:
                if len(queue) == queue_size:
                    queue.pop(0)
                queue.append(_cosine(past, top))
                if len(queue) == queue_size and sum(queue) / queue_size >= cos_threshold:
                    gap = int(gap * gamma_proj)
            past = top.copy()
            ortho = stored if bits is None else quantize(stored, bits, group_size)
        low = g @ ortho.T if right else ortho.T @ g
        if s1 is None:
            s1, s2 = np.zeros_like(low), np.zeros_like(low)
        s1 = b1 * s1 + (1 - b1) * low
        s2 = b2 * s2 + (1 - b2) * low * low
        c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        update = -lr * c2 / c1 * s1 / (np.sqrt(s2) + eps * c2)
        back = update @ ortho if right else ortho @ update
        w = w + scale * back
        w = w - lr * weight_decay * w
        params.append(w.copy())
        projectors.append((ortho.T if right else ortho).copy())
        gaps.append(gap)
    return {"params": params, "projectors": projectors, "gaps": gaps, "svds": svds}


def bnb_adamw_reference(w0: np.ndarray, grads: Sequence[np.ndarray], *, lr: float,
                        b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 0.0) -> dict:
    """bitsandbytes' 32-bit AdamW on a plain parameter: decay first, then the Adam step."""
    w = np.asarray(w0, np.float64).copy()
    s1 = np.zeros_like(w)
    s2 = np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        w = w * (1 - lr * weight_decay)
        s1 = b1 * s1 + (1 - b1) * g
        s2 = b2 * s2 + (1 - b2) * g * g
        c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        w = w - lr * c2 / c1 * s1 / (np.sqrt(s2) + eps * c2)
        out.append(w.copy())
    return {"params": out}
