"""DCT-AdamW parity: ``lj.dct_adamw`` against the float64 NumPy reference.

The reference (``reference_numpy.dct_adamw_reference``) re-states
IST-DASLab/ISTA-DASLab-Optimizers (commit 4c98e6e),
``ista_daslab_optimizers/fft_low_rank/dct_adamw.py``: L113-114 a new subspace at step 1
and when ``step % update_proj_gap == 0``, L223-249 ``step += 1`` then ``W *= 1 - lr wd``
first, L276-330 the low-rank step (``adjusted_lr = -lr sqrt(bc2) / bc1``, moments on the
projection, ``u = m / (eps sqrt(bc2) + sqrt(v))``, back-projected), L333- plain AdamW for
the rest; ``fft_projector.py`` L50-57 column (right) / row (left) L1 norms of
``G Q`` / ``Q^T G``, L89-92 ``topk`` of them: orthonormal DCT-II matrix ``Q`` of the smaller
dimension, right side (``m >= n``) scores columns of ``G Q`` by their L1 norm, left side
rows of ``Q^T G``; top-r indices in DESCENDING score order; refresh at step 1 and at
every ``t % T == 0``; moments kept across refreshes; torch-AdamW (decay before, eps on the
corrected root, eps 1e-8), no ``scale``.

Checked, for torch shapes tall (24, 10), square (10, 10) and wide (10, 24), rank 4,
T = 1 (default) and T = 3, both layouts, 21 steps:
* the implementation's projector state (int32 indices) equals the reference's index
  sequence at every step (same set AND same descending-score order, which matters since
  moments are reused coordinate by coordinate); the test data is checked to have no
  near-ties in the scores (relative gap > 1e-4 among the top r+1), so exact equality is a
  sound requirement for float32 vs float64;
* updates and parameters match step by step (no sign ambiguity here), tolerances as in
  ``test_parity_galore`` (relative update error < 1e-5 over the run);
* non-projected leaves (``norm`` 1-D, ``embed`` 2-D outside attn/mlp) follow
  ``torch_adamw_reference``.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
from parity_support import (
    PROJECTED,
    SHAPES,
    assert_leaf,
    check_plain_leaves,
    ref,
    report_error,
    run_jax,
)

import lowrank_jax as lj

LR, WD, RANK, STEPS = 0.05, 0.1, 4, 21


def indices_of(entry) -> np.ndarray:
    """The projector entry of a DCT leaf: int32 indices, possibly wrapped in a state."""
    idx = getattr(entry, "indices", entry)
    idx = np.asarray(idx)
    assert idx.dtype == np.int32 and idx.shape == (RANK,), (idx.dtype, idx.shape)
    return idx


def scores(g: np.ndarray, side: str | None = None) -> np.ndarray:
    side = side or ref.std_side(g.shape)
    if side == "right":
        return np.abs(g @ ref.dct_matrix(g.shape[1])).sum(axis=0)
    return np.abs(ref.dct_matrix(g.shape[0]).T @ g).sum(axis=1)


def make_problem(seed: int, sides: dict | None = None):
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    grads = []
    for _ in range(STEPS):
        g = {}
        for p, s in SHAPES.items():
            while True:
                x = (rng.uniform(0.5, 2.0) * rng.standard_normal(s)).astype(np.float32)
                if p not in PROJECTED:
                    break
                side = (sides or {}).get(p)
                top = np.sort(scores(x.astype(np.float64), side))[::-1][:RANK + 1]
                if np.all(-np.diff(top) > 1e-4 * top[0]):   # no near-ties
                    break
            g[p] = x
        grads.append(g)
    return params, grads


@pytest.mark.parametrize("gap", [1, 3])
@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_dct_parity(layout, gap):
    params, grads = make_problem(seed=400 + gap)
    kwargs = {"rank": RANK, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": WD,
              "layout": layout}
    if gap != 1:
        kwargs["update_proj_gap"] = gap           # gap 1 exercises the default
    tx = lj.dct_adamw(LR, **kwargs)
    traj, upds, idxs = run_jax(tx, params, grads, layout, entry=indices_of)
    errors = {}
    for path in PROJECTED:
        r = ref.dct_adamw_reference(params[path], [g[path] for g in grads], lr=LR,
                                    rank=RANK, update_proj_gap=gap, eps=1e-8,
                                    weight_decay=WD)
        expected_refresh = [t == 1 or t % gap == 0 for t in range(1, STEPS + 1)]
        assert r["refreshed"] == expected_refresh
        for t in range(STEPS):
            np.testing.assert_array_equal(
                idxs[t][path], r["indices"][t],
                err_msg=f"{path} {layout} T={gap}: indices at step {t + 1}")
        errors[path] = assert_leaf(f"{path} {layout} T={gap}", path, params, r["params"],
                                   traj, upds, STEPS)
    errors.update(check_plain_leaves(ref.torch_adamw_reference, params, grads, traj, upds,
                                     STEPS, lr=LR, eps=1e-8, weight_decay=WD))
    report_error("dct_adamw", errors)


WIDE = ("mlp", "up")


@pytest.mark.slow
@pytest.mark.parametrize("one_matrix", [False, True])
def test_dct_reference_options(one_matrix):
    """``right_projection_shapes`` (the reference's hard-coded GQA shapes, here the wide
    ``(10, 24)``): that leaf is reduced on its ``in`` side with the 24-point DCT matrix
    (``dct_adamw.py`` projects those shapes on the right). ``one_dct_matrix=True`` on
    leaves whose reduced sizes agree (10) gives the reference's single matrix."""
    sides = {WIDE: "right"} if not one_matrix else {}
    params, grads = make_problem(seed=430, sides=sides)
    if one_matrix:        # every projected leaf is reduced along a size of 10
        kw = {"one_dct_matrix": True}
    else:
        kw = {"right_projection_shapes": ((10, 24),)}
    tx = lj.dct_adamw(LR, rank=RANK, update_proj_gap=3, weight_decay=WD, layout="torch", **kw)
    traj, upds, idxs = run_jax(tx, params, grads, "torch", entry=indices_of)
    errors = {}
    for path in PROJECTED:
        r = ref.dct_adamw_reference(params[path], [g[path] for g in grads], lr=LR, rank=RANK,
                                    update_proj_gap=3, eps=1e-8, weight_decay=WD,
                                    side=sides.get(path))
        for t in range(STEPS):
            np.testing.assert_array_equal(idxs[t][path], r["indices"][t], err_msg=str(path))
        errors[path] = assert_leaf(f"{path} {kw}", path, params, r["params"], traj, upds,
                                   STEPS)
    if not one_matrix:    # r: the wide leaf's run, reduced along its 24 inputs
        assert r["side"] == "right" and int(np.max([i[WIDE] for i in idxs])) >= 10
    report_error("dct_adamw (reference options)", errors)


