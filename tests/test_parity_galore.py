"""GaLore-AdamW parity: ``lj.galore_adamw`` against the float64 NumPy reference.

The reference (``reference_numpy.galore_adamw_reference``) re-states jiaweizzhao/GaLore
(pip ``galore-torch`` 1.0), ``galore_torch/adamw.py``: L88-96 the projector is asked with
the 0-based step, L108 ``step += 1``, L110-120 ``m``, ``v``, ``denom = sqrt(v) + eps``,
``step_size = lr sqrt(1 - b2^t) / (1 - b1^t)``, L127-129 ``W -= step_size *
project_back(m / denom)``, L139-140 ``W -= lr wd W`` after the update (the same Adam
without projection for the other leaves); ``galore_projector.py`` L12-45 the ``std``
side rule and a new SVD basis when ``step % update_proj_gap == 0``, L47-67
``project_back`` times ``scale``, L71-96 the top-``r`` singular vectors (``Vh[:r]`` on
the right, ``U[:, :r]`` on the left). ``tests/test_galore_torch.py`` runs the official
optimizer itself side by side.  Parameters: a tall ``(24, 10)``, a
square ``(10, 10)`` and a wide ``(10, 24)`` attention/MLP matrix (torch shapes), plus a
1-D ``norm`` and a 2-D ``embed`` leaf that the default label rule leaves unprojected.
Ranks 4 and 10 (= min dim, projector is a full rotation).  Both layouts: for ``flax``
every 2-D leaf (params and grads) is handed over transposed and transposed back before
comparing.  Gradients are random, fixed seed, independent of the parameters, with
well-separated singular values (``well_conditioned_grad``) so that the float32 SVD
determines each singular vector up to sign to ~1e-6; at refresh steps they are also
redrawn until every entry of R is >= 2e-3 in magnitude, because Adam's first step
``N = m/(sqrt(v)+eps)`` amplifies the ~1e-6 float32 basis error ~1e4x in entries with
``|R| ~ eps/sqrt(1-b2) = 3e-5`` (observed: one such entry gave a 1e-3 relative mismatch
of one row of a Fira update, fully explained by the float32 SVD basis).  Constant lr
0.05, weight_decay 0.1.

Why the comparison is sound despite SVD sign ambiguity
------------------------------------------------------
* Within one refresh period the update is sign-invariant: flipping column j of Q flips
  column j of R, m and N together, and ``Back(N)`` (``N Q^T`` or ``Q N``) is unchanged.
  So steps 1..T are compared with no sign handling at all (test ``..._first_period``).
* With ``moments='keep'`` m, v from the old basis are reused in the new one, so after
  the refresh at step T+1 the trajectory depends on the (arbitrary) sign of the new
  singular vectors.  ``..._keep_aligned`` runs the reference through 2T+1 steps and, at
  each refresh, first asserts that every column of the implementation's projector is
  +-(the reference's column) (subspace AND ordering checked), then adopts the
  implementation's signs.  What is left to compare is fully determined.
* With ``moments='reset'`` m, v and the bias-correction count restart at each refresh, so
  every period is sign-invariant again: steps 1..2T+1 are compared with no sign handling.

Tolerances: over the run, the relative update error ``||u - u_ref||_F / ||u_ref||_F`` of
every step below ``PARITY_RTOL = 1e-5`` (printed: ``pytest -s``); per step and leaf, the implementation's update (float32) must match the
reference's ``W_t - W_{t-1}`` (float64) within ``UPDATE_RTOL * max|ref update|``; the
parameters within ``UPDATE_RTOL * sum_{s<=t} max|ref update_s| + 2 t eps_f32 max|W|`` (the
implementation stores W in float32: about two roundings of W per step).
"""

from __future__ import annotations

import numpy as np
import optax
import parity_support as ps
import pytest
from parity_support import PROJECTED, ref

import lowrank_jax as lj

LR, WD, T = 0.05, 0.1, 4


def check_plain(params, grads, traj, upds, steps):
    return ps.check_plain_leaves(ref.adamw_reference, params, grads, traj, upds, steps, lr=LR,
                          eps=1e-6, weight_decay=WD)


def galore(layout, rank, moments="keep"):
    return lj.galore_adamw(LR, rank=rank, update_proj_gap=T, scale=0.25, b1=0.9, b2=0.999,
                           eps=1e-6, weight_decay=WD, layout=layout, moments=moments)


