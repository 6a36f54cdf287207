"""Flora: parity with a NumPy re-statement of REFERENCE.md "Random projections: Flora".

Reference (torch layout ``(m, n)``): Hugging Face Adafactor (decay -0.8, eps 1e-30,
clipping 1, factored second moment) gives ``u``; the first moment is compressed by a
Gaussian ``B ~ N(0,1)/sqrt(r)`` (``(d, r)``, side by the ``std`` rule): right side
``C <- b1 C + (1 - b1) u B``, update ``C B^T`` (left: ``B^T u`` and ``B C``); every
``kappa`` steps a new ``B`` and ``C <- down_new(up_old(C))``; ``W -= lr * update``.

The random matrices are injected (a projector object returning fixed Gaussian matrices,
one per refresh); kappa = 3 over 7 steps covers two momentum transfers, which with
non-orthonormal ``B`` are not rotations.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from parity_support import FixedProjector, params_after_each_step

from lowrank_jax.alias import flora
from lowrank_jax.transform import scale_by_compressed_momentum

SHAPES = {("attn", "q"): (24, 10), ("mlp", "up"): (12, 30)}  # torch (out, in)
KAPPA, STEPS, LR, RANK = 3, 7, 0.01, 4


def flora_reference(w0, grads, mats, *, lr=LR, b1=0.9):
    m_, n_ = w0.shape
    right = m_ >= n_
    w = w0.astype(np.float64).copy()
    v_row, v_col = np.zeros(m_), np.zeros(n_)
    c = np.zeros((m_, RANK) if right else (RANK, n_))
    for t, g in enumerate(grads, 1):
        # Adafactor (HF, relative_step=False, scale_parameter=False, beta1=None)
        beta2 = 1.0 - t ** -0.8
        sq = g * g + 1e-30
        v_row = beta2 * v_row + (1 - beta2) * sq.mean(axis=1)
        v_col = beta2 * v_col + (1 - beta2) * sq.mean(axis=0)
        u = g / np.sqrt(v_row / v_row.mean())[:, None] / np.sqrt(v_col)[None, :]
        u = u / max(np.sqrt(np.mean(u * u)) / 1.0, 1.0)
        # compressed momentum
        b = mats[min(m_, n_)][(t - 1) // KAPPA]
        if t > 1 and (t - 1) % KAPPA == 0:
            b_old = mats[min(m_, n_)][(t - 2) // KAPPA]
            c = (c @ b_old.T) @ b if right else b.T @ (b_old @ c)
        c = b1 * c + (1 - b1) * (u @ b if right else b.T @ u)
        upd = c @ b.T if right else b @ c
        w = w - lr * upd
    return w


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_flora_parity(layout):
    rng = np.random.default_rng(5)
    mats = {d: rng.standard_normal((3, d, RANK)) / math.sqrt(RANK)
            for d in {min(s) for s in SHAPES.values()}}
    w0 = {k: rng.standard_normal(s) * 0.1 for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    tx = flora(LR, rank=RANK, update_proj_gap=KAPPA, projector=FixedProjector(mats, KAPPA),
               layout=layout)
    *_, final = params_after_each_step(tx, w0, grads, layout)
    for (a, b) in SHAPES:
        ref = flora_reference(w0[(a, b)], [g[(a, b)] for g in grads], mats)
        got = final[(a, b)]
        np.testing.assert_allclose(got, ref, atol=1e-6, err_msg=f"{a}/{b}")


def test_compressed_momentum_state_is_small_and_projector_gaussian():
    tx = scale_by_compressed_momentum(0.9, rank=8, update_every=2)
    u = {"w": jax.random.normal(jax.random.key(0), (64, 256))}  # flax (in, out): reduce in
    state = tx.init(u)
    assert state.momentum["w"].shape == (8, 256)
    _, s1 = tx.update(u, state)
    _, s2 = tx.update(u, s1)
    _, s3 = tx.update(u, s2)
    p1, p2, p3 = (np.asarray(s.projector["w"]) for s in (s1, s2, s3))
    np.testing.assert_array_equal(p1, p2)
    assert not np.allclose(p1, p3)
    assert abs(p1.std() * math.sqrt(8) - 1) < 0.05
