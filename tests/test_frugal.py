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
from parity_support import FixedProjector, params_after_each_step

import lowrank_jax as lj
import lowrank_jax.block_subspace
from lowrank_jax.alias import frugal

SHAPES = {("attn", "q"): (24, 10), ("mlp", "up"): (12, 30)}  # torch (out, in)
T, STEPS, LR, RANK = 3, 7, 0.01, 4


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
    tx = frugal(LR, rank=RANK, update_proj_gap=T, state_free=state_free, subspace="projection",
                projector=FixedProjector(mats, T), layout=layout)
    *_, final = params_after_each_step(tx, w0, grads, layout)
    for (a, b) in SHAPES:
        ref = frugal_reference(w0[(a, b)], [g[(a, b)] for g in grads], mats,
                               state_free=state_free)[-1]
        got = final[(a, b)]
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
    tx = frugal(1e-2, rank=1000, density=0.25, update_proj_gap=2, projector="random",
                subspace="projection")
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


# ---------------------------------------------------------------------------
# blockwise mode (the reference's pre-training setting): whole matrices take turns

BLOCK_SHAPES = {("attn", "a0"): (6, 4), ("attn", "a1"): (4, 6), ("attn", "a2"): (3, 5),
                ("mlp", "m0"): (6, 4), ("mlp", "m1"): (5, 3)}  # tree flatten order


def frugal_blocks_reference(w0, grads, *, density, gap, order, state_free, lr=LR, b1=0.9,
                            b2=0.999, eps=1e-8):
    """BlockOptimizer as the reference writes it: a moving start index, state per block."""
    n = len(w0)
    k = round(n * density)
    ws = [w.astype(np.float64).copy() for w in w0]
    state = [None] * n
    start = None
    for t, gs in enumerate(grads, 1):
        if (t - 1) % gap == 0:                   # refresh: every state dropped, k re-created
            state = [None] * n
            if order == "descending":
                start = n - 1 if start is None else start
                chosen = [idx % n for idx in range(start, start - k, -1)]
                start -= k
                if start < 0:
                    start += n
            else:
                start = 0 if start is None else start
                chosen = [idx % n for idx in range(start, start + k)]
                start += k
                if start >= n:
                    start -= n
            for idx in chosen:
                state[idx] = {"m": 0.0, "v": 0.0, "step": 0}
        for i, g in enumerate(gs):
            s = state[i]
            if s is None:
                upd = {"signsgd": np.sign(g), "sgd": g, "none": 0.0 * g}[state_free]
                ws[i] = ws[i] - lr * upd
                continue
            s["step"] += 1
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            denom = np.sqrt(s["v"]) / np.sqrt(1 - b2 ** s["step"]) + eps
            ws[i] = ws[i] - lr / (1 - b1 ** s["step"]) * s["m"] / denom
    return ws


@pytest.mark.parametrize("order,state_free", [("descending", "signsgd"),
                                              ("ascending", "sgd"), ("descending", "none")])
