"""Independent NumPy re-statements of the reference low-rank optimizer update rules.

Written from the authors' code, *not* from ``lowrank_jax``: jiaweizzhao/GaLore
(``galore_torch/adamw.py``, ``galore_projector.py``), xichen-fy/Fira
(``fira/fira_adamw.py``), IST-DASLab/ISTA-DASLab-Optimizers
(``fft_low_rank/dct_adamw.py``, ``fft_projector.py``); the test modules cite the lines.
SARA (arXiv 2502.05790) has no published code: its reference is GaLore with the sampled
indices.  Everything is float64 NumPy on one
weight matrix in PyTorch layout ``(out, in) = (m, n)``, like the reference code.

Conventions shared by all functions
-----------------------------------
* ``w0``: initial weight ``(m, n)``; ``grads``: sequence of gradients ``(m, n)``, one per
  step; step ``t`` is 1-based.
* Each ``*_reference`` function returns a dict with ``"params"`` (list, the weight
  *after* each step, float64) plus method-specific diagnostics.
* The projector is stored as ``Q`` of shape ``(d, r)``: orthonormal columns spanning the
  kept subspace of the reduced axis (``d`` = its length).  Right projector (``m >= n``,
  reduce ``in``): ``P = Q^T`` of shape ``(r, n)``, ``R = G Q``, ``Back(N) = N Q^T``.
  Left projector (``m < n``, reduce ``out``): ``P = Q`` of shape ``(m, r)``, ``R = Q^T G``,
  ``Back(N) = Q N``.
* SVDs are computed in float64 on the given gradient (the reference does them in
  float32; the float64 result is the more accurate "truth" the float32 implementation is
  compared against, within float32 tolerance).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------------------
# Projection geometry
# --------------------------------------------------------------------------------------


def std_side(shape: tuple[int, int]) -> str:
    """Side of the ``proj_type='std'`` projector for a torch-layout ``(m, n)`` matrix.

    REFERENCE.md "Projection geometry": reduce the smaller dimension; ``m >= n`` (the
    square case included) is a right projector (reduces ``in`` = ``n``), else left.
    """
    m, n = shape
    return "right" if m >= n else "left"


def project(g: np.ndarray, q: np.ndarray, side: str) -> np.ndarray:
    """Low-rank gradient ``R``: ``G P^T = G Q`` (right) or ``P^T G = Q^T G`` (left)."""
    return g @ q if side == "right" else q.T @ g


def project_back(n_low: np.ndarray, q: np.ndarray, side: str) -> np.ndarray:
    """Back-projection without ``scale``: ``N P = N Q^T`` (right) or ``P N = Q N`` (left)."""
    return n_low @ q.T if side == "right" else q @ n_low


def svd_basis(g: np.ndarray, side: str) -> tuple[np.ndarray, np.ndarray]:
    """All singular vectors of the reduced axis (columns, descending sigma) and sigma.

    Right side: rows of ``Vh`` (as columns); left side: columns of ``U``
    (``full_matrices=False``, REFERENCE.md "Projection geometry").
    """
    u, s, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return (vh.T if side == "right" else u), s


# --------------------------------------------------------------------------------------
# Plain Adam(W) used for the non-projected parameters
# --------------------------------------------------------------------------------------


def adamw_reference(
    w0: np.ndarray,
    grads: Sequence[np.ndarray],
    *,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> dict:
    """Adam as in the GaLore/Fira reference optimizers, for NON-projected parameters.

    REFERENCE.md "GaLore-AdamW" (the same formula without projection):
    ``N = m / (sqrt(v) + eps)`` with eps on the UNcorrected root,
    ``W -= lr * sqrt(1-b2^t)/(1-b1^t) * N``, then ``W -= lr * wd * W`` (decoupled, on the
    already-updated W).  No ``scale`` factor.
    """
    w = np.array(w0, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - step_size * m / (np.sqrt(v) + eps)
        w = w - lr * weight_decay * w
        out.append(w.copy())
    return {"params": out}


def torch_adamw_reference(
    w0: np.ndarray,
    grads: Sequence[np.ndarray],
    *,
    lr: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> dict:
    """``torch.optim.AdamW`` (used by the DCT reference for non-projected parameters).

    Weight decay BEFORE the update, ``W *= 1 - lr*wd``; eps added to the bias-corrected
    root: ``u = m / (eps*sqrt(bc2) + sqrt(v))``, ``W -= lr*sqrt(bc2)/bc1 * u``.
    """
    w = np.array(w0, np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    out = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        w = w * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        w = w - lr * math.sqrt(bc2) / bc1 * (m / (eps * math.sqrt(bc2) + np.sqrt(v)))
        out.append(w.copy())
    return {"params": out}


# --------------------------------------------------------------------------------------
# GaLore-AdamW (and SARA through ``select``)
# --------------------------------------------------------------------------------------

SelectFn = Callable[[int, np.ndarray, int], np.ndarray]
AlignFn = Callable[[int, np.ndarray], np.ndarray]


def _top_r(t: int, sigma: np.ndarray, rank: int) -> np.ndarray:
    del t
    return np.arange(rank)


def _lowrank_adam_loop(
    w0: np.ndarray,
    grads: Sequence[np.ndarray],
    *,
    lr: float,
    rank: int,
    update_proj_gap: int,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    moments: str = "keep",
    select: SelectFn | None = None,
    align: AlignFn | None = None,
    fira: bool = False,
) -> dict:
    """Shared loop of GaLore-AdamW and Fira-AdamW (see their docstrings); its keyword
    arguments and defaults are theirs, ``fira`` selects the residual + limiter."""
    if moments not in ("keep", "reset"):
        raise ValueError(moments)
    w = np.array(w0, np.float64)
    side = std_side(w.shape)
    select = select or _top_r
    q = None
    m = v = None
    count = 0            # bias-correction count (restarted by moments='reset')
    prev_norm = None     # Fira limiter state
    out = {"params": [], "projector": [], "refreshed": [], "side": side,
           "limiter": [], "limiter_state": []}
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        refresh = (t - 1) % update_proj_gap == 0   # 0-based count before increment
        if refresh:
            basis, sigma = svd_basis(g, side)
            idx = np.asarray(select(t, sigma, rank))
            assert idx.shape == (rank,) and np.all(np.diff(idx) > 0), idx
            q = basis[:, idx]
            if align is not None:
                q = align(t, q)
            if m is None or moments == "reset":
                low_shape = project(g, q, side).shape
                m = np.zeros(low_shape)
                v = np.zeros(low_shape)
                count = 0
        r_low = project(g, q, side)
        count += 1
        m = b1 * m + (1 - b1) * r_low
        v = b2 * v + (1 - b2) * r_low * r_low
        n_low = m / (np.sqrt(v) + eps)
        step_size = lr * math.sqrt(1 - b2**count) / (1 - b1**count)
        update = scale * project_back(n_low, q, side)
        if fira:
            s_in = scale * project_back(r_low, q, side)
            # norms over the rank axis of R: per row (right, R is (m, r)), per column (left)
            axis = 1 if side == "right" else 0
            phi = (np.linalg.norm(n_low, axis=axis, keepdims=True)
                   / (np.linalg.norm(r_low, axis=axis, keepdims=True) + 1e-8))
            s_res = (g - s_in) * phi
            norm = np.linalg.norm(s_res)
            if prev_norm is None:
                lim = None
                prev_norm = norm
            else:
                lim = max(norm / (prev_norm + 1e-8), 1.01) / 1.01
                s_res = s_res / lim
                prev_norm = norm / lim
            out["limiter"].append(lim)
            out["limiter_state"].append(prev_norm)
            update = update + s_res
        w = w - step_size * update
        w = w - lr * weight_decay * w
        out["params"].append(w.copy())
        out["projector"].append(q.copy())
        out["refreshed"].append(refresh)
    return out


def galore_adamw_reference(w0: np.ndarray, grads: Sequence[np.ndarray], **kwargs) -> dict:
    """GaLore-AdamW on one projected matrix.

    REFERENCE.md "GaLore-AdamW" and "Projection geometry" (std side rule)::

        refresh at t = 1, T+1, 2T+1, ...  ((t-1) % T == 0): Q = top-r singular vectors
        R = project(G);  m = b1 m + (1-b1) R;  v = b2 v + (1-b2) R^2
        N = m / (sqrt(v) + eps)                         # eps on the UNcorrected root
        W = W - lr * sqrt(1-b2^t)/(1-b1^t) * scale * Back(N)
        W = W - lr * wd * W                             # on the already-updated W

    ``moments='keep'`` (reference) keeps m, v and the count across refreshes (old
    coordinates reused in the new basis); ``'reset'`` (FRUGAL) zeroes m, v and restarts
    the bias-correction count at every refresh.

    Hooks (not part of the reference, for tests):
    ``select(t, sigma, rank)`` returns the ascending indices of the kept singular vectors
    (default ``arange(rank)``, i.e. top-r; SARA passes its sampled indices);
    ``align(t, Q)`` may flip column signs of the freshly computed ``Q`` (SVD signs are
    arbitrary) and returns the Q to use.

    Keywords (signature and defaults in ``_lowrank_adam_loop``): ``lr``, ``rank``,
    ``update_proj_gap`` (required), ``scale=0.25``, ``b1=0.9``, ``b2=0.999``,
    ``eps=1e-6``, ``weight_decay=0.0``, ``moments='keep'``, ``select``, ``align``.

    Returns ``{"params", "projector" (Q used at each step), "refreshed", "side"}``.
    """
    out = _lowrank_adam_loop(w0, grads, fira=False, **kwargs)
    del out["limiter"], out["limiter_state"]
    return out


# --------------------------------------------------------------------------------------
# SARA
# --------------------------------------------------------------------------------------


def sara_sample_reference(sigma: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """One SARA index draw: REFERENCE.md "SARA".

    ``k`` indices drawn WITHOUT replacement, each draw with probability proportional to
    ``sigma`` renormalised over the indices not yet drawn; returned sorted ascending
    (i.e. by descending singular value when ``sigma`` is sorted descending).
    """
    w = np.asarray(sigma, np.float64).copy()
    chosen = []
    for _ in range(k):
        p = w / w.sum()
        i = int(rng.choice(len(w), p=p))
        chosen.append(i)
        w[i] = 0.0
    return np.sort(np.asarray(chosen))


def sara_ordered_probabilities(weights: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every ordered draw ``(i_1, ..., i_k)`` (REFERENCE.md "SARA").

    ``P(i_1..i_k) = prod_j w_{i_j} / (sum(w) - sum_{l<j} w_{i_l})``, by enumeration.
    """
    w = np.asarray(weights, np.float64)
    total = w.sum()
    probs = {}
    for perm in itertools.permutations(range(len(w)), k):
        p, rest = 1.0, total
        for i in perm:
            p *= w[i] / rest
            rest -= w[i]
        probs[perm] = p
    return probs


