"""Online Subspace Descent projector: parity with a NumPy re-statement, and it tracks a subspace.

Reference (kyleliang919/Online-Subspace-Descent ``galore_projector.py``, ``continuous``),
re-stated for a right projector on ``x`` ``(k, d)`` with ``Q`` ``(d, r)``:

* step 1: ``Q_1`` = top-r right singular vectors of ``x_1``; no optimizer step;
* step t >= 2: the projection uses ``Q_t``; the PCA loss
  ``L(Q) = ||x_hat Q Q^T - x_hat||_F^2`` (``x_hat = x_t / ||x_t||_F``) has gradient
  ``2 (x_hat^T E Q + E^T x_hat Q)`` with ``E = x_hat Q Q^T - x_hat``; after the step
  torch AdamW (lr, betas, eps, weight decay 0.01) moves ``Q_t`` to ``Q_{t+1}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lowrank_jax as lj
from lowrank_jax.projectors import OnlinePCAProjector, pca_loss

K, D, R = 20, 8, 3


def osd_reference(xs, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    """The projector in use at each step (float64)."""
    qs = []
    q = m = v = None
    n_adam = 0
    for t, x in enumerate(xs, 1):
        if t == 1:
            q = np.linalg.svd(x, full_matrices=False)[2][:R].T
            m, v = np.zeros_like(q), np.zeros_like(q)
        qs.append(q.copy())
        if t >= 2:                                   # backward at Q_t, then AdamW step
            xh = x / np.linalg.norm(x)
            e = xh @ q @ q.T - xh
            g = 2 * (xh.T @ e @ q + e.T @ xh @ q)
            n_adam += 1
            q = q * (1 - lr * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            q = q - lr * (m / (1 - b1 ** n_adam)) / (np.sqrt(v / (1 - b2 ** n_adam)) + eps)
    return qs


def test_online_pca_parity_with_reference():
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((K, D)) for _ in range(6)]
    proj = OnlinePCAProjector(lr=0.05)
    state = proj.init(D, R, jnp.float32)
    compute = jax.jit(lambda x, s: proj.compute(None, x, R, s, 0))
    got = []
    for x in xs:
        state = compute(jnp.asarray(x, jnp.float32), state)
        got.append(np.asarray(proj.basis(state, D, jnp.float32), np.float64))
    want = osd_reference(xs, lr=0.05)
    # the SVD basis is defined up to column signs: align on the first step, keep after
    signs = np.sign(np.sum(got[0] * want[0], axis=0))
    for t, (a, b) in enumerate(zip(got, want), 1):
        np.testing.assert_allclose(a * signs, b, atol=2e-5, err_msg=f"step {t}")


def test_pca_loss_gradient_is_the_analytic_one():
    rng = np.random.default_rng(1)
    x, q = rng.standard_normal((K, D)), rng.standard_normal((D, R))
    xh = x / np.linalg.norm(x)
    e = xh @ q @ q.T - xh
    want = 2 * (xh.T @ e @ q + e.T @ xh @ q)
    got = jax.grad(pca_loss)(jnp.asarray(q, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_online_pca_moves_towards_a_new_gradient_subspace():
    """After a change of subspace, descent raises the overlap with the new top-r space."""
    rng = np.random.default_rng(2)
    first = rng.standard_normal((K, D))
    u = np.linalg.qr(rng.standard_normal((K, R)))[0]
    v = np.linalg.qr(rng.standard_normal((D, R)))[0]
    target = u @ np.diag([3.0, 2.0, 1.0]) @ v.T
    proj = OnlinePCAProjector(lr=0.02)
    state = proj.init(D, R, jnp.float32)
    step = jax.jit(lambda x, s: proj.compute(None, x, R, s, 0))
    state = step(jnp.asarray(first, jnp.float32), state)

    def overlap(s):
        q = np.linalg.qr(np.asarray(s.basis, np.float64))[0]
        return float(lj.subspace_overlap(jnp.asarray(q), jnp.asarray(v)))

    before = overlap(state)
    for _ in range(150):
        state = step(jnp.asarray(target, jnp.float32), state)
    assert overlap(state) > 0.95 > before + 0.3, (before, overlap(state))


def test_online_pca_runs_inside_galore_every_step():
    params = {"mlp": {"up": jnp.ones((16, 8)) * 0.1}}
    tx = lj.galore_adamw(1e-2, rank=2, update_proj_gap=1, projector="online_pca")
    state = tx.init(params)
    grads = {"mlp": {"up": jax.random.normal(jax.random.key(0), (16, 8))}}
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(grads, state, params)
    proj_state = lj.find_lowrank_states(state)[0].projector["mlp"]["up"]
    assert int(proj_state.steps) == 3
    assert np.isfinite(np.asarray(updates["mlp"]["up"])).all()
    nbytes = lj.state_nbytes(proj_state)
    assert nbytes == OnlinePCAProjector().nbytes(8, 2, jnp.float32)
