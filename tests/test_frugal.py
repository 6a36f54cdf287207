"""FRUGAL (projection mode): parity with a NumPy re-statement of REFERENCE.md "FRUGAL".

Reference (torch layout ``(m, n)``, side by the ``std`` rule, orthonormal basis ``B``
``(d, r)``): ``R = G B`` (right) or ``B^T G`` (left); at every refresh (t = 1, T+1, ...)
the Adam moments **and its step count** restart; torch-style Adam
``N = m_hat / (sqrt(v_hat) + eps)``; ``update = Back(N) + sign(G - B B^T G)``
(signSGD; ``G - B B^T G`` for ``"sgd"``; nothing for ``"none"``); ``W -= lr * update``.

The projector is injected (a projector object returning fixed Haar-random orthonormal
matrices, a new one per refresh) so both sides use the same subspaces; T = 3 over 7
steps covers two resets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from parity_support import FixedProjector

import lowrank_jax as lj
from lowrank_jax.alias import frugal

SHAPES = {("attn", "q"): (24, 10), ("mlp", "up"): (12, 30)}  # torch (out, in)
T, STEPS, LR, RANK = 3, 7, 0.01, 4


def nest(flat, layout):
    out: dict = {}
    for (a, b), x in flat.items():
        out.setdefault(a, {})[b] = jnp.asarray(x.T if layout == "flax" else x, jnp.float32)
    return out


def frugal_reference(w0, grads, mats, *, state_free, lr=LR, b1=0.9, b2=0.999, eps=1e-8):
    m_, n_ = w0.shape
    right = m_ >= n_
    w = w0.astype(np.float64).copy()
    traj = []
    for t, g in enumerate(grads, 1):
        b = mats[min(m_, n_)][(t - 1) // T]
        if (t - 1) % T == 0:  # refresh: Adam state and count reset
            mom = np.zeros((m_, RANK) if right else (RANK, n_))
            vel = np.zeros_like(mom)
            c = 0
        r = g @ b if right else b.T @ g
        c += 1
        mom = b1 * mom + (1 - b1) * r
        vel = b2 * vel + (1 - b2) * r * r
        n = (mom / (1 - b1 ** c)) / (np.sqrt(vel / (1 - b2 ** c)) + eps)
        back_r, back_n = (r @ b.T, n @ b.T) if right else (b @ r, b @ n)
        free = g - back_r
        upd = back_n + {"signsgd": np.sign(free), "sgd": free, "none": 0.0}[state_free]
        w = w - lr * upd
        traj.append(w.copy())
    return traj


@pytest.mark.parametrize("layout", ["torch", "flax"])
@pytest.mark.parametrize("state_free", ["signsgd", "sgd", "none"])
def test_frugal_parity(layout, state_free):
    rng = np.random.default_rng(11)
    mats = {d: np.stack([np.linalg.qr(rng.standard_normal((d, RANK)))[0] for _ in range(3)])
            for d in {min(s) for s in SHAPES.values()}}
    w0 = {k: rng.standard_normal(s) * 0.1 for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(STEPS)]
    tx = frugal(LR, rank=RANK, update_proj_gap=T, state_free=state_free,
                projector=FixedProjector(mats, T), layout=layout)
    params = nest(w0, layout)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(STEPS):
        updates, state = step(nest(grads[t], layout), state, params)
        params = optax.apply_updates(params, updates)
    for (a, b) in SHAPES:
        ref = frugal_reference(w0[(a, b)], [g[(a, b)] for g in grads], mats,
                               state_free=state_free)[-1]
        got = np.asarray(params[a][b], np.float64)
        got = got.T if layout == "flax" else got
        np.testing.assert_allclose(got, ref, atol=2e-5 * STEPS * LR * 10, err_msg=f"{a}/{b}")


def test_frugal_columns_projector_splits_coordinates():
    """``columns``: selected columns get Adam only (first step: sign-like +-1), the rest sign(G)."""
    g = jax.random.normal(jax.random.key(0), (40, 16))       # flax (in=40, out=16): reduce out
    tx = lj.scale_by_lowrank(optax.scale_by_adam(eps=1e-8), rank=4, projector="columns",
                             scale=1.0, moments="reset", residual="signsgd")
    u, state = tx.update({"w": g}, tx.init({"w": g}))
    idx = np.asarray(state.projector["w"].indices)
    assert idx.shape == (4,) and len(set(idx.tolist())) == 4
    u, g = np.asarray(u["w"]), np.asarray(g)
    other = np.setdiff1d(np.arange(16), idx)
    np.testing.assert_array_equal(u[:, other], np.sign(g[:, other]))
    np.testing.assert_allclose(u[:, idx], np.sign(g[:, idx]), atol=1e-4)  # Adam at t=1


def test_frugal_density_sets_rank_per_leaf_and_resets_count():
    params = {"attn": {"q": jnp.ones((64, 32))}, "mlp": {"up": jnp.ones((16, 48))}}
    tx = frugal(1e-2, rank=1000, density=0.25, update_proj_gap=2, projector="random")
    state = tx.init(params)
    mu = optax.tree_utils.tree_get(lj.find_lowrank_states(state)[0].inner_state, "mu")
    assert mu["attn"]["q"].shape == (64, 8)   # 0.25 * 32
    assert mu["mlp"]["up"].shape == (4, 48)   # 0.25 * 16
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    step = jax.jit(tx.update)
    counts = []
    for _ in range(4):
        _, state = step(grads, state, params)
        inner = lj.find_lowrank_states(state)[0].inner_state
        counts.append(int(optax.tree_utils.tree_get(inner, "count")))
    assert counts == [1, 2, 1, 2]