def sara_subset_probabilities(weights: np.ndarray, k: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every ascending k-subset (sum over its k! draw orders)."""
    probs: dict[tuple[int, ...], float] = {}
    for perm, p in sara_ordered_probabilities(weights, k).items():
        key = tuple(sorted(perm))
        probs[key] = probs.get(key, 0.0) + p
    return probs


def sara_inclusion_probabilities(weights: np.ndarray, k: int) -> np.ndarray:
    """Exact ``P(i in sample)`` for each index (sums to ``k``)."""
    incl = np.zeros(len(weights))
    for subset, p in sara_subset_probabilities(weights, k).items():
        incl[list(subset)] += p
    return incl


def sara_adamw_reference(w0, grads, *, indices: Callable[[int], np.ndarray], **kwargs) -> dict:
    """SARA-AdamW: GaLore-AdamW whose kept singular vectors are the sampled ``indices(t)``.

    REFERENCE.md "SARA": "Everything else is GaLore".  The random draw cannot be
    reproduced bit-for-bit across RNGs, so the caller supplies the indices drawn at each
    refresh step ``t`` (ascending); ``kwargs`` are those of ``galore_adamw_reference``.
    """
    def select(t, sigma, rank):
        idx = np.asarray(indices(t))
        assert idx.shape == (rank,)
        return idx
    return galore_adamw_reference(w0, grads, select=select, **kwargs)


# --------------------------------------------------------------------------------------
# Fira
# --------------------------------------------------------------------------------------


def fira_adamw_reference(w0: np.ndarray, grads: Sequence[np.ndarray], **kwargs) -> dict:
    """Fira-AdamW on one projected matrix.

    REFERENCE.md "Fira" (Adam on R exactly as GaLore, same refresh and side rule)::

        N     = m / (sqrt(v) + eps)                 # no bias correction inside
        S_in  = scale * Back(R)
        phi   = ||N||_k / (||R||_k + 1e-8)          # over the rank axis of R: one value
                                                    # per row (right), per column (left)
        S_res = (G - S_in) * phi                    # the G - scale*P P^T G quirk
        limiter (gamma=1.01): first step prev = ||S_res||_F (no limiting); afterwards
            l = max(||S_res||_F / (prev + 1e-8), gamma) / gamma;  S_res /= l
            prev = ||S_res before division||_F / l
        W = W - lr * sqrt(1-b2^t)/(1-b1^t) * (scale * Back(N) + S_res)
        W = W - lr * wd * W

    Keywords: those of ``galore_adamw_reference`` except ``select`` (always top-r).

    Returns GaLore's dict plus ``"limiter"`` (``l`` per step, ``None`` at step 1) and
    ``"limiter_state"`` (``prev`` after each step).
    """
    return _lowrank_adam_loop(w0, grads, select=None, fira=True, **kwargs)


# --------------------------------------------------------------------------------------
# SVD-free DCT projector (ISTA-DASLab DCTAdamW)
# --------------------------------------------------------------------------------------


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, REFERENCE.md "SVD-free DCT projector".

    ``Q[k, j] = sqrt(2/n) cos(pi k (2j+1) / (2n))``, row ``k = 0`` times ``sqrt(1/2)``.
    """
    k = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    q = math.sqrt(2.0 / n) * np.cos(np.pi * k * (2 * j + 1) / (2 * n))
    q[0] *= math.sqrt(0.5)
    return q


def dct_select_reference(g: np.ndarray, rank: int, side: str | None = None) -> np.ndarray:
    """Top-r DCT indices of ``g`` (torch layout), in DESCENDING score order.

    Right side (``m >= n``): ``S = G Q``, score of column j = ``sum_i |S[i, j]|``.
    Left side (``m < n``): ``S = Q^T G``, score of row j = ``sum_i |S[j, i]|``.
    ``Q`` is the DCT matrix of the smaller dimension.
    """
    g = np.asarray(g, np.float64)
    side = side or std_side(g.shape)
    q = dct_matrix(g.shape[1] if side == "right" else g.shape[0])
    if side == "right":
        score = np.abs(g @ q).sum(axis=0)
    else:
        score = np.abs(q.T @ g).sum(axis=1)
    order = np.argsort(-score, kind="stable")
    return order[:rank].astype(np.int32)


def dct_adamw_reference(
    w0: np.ndarray,
    grads: Sequence[np.ndarray],
    *,
    lr: float,
    rank: int,
    update_proj_gap: int = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    side: str | None = None,
) -> dict:
    """DCTAdamW on one projected matrix (REFERENCE.md "SVD-free DCT projector");
    ``side="right"`` forces the right projection (the reference's special shapes).

    * basis ``Qr = Q[:, idx]`` (columns of the DCT matrix ``Q`` of the smaller dim),
      ``idx`` = top-r scores (``dct_select_reference``), descending score order;
      right side ``R = G Qr``, ``Back(u) = u Qr^T``; left side ``R = Qr^T G``,
      ``Back(u) = Qr u``;
    * refresh at ``t = 1`` and every ``t`` with ``t % T == 0`` (1-based; T=1 = every step);
      m, v kept across refreshes (coordinates reused);
    * torch-AdamW: ``W *= 1 - lr*wd`` BEFORE the update, ``u = m / (eps*sqrt(bc2) +
      sqrt(v))``, ``W -= lr*sqrt(bc2)/bc1 * Back(u)``; no ``scale`` factor.

    Returns ``{"params", "indices" (idx used at each step), "refreshed", "side"}``.
    """
    w = np.array(w0, np.float64)
    side = side or std_side(w.shape)
    q_full = dct_matrix(w.shape[1] if side == "right" else w.shape[0])
    idx = None
    m = v = None
    out = {"params": [], "indices": [], "refreshed": [], "side": side}
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        refresh = t == 1 or t % update_proj_gap == 0
        if refresh:
            idx = dct_select_reference(g, rank, side)
        qr = q_full[:, idx]
        r_low = project(g, qr, side)
        if m is None:
            m = np.zeros_like(r_low)
            v = np.zeros_like(r_low)
        w = w * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * r_low
        v = b2 * v + (1 - b2) * r_low * r_low
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        u = m / (eps * math.sqrt(bc2) + np.sqrt(v))
        w = w - lr * math.sqrt(bc2) / bc1 * project_back(u, qr, side)
        out["params"].append(w.copy())
        out["indices"].append(idx.copy())
        out["refreshed"].append(refresh)
    return out


# --------------------------------------------------------------------------------------
# Test-data helpers (NumPy only)
# --------------------------------------------------------------------------------------


def random_orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """A ``(d, k)`` matrix with Haar-random orthonormal columns (``k <= d``)."""
    q, r = np.linalg.qr(rng.standard_normal((d, k)))
    return q * np.sign(np.diag(r))


def well_conditioned_grad(rng: np.random.Generator, shape: tuple[int, int],
                          scale: float = 1.0, near: np.ndarray | None = None,
                          jitter: float = 0.3) -> np.ndarray:
    """Random float32 ``(m, n)`` matrix with well-separated singular values.

    ``sigma = scale * linspace(3, 1, min(m, n))`` with random singular vectors, so the
    relative gap between consecutive singular values is >= 2/(3(k-1)) and the float32 SVD
    of the implementation determines every singular vector to ~1e-6 (up to sign).
    With ``near`` (another such matrix), the singular vectors are those of ``near``
    perturbed by ``jitter`` Gaussian noise and re-orthonormalised: gradients correlated
    across steps, same spectrum.
    """
    m, n = shape
    k = min(m, n)
    if near is None:
        u = random_orthonormal(rng, m, k)
        v = random_orthonormal(rng, n, k)
    else:
        u0, _, vh0 = np.linalg.svd(np.asarray(near, np.float64), full_matrices=False)
        u = np.linalg.qr(u0 + jitter * rng.standard_normal((m, k)) / np.sqrt(m))[0]
        v = np.linalg.qr(vh0.T + jitter * rng.standard_normal((n, k)) / np.sqrt(n))[0]
    s = scale * np.linspace(3.0, 1.0, k)
    return ((u * s) @ v.T).astype(np.float32)


def align_columns(q: np.ndarray, target: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """Flip the signs of ``q``'s columns to match ``target`` (same shape).

    Asserts first that every column of ``q`` is, up to sign, the corresponding column of
    ``target`` (``| <q_j, target_j> | >= 1 - tol`` for unit columns): only the sign is
    left to the implementation, the subspace and the ordering are checked.
    """
    q = np.asarray(q, np.float64)
    target = np.asarray(target, np.float64)
    assert q.shape == target.shape, (q.shape, target.shape)
    dots = np.sum(q * target, axis=0)
    assert np.all(np.abs(dots) >= 1 - tol), f"columns differ beyond sign: {dots}"
    return q * np.where(dots < 0, -1.0, 1.0)


def min_abs_projection(g: np.ndarray, rank: int) -> float:
    """``min |R_ij|`` of ``R = project(G)`` on G's own top-r singular vectors.

    Adam's ``N = m/(sqrt(v)+eps)`` at a refresh step is ill-conditioned in entries with
    ``|R_ij| ~ eps/sqrt(1-b2)`` (3e-5 for eps=1e-6): there the ~1e-6 float32 error of an
    SVD basis is amplified ~1e4x.  Parity tests reject such gradients at refresh steps.
    """
    g = np.asarray(g, np.float64)
    side = std_side(g.shape)
    basis, _ = svd_basis(g, side)
    return float(np.abs(project(g, basis[:, :rank], side)).min())
