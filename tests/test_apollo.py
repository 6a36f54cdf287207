"""APOLLO / APOLLO-Mini: parity with a NumPy re-statement of REFERENCE.md, state size.

The reference below is written only from REFERENCE.md "APOLLO / APOLLO-Mini" (torch
layout ``(m, n)``): side by the ``std`` rule (right projector ``B (n, r)`` when
``m >= n``, ``R = G B``; left ``B (m, r)``, ``R = B^T G``), Adam on ``R`` without bias
correction (``N = m / (sqrt(v) + 1e-6)``), ``U = G * s`` with the channel factor
``||N|| / (||R|| + 1e-8)`` over the rank axis (per row / per column) or the tensor
factor ``||N||_F / (||R||_F + 1e-8)``; ``sqrt(scale)`` before (``scale_front``) or after
the norm-growth limiter (gamma 1.01); ``W -= lr sqrt(1 - b2^t) / (1 - b1^t) U``.

The random projection cannot be matched across frameworks, so both sides use the same
injected matrices: a projector object that returns ``mats[d][(count) // T]`` (Gaussian
``N(0,1)/sqrt(r)``, not orthonormal), one per refresh, so the refresh at ``T + 1`` (with
the moments kept, as the reference) is covered too.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_support import FixedProjector, params_after_each_step

import lowrank_jax as lj
from lowrank_jax.alias import apollo_adamw, apollo_mini
from lowrank_jax.memory import abstract_params

SHAPES = {("attn", "q"): (24, 10), ("mlp", "up"): (12, 30)}  # torch (out, in)
T, STEPS, LR = 3, 21, 0.01


def gaussian_mats(rng, rank, n_refresh):
    return {d: rng.standard_normal((n_refresh, d, rank)) / math.sqrt(rank)
            for d in {min(s) for s in SHAPES.values()}}


def apollo_reference(w0, grads, mats, *, rank, scaling, scale, scale_front, lr=LR,
                     b1=0.9, b2=0.999, eps=1e-6, gamma=1.01):
    """float64 APOLLO on one torch-layout matrix; returns the parameter trajectory."""
    m_, n_ = w0.shape
    right = m_ >= n_
    w = w0.astype(np.float64).copy()
    mom = np.zeros((m_, rank) if right else (rank, n_))
    vel = np.zeros_like(mom)
    prev = None
    traj, fired = [], []
    for t, g in enumerate(grads, 1):
        b = mats[min(m_, n_)][(t - 1) // T]
        r = g @ b if right else b.T @ g
        mom = b1 * mom + (1 - b1) * r
        vel = b2 * vel + (1 - b2) * r * r
        n = mom / (np.sqrt(vel) + eps)
        if scaling == "channel":
            axis = 1 if right else 0
            s = (np.linalg.norm(n, axis=axis, keepdims=True)
                 / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
        else:
            s = np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
        u = g * s
        if scale_front:
            u = u * math.sqrt(scale)
        norm = np.linalg.norm(u)
        if prev is None:
            prev = norm
        else:
            lim = max(norm / (prev + 1e-8), gamma) / gamma
            fired.append(lim > 1)
            u = u / lim
            prev = norm / lim
        if not scale_front:
            u = u * math.sqrt(scale)
        w = w - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * u
        traj.append(w.copy())
    return traj, fired


@pytest.mark.parametrize("layout", ["torch", "flax"])
@pytest.mark.parametrize("variant", ["channel", "tensor_front"])
def test_apollo_parity(layout, variant):
    rng = np.random.default_rng(7 if variant == "channel" else 8)
    rank = 4 if variant == "channel" else 1
    mats = gaussian_mats(rng, rank, n_refresh=STEPS // T + 1)
    w0 = {k: rng.standard_normal(s) * 0.1 for k, s in SHAPES.items()}
    # growing gradients so that the limiter fires
    grads = [{k: rng.standard_normal(s) * (1 + 0.5 * t) for k, s in SHAPES.items()}
             for t in range(STEPS)]
    proj = FixedProjector(mats, T)
    if variant == "channel":
        tx = apollo_adamw(LR, rank=rank, update_proj_gap=T, projector=proj, layout=layout)
        kw = {"scaling": "channel", "scale": 1.0, "scale_front": False}
    else:
        tx = apollo_mini(LR, update_proj_gap=T, projector=proj, layout=layout)
        kw = {"scaling": "tensor", "scale": 128.0, "scale_front": True}
    for t, flat in enumerate(params_after_each_step(tx, w0, grads, layout)):
        for (a, b) in SHAPES:
            traj, fired = apollo_reference(w0[(a, b)], [g[(a, b)] for g in grads[:t + 1]],
                                           mats, rank=rank, **kw)
            ref = traj[-1]
            got = flat[(a, b)]
            tol = 1e-5 * np.abs(ref - w0[(a, b)]).max() + 1e-6
            np.testing.assert_allclose(got, ref, atol=tol, err_msg=f"{a}/{b} step {t + 1}")
    assert sum(fired) >= 2, fired  # the limiter was exercised


def test_apollo_update_is_gradient_times_channel_factor():
    """No back-projection: the update of a projected matrix is G times a per-row factor."""
    g = jax.random.normal(jax.random.key(0), (16, 40))      # flax (in=16, out=40): reduce in
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(bias_correction=False), rank=4,
                             projector="gaussian", scale=1.0, residual="apollo")
    u, _ = tx.update({"w": g}, tx.init({"w": g}))
    ratio = np.asarray(u["w"] / g)
    np.testing.assert_allclose(ratio, ratio[:1, :].repeat(16, 0), rtol=1e-5)  # per column
    assert not np.allclose(ratio[0], ratio[0, 0])


def test_apollo_projector_is_gaussian_and_refreshed():
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=8, projector="gaussian",
                             update_every=2, residual="apollo")
    params = {"w": jnp.ones((64, 256))}
    state = tx.init(params)
    _, s1 = tx.update(params, state)
    _, s2 = tx.update(params, s1)
    _, s3 = tx.update(params, s2)
    p1, p2, p3 = (np.asarray(s.projector["w"]) for s in (s1, s2, s3))
    np.testing.assert_array_equal(p1, p2)                   # kept between refreshes
    assert not np.allclose(p1, p3)                          # new key at the refresh
    assert abs(p1.std() * math.sqrt(8) - 1) < 0.05          # N(0,1)/sqrt(r)


def test_apollo_mini_state_of_7b_projected_matrices_is_tiny():
    """APOLLO-Mini's state for the 7B projected matrices is < 0.1% of AdamW's for them."""
    params = abstract_params("llama_7b", "fp32")
    labels = lj.default_lowrank_labels(params)
    leaves = [p for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
              if lab == "lowrank"]
    assert len(leaves) == 32 * 7 and all(p.ndim == 2 for p in leaves)
    projected = {f"m{i}": p for i, p in enumerate(leaves)}
    everything = {k: True for k in projected}
    mini = lj.state_nbytes(jax.eval_shape(apollo_mini(1e-2, labels=everything).init,
                                          projected))
    adam = lj.state_nbytes(jax.eval_shape(lj.adamw(1e-2).init, projected))
    assert mini / adam < 1e-3, mini / adam