# ---- self-checks of the reference (no lowrank_jax involved) ---------------------------


def test_reference_dct_matrix():
    """Q is scipy's orthonormal DCT-II matrix and is orthogonal."""
    for n in [1, 5, 10, 16]:
        q = ref.dct_matrix(n)
        np.testing.assert_allclose(q, scipy.fft.dct(np.eye(n), norm="ortho", axis=0),
                                   atol=1e-12)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)


def test_reference_dct_selection_and_schedule():
    rng = np.random.default_rng(6)
    g = rng.standard_normal((12, 7))
    idx = ref.dct_select_reference(g, 3)
    s = np.abs(g @ ref.dct_matrix(7)).sum(axis=0)
    assert list(idx) == list(np.argsort(s)[::-1][:3])
    # left side: rows of Q^T G, i.e. the right-side rule on the transpose
    np.testing.assert_array_equal(ref.dct_select_reference(g.T, 3), idx)
    gs = [rng.standard_normal((12, 7)) for _ in range(7)]
    r = ref.dct_adamw_reference(np.zeros((12, 7)), gs, lr=0.1, rank=3, update_proj_gap=3)
    assert [t for t, f in enumerate(r["refreshed"], 1) if f] == [1, 3, 6]
    # full rank: the projection is a rotation, Back(project(G)) == G
    q = ref.dct_matrix(7)
    np.testing.assert_allclose(ref.project_back(ref.project(g, q, "right"), q, "right"), g,
                               atol=1e-12)