def test_frugal_blocks_parity(order, state_free):
    """Five matrices, k = round(5 * 0.4) = 2 active, T = 2, 12 steps: six refreshes, wrap-around."""
    rng = np.random.default_rng(5)
    keys = list(BLOCK_SHAPES)
    w0 = [rng.standard_normal(BLOCK_SHAPES[k]) * 0.1 for k in keys]
    grads = [[rng.standard_normal(BLOCK_SHAPES[k]) for k in keys] for _ in range(12)]
    norm0 = rng.standard_normal(4)
    norm_grads = [rng.standard_normal(4) for _ in range(12)]

    def tree(mats, norm):
        out: dict = {"norm": jnp.asarray(norm, jnp.float32)}
        for (a, b), x in zip(keys, mats):
            out.setdefault(a, {})[b] = jnp.asarray(x, jnp.float32)
        return out

    tx = frugal(LR, density=0.4, update_proj_gap=2, state_free=state_free, block_order=order)
    params = tree(w0, norm0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(12):
        updates, state = step(tree(grads[t], norm_grads[t]), state, params)
        params = optax.apply_updates(params, updates)
    ref = frugal_blocks_reference(w0, grads, density=0.4, gap=2, order=order,
                                  state_free=state_free)
    for (a, b), want in zip(keys, ref):
        np.testing.assert_allclose(np.asarray(params[a][b], np.float64), want, atol=2e-5,
                                   err_msg=f"{a}/{b}")
    # the norm is not a block: plain torch Adam at full size every step
    w, m, v = norm0.copy(), 0.0, 0.0
    for t, g in enumerate(norm_grads, 1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - LR / (1 - 0.9 ** t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** t) + 1e-8)
    np.testing.assert_allclose(np.asarray(params["norm"], np.float64), w, atol=2e-5)


def _reference_peak_state_bytes(numels, density, order, refreshes):
    """Largest Adam state (m and v, float32) the reference holds at any refresh."""
    n, k = len(numels), round(len(numels) * density)
    peak = 0
    for j in range(refreshes):
        if order == "descending":
            chosen = [((n - 1 - j * k) - i) % n for i in range(k)]
        else:
            chosen = [(j * k + i) % n for i in range(k)]
        peak = max(peak, sum(2 * 4 * numels[i] for i in chosen))
    return peak


def test_frugal_blocks_state_holds_only_the_active_blocks():
    """LLaMA-like: 4 layers x 7 matrices, density 0.25 -> 7 active: one layer's moments."""
    d, f = 32, 88
    layer = {"attn": {n: jax.ShapeDtypeStruct((d, d), jnp.float32) for n in "qkvo"},
             "mlp": {"down": jax.ShapeDtypeStruct((f, d), jnp.float32),
                     "gate": jax.ShapeDtypeStruct((d, f), jnp.float32),
                     "up": jax.ShapeDtypeStruct((d, f), jnp.float32)}}
    params = {"layers": [layer] * 4}
    numels = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    for order in ("descending", "ascending"):
        state = jax.eval_shape(lj.block_subspace.scale_by_block_subspace(
            density=0.25, block_order=order).init, params)
        moments = lj.state_nbytes((state.mu, state.nu))
        assert moments == _reference_peak_state_bytes(numels, 0.25, order, 8)
        assert moments == 2 * 4 * (4 * d * d + 3 * d * f)
        adam = lj.state_nbytes(jax.eval_shape(optax.scale_by_adam().init, params))
        assert moments * 4 == adam - 4                       # a quarter of Adam's moments


def test_frugal_blocks_counts_restart_and_window_moves():
    """Adam on the active blocks restarts its step count at each refresh; the window moves."""
    params = {"attn": {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3, 2))}}
    tx = lj.block_subspace.scale_by_block_subspace(density=0.5, update_every=2)
    g = {"attn": {"a": jnp.full((3, 2), 2.0), "b": jnp.full((3, 2), -3.0)}}
    state = tx.init(params)
    outs = []
    for _ in range(4):
        u, state = tx.update(g, state)
        outs.append((float(u["attn"]["a"][0, 0]), float(u["attn"]["b"][0, 0])))
    # refresh 0 activates "b" (last, descending), refresh 1 activates "a"; a constant
    # gradient gives Adam's step +-1 and signSGD the sign: both +-1, so look at the state
    assert np.allclose(outs, [(1.0, -1.0)] * 4, atol=1e-6)
    assert state.mu[0].shape == (1, 6)                        # one slot for the 2 blocks
    np.testing.assert_allclose(np.asarray(state.mu[0][0]), 2.0 * (1 - 0.9 ** 2), rtol=1e-6)


def test_frugal_blocks_rejects_a_projector_and_bad_options():
    with pytest.raises(ValueError, match="subspace='projection'"):
        frugal(1e-2, projector="random")
    with pytest.raises(ValueError, match="block_order"):
        frugal(1e-2, block_order="sideways")
    with pytest.raises(ValueError, match="subspace"):
        frugal(1e-2, subspace="rows")