LAYOUTS = ["torch", "flax"]
RANKS = [4, 10]


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_galore_first_period_and_aligned_keep(layout, rank):
    """moments='keep': steps 1..T with no sign handling, then 1..2T+1 with the
    reference's fresh singular vectors sign-aligned to the implementation's projector
    (after asserting they agree up to sign).  Non-projected leaves: reference Adam."""
    steps = 5 * T + 1
    params, grads = ps.make_svd_problem(seed=100 + rank, steps=steps, rank=rank, gap=T)
    traj, upds, projs = ps.run_jax(galore(layout, rank), params, grads, layout)
    errors = {}
    for path, shape in PROJECTED.items():
        gs = [g[path] for g in grads]
        kw = {"lr": LR, "rank": rank, "update_proj_gap": T, "scale": 0.25, "eps": 1e-6,
              "weight_decay": WD}
        # 1) first refresh period, no sign handling at all
        r = ref.galore_adamw_reference(params[path], gs[:T], **kw)
        ps.assert_leaf(f"{path} {layout} period 1", path, params, r["params"], traj, upds, T)
        # 2) across the refresh at T+1 and 2T+1, signs adopted from the implementation
        r = ref.galore_adamw_reference(params[path], gs, align=ps.align_to(projs, path), **kw)
        assert r["refreshed"] == [(t - 1) % T == 0 for t in range(1, steps + 1)]
        assert projs[0][path].shape == (min(shape), rank)
        for t in range(steps):   # projector state = the (aligned) reference basis
            np.testing.assert_allclose(projs[t][path], r["projector"][t], atol=1e-4)
        errors[path] = ps.assert_leaf(f"{path} {layout} keep", path, params, r["params"],
                                      traj, upds, steps)
    ps.report_error("galore_adamw", {**errors, **check_plain(params, grads, traj, upds, steps)})


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_galore_reset_moments(layout, rank):
    """moments='reset': every period is sign-invariant, compare steps 1..2T+1 plainly."""
    steps = 5 * T + 1
    params, grads = ps.make_svd_problem(seed=200 + rank, steps=steps, rank=rank, gap=T,
                                        condition_every_step=True)
    traj, upds, _ = ps.run_jax(galore(layout, rank, "reset"), params, grads, layout)
    for path in PROJECTED:
        r = ref.galore_adamw_reference(
            params[path], [g[path] for g in grads], lr=LR, rank=rank, update_proj_gap=T,
            scale=0.25, eps=1e-6, weight_decay=WD, moments="reset")
        ps.assert_leaf(f"{path} {layout} reset", path, params, r["params"], traj, upds, steps)
    check_plain(params, grads, traj, upds, steps)


# ---- self-checks of the reference (no lowrank_jax involved) ---------------------------


def test_reference_first_step_closed_form():
    """Step 1: m=(1-b1)R, v=(1-b2)R^2, so the update is
    -lr*scale*Back(R/(|R| + eps/sqrt(1-b2))) - decay; checked for both sides."""
    rng = np.random.default_rng(0)
    for shape in [(24, 10), (10, 24), (10, 10)]:
        w0 = rng.standard_normal(shape)
        g = ref.well_conditioned_grad(rng, shape).astype(np.float64)
        r = ref.galore_adamw_reference(w0, [g], lr=0.1, rank=3, update_proj_gap=2,
                                       scale=0.25, eps=1e-6, weight_decay=0.5)
        side = ref.std_side(shape)
        basis, _ = ref.svd_basis(g, side)
        q = basis[:, :3]
        low = ref.project(g, q, side)
        w1 = w0 - 0.1 * 0.25 * ref.project_back(low / (np.abs(low) + 1e-6 / np.sqrt(1e-3)),
                                                 q, side)
        w1 = w1 * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(r["params"][0], w1, rtol=1e-12, atol=1e-12)
        assert r["projector"][0].shape == (min(shape), 3)
        assert side == ("right" if shape[0] >= shape[1] else "left")


def test_reference_full_rank_projection_is_rotation():
    """rank = min dim: Back(project(G)) == G; refresh schedule is 1, T+1, 2T+1."""
    rng = np.random.default_rng(1)
    for shape in [(24, 10), (10, 24)]:
        g = rng.standard_normal(shape)
        side = ref.std_side(shape)
        q, _ = ref.svd_basis(g, side)
        np.testing.assert_allclose(ref.project_back(ref.project(g, q, side), q, side), g,
                                   atol=1e-12)
    r = ref.galore_adamw_reference(np.zeros((6, 4)), [rng.standard_normal((6, 4))] * 9,
                                   lr=0.1, rank=2, update_proj_gap=4)
    assert [t for t, f in enumerate(r["refreshed"], 1) if f] == [1, 5, 9]


def test_reference_plain_adam_eps_placement():
    """The reference Adam differs from optax.adam only by eps placement, and the torch
    AdamW reference equals optax.adamw (eps on the corrected root, decay before).
    Tolerance: optax runs in float32, so W (|W| <= ~2.5) carries about 2 float32 roundings
    per step plus 1e-5 of the update size (lr = 0.05)."""
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((5, 3)).astype(np.float32)

    def tol(t):
        return 2 * (t + 1) * np.finfo(np.float32).eps * 2.5 + 1e-5 * 0.05
    gs = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(5)]
    tx = optax.adamw(0.05, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    w, s = w0, tx.init(w0)
    r = ref.torch_adamw_reference(w0, gs, lr=0.05, eps=1e-8, weight_decay=0.1)
    for t, g in enumerate(gs):
        u, s = tx.update(g, s, w)
        w = optax.apply_updates(w, u)
        np.testing.assert_allclose(np.asarray(w), r["params"][t], rtol=0, atol=tol(t))
    # eps = 0: the GaLore form (decay after) differs from optax.adam only by the decay
    tx = optax.adam(0.05, b1=0.9, b2=0.999, eps=0.0)
    w, s = w0, tx.init(w0)
    r = ref.adamw_reference(w0, gs, lr=0.05, eps=0.0, weight_decay=0.0)
    for t, g in enumerate(gs):
        u, s = tx.update(g, s, w)
        w = optax.apply_updates(w, u)
        np.testing.assert_allclose(np.asarray(w), r["params"][t], rtol=0, atol=tol(t))
