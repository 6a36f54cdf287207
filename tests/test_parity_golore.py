"""GoLore-AdamW parity: ``lj.golore_adamw`` against a float64 NumPy re-statement of its code.

Written from pkumelon/Golore (commit 7ee5a8a), ``peft_pretraining/golore_torch/adamw.py``
and ``golore_projector.py`` (torch layout ``(m, n)``):

* ``adamw.py`` L88-97: ``step`` starts at 0; the projector is asked with that 0-based
  step and ``rand = step >= rand_epoch``; ``golore_projector.py`` L12-22: the ``std``
  rule (right ``B = Vh[:r]`` when ``m >= n``, ``R = G B^T``; else left ``A = U[:, :r]``,
  ``R = A^T G``), a new matrix when ``step % update_proj_gap == 0``; L79-124 SVD or a
  random matrix with orthonormal columns/rows (L71-76);
* ``adamw.py`` L106-114: at a refresh after the first, the first moment is moved into
  the new basis (``A_new^T A_old m`` / ``m B_old B_new^T``) but **into a temporary**:
  the stored ``exp_avg`` is neither moved nor updated at that step (``moments=
  "transport_unstored"``); L118-139: ``step += 1``, ``m = b1 m + (1-b1) R``,
  ``v = b2 v + (1-b2) R^2``, ``W -= lr sqrt(1-b2^t)/(1-b1^t) * scale * back(m/(sqrt(v)+eps))``
  (``scale`` in ``project_back``, L49-68); L149-150: ``W -= lr wd W`` after the update.
  Parameters outside the projection get the same Adam without projection.

At an SVD refresh the reference computes the float64 SVD, checks that our projector
holds the same singular vectors (``ref.align_columns``: each column within 1e-4, up to
sign) and then uses ours, so that the comparison measures the update rule and not the
float32 SVD (whose ~1e-6 basis error Adam amplifies where an entry of ``R`` is small).
The random refreshes cannot be matched across RNGs either: the reference is given the
matrix our optimizer drew and the test checks it has orthonormal columns. 21 steps,
refresh every 4 (steps 1, 5, ..., 21), random from 0-based step 10 on (refreshes at 13,
17, 21); tall, square and wide projected matrices, a 1-D and a 2-D plain leaf.
"""

from __future__ import annotations

import numpy as np
import parity_support as ps
import pytest
from parity_support import PLAIN, PROJECTED, ref

import lowrank_jax as lj

pytestmark = pytest.mark.slow
LR, WD, T, RANK, STEPS, SCALE, RANDOM_AFTER = 0.02, 0.1, 4, 4, 21, 0.25, 10
B1, B2, EPS = 0.9, 0.999, 1e-6


def golore_reference(w0, grads, *, side, bases_used, random_bases, projected):
    """float64 GoLore-AdamW on one torch-layout leaf; the parameters after each step.

    ``bases_used[t]``: our ``(d, r)`` basis at step ``t`` (used at an SVD refresh once
    checked against the float64 SVD); ``random_bases[t]``: our basis at a random refresh."""
    w = np.asarray(w0, np.float64).copy()
    m = v = q = None
    out = []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        moved = None
        if projected and (q is None or it % T == 0):
            if it >= RANDOM_AFTER:
                new = random_bases[it]
            else:
                basis, _ = ref.svd_basis(g, side)
                ref.align_columns(basis[:, :RANK], bases_used[it])   # the same vectors
                new = bases_used[it]
            if q is not None:       # L108-113: moved into a temporary
                moved = (new.T @ q @ m) if side == "left" else (m @ q.T @ new)
            q = new
        r = ref.project(g, q, side) if projected else g
        if m is None:
            m, v = np.zeros_like(r), np.zeros_like(r)
        t = it + 1
        m_step = B1 * (m if moved is None else moved) + (1 - B1) * r
        if moved is None:
            m = m_step
        v = B2 * v + (1 - B2) * r * r
        n = m_step / (np.sqrt(v) + EPS)
        size = LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        w = w - size * (SCALE * ref.project_back(n, q, side) if projected else n)
        w = w - LR * WD * w
        out.append(w.copy())
    return out


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_golore_parity_with_the_reference_code(layout):
    params, grads = ps.make_svd_problem(seed=40, steps=STEPS, rank=RANK, gap=T)
    params = {p: 0.1 * w for p, w in params.items()}
    tx = lj.golore_adamw(LR, rank=RANK, update_proj_gap=T, scale=SCALE, weight_decay=WD,
                         random_after=RANDOM_AFTER, moments="transport_unstored",
                         layout=layout, seed=3)
    traj, upds, projs = ps.run_jax(tx, params, grads, layout)
    errors = {}
    for path, shape in {**PROJECTED, **PLAIN}.items():
        projected = path in PROJECTED
        bases = [pr[path] for pr in projs] if projected else None
        if projected:
            for t in range(RANDOM_AFTER, STEPS, T):
                if t % T == 0:
                    np.testing.assert_allclose(bases[t].T @ bases[t], np.eye(RANK), atol=1e-5)
        r = golore_reference(params[path], [g[path] for g in grads],
                             side=ref.std_side(shape) if projected else None, bases_used=bases, random_bases=bases,
                             projected=projected)
        ps.assert_params_close(f"{path} {layout}", params[path], r, [x[path] for x in traj])
        errors[path] = ps.max_update_error([u[path] for u in upds], r, params[path])
    ps.report_error("golore_adamw", errors)


def test_default_transport_stores_the_moved_moment():
    """The default ``"transport"`` differs from the reference's ``"transport_unstored"``
    after the second refresh (and not before)."""
    params, grads = ps.make_svd_problem(seed=41, steps=2 * T + 2, rank=RANK, gap=T)
    kw = {"rank": RANK, "update_proj_gap": T, "scale": SCALE, "layout": "torch",
          "random_after": 100}
    runs = [ps.run_jax(lj.golore_adamw(LR, moments=mo, **kw), params, grads, "torch")[1]
            for mo in ("transport", "transport_unstored")]
    path = ("attn", "q")
    for t in range(T + 1):
        np.testing.assert_allclose(runs[0][t][path], runs[1][t][path], rtol=1e-6)
    assert not np.allclose(runs[0][T + 1][path], runs[1][T + 1][path], rtol=1e-3)
