"""Fira-AdamW parity: ``lj.fira_adamw`` against the float64 NumPy reference.

The reference (``reference_numpy.fira_adamw_reference``) re-states xichen-fy/Fira (pip
``fira`` 1.0.2), ``fira/fira_adamw.py``: L94 projection as GaLore, L106-112 Adam on R,
L126-134 the residual ``p.grad - project_back(R)`` (``project_back`` includes ``alpha``)
times ``||N|| / (||R|| + 1e-8)`` along ``norm_dim``, L136-147 the limiter, L153
``W -= step_size * (Back(N) + residual)``, L164 ``W -= lr wd W``
(``tests/test_fira_torch.py`` runs the official optimizer side by side): Adam on R as GaLore, ``N`` without bias correction, the residual
``S_res = (G - scale*Back(R)) * phi`` with ``phi`` the per-row (right projector) /
per-column (left projector) ratio ``||N|| / (||R|| + 1e-8)`` over the rank axis, the
norm-growth limiter (gamma = 1.01) and ``W -= lr*sqrt(bc2)/bc1*(scale*Back(N) + S_res)``
followed by ``W -= lr*wd*W``.

Setup as in ``test_parity_galore``: tall (24, 10), square (10, 10), wide (10, 24) torch
shapes, both layouts, ranks 4 and 10 (= min dim; there ``P P^T = I`` and the residual is
``(1 - scale) G phi``, non-zero only because of the ``G - scale*P P^T G`` quirk, so the
rank-10 case pins the quirk down), random well-conditioned gradients whose overall scale
varies per step (uniform in [0.5, 2]; at refresh steps redrawn until min |R| >= 2e-3,
see ``test_parity_galore``) and whose singular vectors stay near a fixed base (jitter 0.3),
so that the momentum builds up, ``||N||`` and with it ``||S_res||`` grow, and the limiter
fires: the test asserts in the
reference that it did (``l > 1``) at several steps for every matrix.

Sign ambiguity: within a refresh period Fira is sign-invariant (R, m, N flip per column
together; phi and ``P P^T`` do not change).  With ``moments='keep'`` the refresh at T+1
is compared after sign-aligning the reference's fresh singular vectors to the
implementation's projector (asserting first that they agree up to sign); steps 1..T are
also compared with no sign handling.  Tolerances as in ``test_parity_galore``
(relative update error < 1e-5 over the run).
"""

from __future__ import annotations

import itertools

import numpy as np
import parity_support as ps
import pytest
from parity_support import PROJECTED, ref

import lowrank_jax as lj

LR, WD, T, SCALE = 0.05, 0.1, 4, 0.25


@pytest.mark.parametrize("rank", [4, 10])
@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_fira_parity(layout, rank):
    steps = 5 * T + 1
    params, grads = ps.make_svd_problem(seed=300 + rank, steps=steps, rank=rank, gap=T,
                                        jitter=0.3)
    tx = lj.fira_adamw(LR, rank=rank, update_proj_gap=T, scale=SCALE, b1=0.9, b2=0.999,
                       eps=1e-6, weight_decay=WD, layout=layout)
    traj, upds, projs = ps.run_jax(tx, params, grads, layout, plain_masked=False)
    kw = {"lr": LR, "rank": rank, "update_proj_gap": T, "scale": SCALE, "eps": 1e-6,
          "weight_decay": WD}
    errors = {}
    for path in PROJECTED:
        gs = [g[path] for g in grads]
        r = ref.fira_adamw_reference(params[path], gs[:T], **kw)
        ps.assert_leaf(f"{path} {layout} period 1", path, params, r["params"], traj, upds, T)
        r = ref.fira_adamw_reference(params[path], gs, align=ps.align_to(projs, path), **kw)
        fired = [t for t, lim in enumerate(r["limiter"], 1) if lim is not None and lim > 1]
        assert len(fired) >= 2, f"limiter never fired for {path}: {r['limiter']}"
        errors[path] = ps.assert_leaf(f"{path} {layout} keep", path, params, r["params"],
                                      traj, upds, steps)
    # non-projected leaves: the GaLore-style reference Adam
    errors.update(ps.check_plain_leaves(ref.adamw_reference, params, grads, traj, upds, steps,
                                        lr=LR, eps=1e-6, weight_decay=WD))
    ps.report_error("fira_adamw", errors)


# ---- self-checks of the reference (no lowrank_jax involved) ---------------------------


def test_reference_fira_full_rank_scale_one_is_galore():
    """rank = min dim and scale = 1: G - P P^T G = 0, so Fira == GaLore."""
    rng = np.random.default_rng(3)
    for shape in [(12, 6), (6, 12)]:
        w0 = rng.standard_normal(shape)
        gs = [rng.standard_normal(shape) for _ in range(5)]
        kw = {"lr": 0.1, "rank": 6, "update_proj_gap": 2, "scale": 1.0, "weight_decay": 0.1}
        a = ref.fira_adamw_reference(w0, gs, **kw)["params"]
        b = ref.galore_adamw_reference(w0, gs, **kw)["params"]
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_reference_fira_step_one_by_hand():
    """Step 1 of a right projector, written out: phi per row of R (m, r), no limiter."""
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((8, 5))
    g = rng.standard_normal((8, 5))
    r = ref.fira_adamw_reference(w0, [g], lr=0.1, rank=2, update_proj_gap=3, scale=0.25,
                                 eps=1e-6, weight_decay=0.0)
    _, _, vh = np.linalg.svd(g, full_matrices=False)
    p = vh[:2]                                   # (r, n)
    low = g @ p.T                                # (m, r)
    n_low = 0.1 * low / (np.sqrt(0.001) * np.abs(low) + 1e-6)
    phi = np.linalg.norm(n_low, axis=1) / (np.linalg.norm(low, axis=1) + 1e-8)
    s_res = (g - 0.25 * low @ p) * phi[:, None]
    w1 = w0 - 0.1 * np.sqrt(0.001) / 0.1 * (0.25 * n_low @ p + s_res)
    np.testing.assert_allclose(r["params"][0], w1, atol=1e-12)
    assert r["limiter"] == [None]
    np.testing.assert_allclose(r["limiter_state"][0], np.linalg.norm(s_res))


def test_reference_fira_limiter():
    """A growing gradient: from step 2 on the residual norm is capped at 1.01x the
    previous (limited) norm, and the stored state is that capped norm."""
    rng = np.random.default_rng(5)
    g = rng.standard_normal((6, 4))
    gs = [g * 3.0**k for k in range(4)]
    r = ref.fira_adamw_reference(np.zeros((6, 4)), gs, lr=0.1, rank=1, update_proj_gap=10)
    assert r["limiter"][0] is None and all(lim > 1.01 for lim in r["limiter"][1:])
    states = r["limiter_state"]
    for a, b in itertools.pairwise(states):
        np.testing.assert_allclose(b, 1.01 * a, rtol=1e-6)
    # a left projector normalises per column: phi has shape (1, n)
    r = ref.fira_adamw_reference(np.zeros((4, 6)), [g.T], lr=0.1, rank=1,
                                 update_proj_gap=10)
    assert r["side"] == "left"
