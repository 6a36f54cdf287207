"""COAP-AdamW against the NumPy re-statement of bytedance/coap (``reference_coap.py``).

The problem: a tall ``(24, 10)``, a square ``(10, 10)`` and a wide ``(10, 24)`` projected
matrix (torch shapes; right, right and left projectors) plus a 1-D and a 2-D plain
leaf, 24 steps with ``update_proj_gap=3`` (the reference's ``update_interval``) and
``reproject_factor=3``: the projector moves by a gradient step at 0-based steps 3, 6,
12, 15, 21 and by a range-finder pass from the current projector at 9 and 18. The first gradient of each projected matrix has exact
rank ``r``, so the first range-finder pass returns its top-``r`` right singular
vectors whatever the random test matrix (the reference seeds torch's generator, ours a
JAX key); later gradients have well-separated singular values. After each SVD the
reference adopts the implementation's column signs (``ref.align_columns`` checks that
only the sign differs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_coap as rc
import reference_numpy as ref
from methods_support import assert_updates_match, lowrank_grad
from parity_support import PLAIN, PROJECTED, SHAPES, get, run_jax

from lowrank_jax.coap import coap_adamw, coap_loss, range_basis

RANK, TU, FACTOR, STEPS, LR, WD, SCALE = 4, 3, 3, 24, 0.01, 0.1, 0.25


def make_problem(seed: int):
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    grads = []
    for t in range(STEPS):
        g = {}
        for p, s in SHAPES.items():
            if p in PROJECTED:
                g[p] = (lowrank_grad(rng, s, RANK) if t == 0 else
                        ref.well_conditioned_grad(rng, s, scale=rng.uniform(0.5, 2.0)))
            else:
                g[p] = rng.standard_normal(s).astype(np.float32)
        grads.append(g)
    return rng, params, grads


@pytest.fixture(scope="module", params=["flax", "torch"])
def coap_run(request):
    layout = request.param
    rng, params, grads = make_problem(3 if layout == "flax" else 4)
    tx = coap_adamw(LR, rank=RANK, update_proj_gap=TU, reproject_factor=FACTOR, scale=SCALE,
                    weight_decay=WD, layout=layout)
    traj, upds, projs = run_jax(tx, params, grads, layout)
    return layout, rng, params, grads, traj, upds, projs


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PROJECTED))
def test_coap_adamw_matches_reference(coap_run, path):
    layout, rng, params, grads, traj, upds, projs = coap_run
    m, n = SHAPES[path]
    omega0 = rng.standard_normal((min(n, m), RANK))
    out = rc.coap_adamw_reference(
        params[path], [g[path] for g in grads], rank=RANK, update_interval=TU,
        reproject_factor=FACTOR, scale=SCALE, lr=LR, weight_decay=WD, omega0=omega0,
        align=lambda t, q: ref.align_columns(q, projs[t - 1][path]))
    worst = assert_updates_match(f"{layout} {path}", params[path], out["params"],
                                 [x[path] for x in traj], [x[path] for x in upds], STEPS)
    assert worst < 1e-5
    # the projector really moved at the gradient steps and stayed between moves
    p = [x[path] for x in projs]
    np.testing.assert_array_equal(p[1], p[0])
    assert np.abs(p[3] - p[2]).max() > 1e-6          # 0-based step 3: a gradient step
    after_step = p[3]
    assert abs(np.linalg.norm(after_step.T @ after_step - np.eye(RANK))) > 1e-7  # not re-orthonormalised
    np.testing.assert_allclose(p[9].T @ p[9], np.eye(RANK), atol=1e-5)          # range finder


@pytest.mark.slow
def test_coap_plain_leaves_follow_adamw(coap_run):
    layout, _, params, grads, traj, upds, _ = coap_run
    for path in PLAIN:
        out = ref.adamw_reference(params[path], [g[path] for g in grads], lr=LR,
                                  weight_decay=WD)
        assert_updates_match(f"{layout} {path}", params[path], out["params"],
                             [x[path] for x in traj], [x[path] for x in upds], STEPS)


@pytest.mark.parametrize("right", [True, False])
def test_projector_loss_gradient_matches_hand_derivation(right):
    """``jax.grad`` of :func:`coap_loss` in the oriented view equals the reference's
    hand-derived gradient of ``update_proj``'s loss (torch orientation)."""
    rng = np.random.default_rng(1 if right else 2)
    m, n, r = (12, 7, 3) if right else (7, 12, 3)
    g = rng.standard_normal((m, n))
    if right:
        proj = np.linalg.qr(rng.standard_normal((n, r)))[0].T + 0.1 * rng.standard_normal((r, n))
        moment = rng.standard_normal((m, r))
        x, basis, mom, axis = g, proj.T, moment, 1
    else:
        proj = np.linalg.qr(rng.standard_normal((m, r)))[0] + 0.1 * rng.standard_normal((m, r))
        moment = rng.standard_normal((r, n))
        x, basis, mom, axis = g.T, proj, moment.T, 0
    loss_ref, grad_ref = rc.projector_loss_and_grad(proj, moment, g, right)
    f = lambda b: coap_loss(b, jnp.asarray(x, jnp.float32), jnp.asarray(mom, jnp.float32), axis)
    b32 = jnp.asarray(basis, jnp.float32)
    np.testing.assert_allclose(float(f(b32)), loss_ref, rtol=1e-5)
    grad = np.asarray(jax.grad(f)(b32), np.float64)
    np.testing.assert_allclose(grad, grad_ref.T if right else grad_ref, rtol=1e-4,
                               atol=1e-5 * np.abs(grad_ref).max())


def test_range_basis_matches_reference_compute_orthogonal():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 14))
    omega = rng.standard_normal((14, 3))
    got = np.asarray(range_basis(jnp.asarray(x, jnp.float32), jnp.asarray(omega, jnp.float32)))
    want = rc.compute_orthogonal(x, 3, omega).T
    np.testing.assert_allclose(ref.align_columns(want, got), got, atol=1e-5)


def test_coap_state_is_one_basis_per_matrix_and_the_moments():
    params = {"attn": {"q": jnp.zeros((64, 32))}, "norm": jnp.zeros(32)}
    state = jax.eval_shape(coap_adamw(1e-3, rank=8).init, params)
    lowrank = state[0].inner_states["lowrank"].inner_state
    assert get(lowrank.projector, ("attn", "q")).shape == (32, 8)      # (in=64, out=32): out
    assert get(lowrank.inner_state.mu, ("attn", "q")).shape == (64, 8)


def test_coap_rejects_bad_periods():
    with pytest.raises(ValueError, match="update_proj_gap"):
        coap_adamw(1e-3, update_proj_gap=0)
    with pytest.raises(ValueError, match="reproject_factor"):
        coap_adamw(1e-3, reproject_factor=1.5)
    with pytest.raises(ValueError, match="inner"):
        coap_adamw(1e-3, inner="sgd")
