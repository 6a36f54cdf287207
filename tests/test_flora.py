"""Flora: parity with a NumPy re-statement of the official torch optimizer, and its pieces.

The reference below is written from BorealisAI/flora-opt (pip ``flora-opt`` 0.0.3),
``flora_opt/optimizers/torch/flora.py``, function ``flora_step_`` and class ``Flora``:

* l.147-151: ``step += 1``; ``RMS = rms(p)`` of the parameter *before* the update;
  ``lr_t = max(eps[1], RMS) * lr`` (``_get_lr`` l.312-320, ``scale_parameter=True``);
  ``beta2t = 1 - step ** decay_rate``;
* l.153-170: ``g^2 + eps[0]`` averaged into row/column second moments for matrices
  (``_approx_sq_grad`` l.341-344: ``rsqrt(row / mean(row)) * rsqrt(col)``), a full one
  for vectors; ``u = that * g``;
* l.174-179: vectors (and matrices that are not factorised, ``_get_options`` l.323-334:
  ``min(shape) >= rank`` and ``max / min <= 4``) keep ``exp_avg = (1 - b1) u + b1 exp_avg``
  and use it as the update;
* l.182-246 (factorised momentum): projection ``(rank, m) / sqrt(rank)`` on the left when
  ``shape[0] < shape[-1]``, else ``(n, rank) / sqrt(rank)`` on the right;
  ``update = (1 - b1) u + b1 up(C)`` with the current projection; at
  ``step % kappa == 0`` a new projection and ``C <- down_new(up_old(C))``; then
  ``C <- b1 C + (1 - b1) down(u)``;
* l.250-255: ``update /= max(rms(update) / clip_threshold, 1)``; ``p -= wd * lr_t * p``;
  ``p -= lr_t * update``.

The random projections cannot be matched across frameworks, so both sides use the
same injected matrices (one per resample). 22 steps with kappa 7 cover three resamples
(steps 7, 14, 21); tall ``(24, 12)``, square ``(10, 10)`` and wide ``(8, 20)`` torch
shapes, a 1-D leaf and a 2-D leaf that is not factorised (aspect ratio 5), both layouts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity_support import FixedProjector, max_update_error, report_error, updates_of_each_step

import lowrank_jax as lj
from lowrank_jax.alias import flora
from lowrank_jax.compressed_momentum import scale_by_compressed_momentum

FACTORED = {("attn", "q"): (24, 12), ("attn", "k"): (10, 10), ("mlp", "up"): (8, 20)}
SHAPES = {**FACTORED, ("norm",): (12,), ("embed",): (25, 5)}  # embed: max/min = 5 > 4
KAPPA, STEPS, LR, RANK, WD = 7, 22, 0.01, 4, 0.1
#: float32 implementation vs float64 reference: error of each step's update over its size
RTOL = 1e-5


def flora_reference(w0, grads, mats, *, lr=LR, b1=0.9, kappa=KAPPA, rank=RANK, wd=WD,
                    decay_rate=-0.8, eps=(1e-30, 1e-3), clip=1.0, scale_parameter=True):
    """float64 Flora on one torch-layout leaf; ``mats[k]`` is the k-th projection ``(d, r)``
    (the transpose of the reference's ``(rank, m)`` left matrix, its ``(n, rank)`` right
    one). Returns the parameters after each step."""
    w = np.asarray(w0, np.float64).copy()
    factored = w.ndim == 2
    fm = factored and min(w.shape) >= rank and max(w.shape) / min(w.shape) <= 4
    right = factored and not w.shape[0] < w.shape[-1]
    up = (lambda c, b: c @ b.T) if right else (lambda c, b: b @ c)
    down = (lambda x, b: x @ b) if right else (lambda x, b: b.T @ x)
    if factored:
        vr, vc = np.zeros(w.shape[0]), np.zeros(w.shape[1])
    else:
        v = np.zeros_like(w)
    k = 0
    c = np.zeros((w.shape[0], rank) if right else (rank, w.shape[1])) if fm else None
    m = np.zeros_like(w)
    traj = []
    for t, g in enumerate(grads, 1):
        g = np.asarray(g, np.float64)
        rms_p = np.linalg.norm(w) / math.sqrt(w.size)
        lr_t = max(eps[1], rms_p) * lr if scale_parameter else lr
        beta2t = 1.0 - t ** decay_rate
        sq = g * g + eps[0]
        if factored:
            vr = beta2t * vr + (1 - beta2t) * sq.mean(axis=-1)
            vc = beta2t * vc + (1 - beta2t) * sq.mean(axis=-2)
            u = (1 / np.sqrt(vr / vr.mean()))[:, None] * (1 / np.sqrt(vc))[None, :] * g
        else:
            v = beta2t * v + (1 - beta2t) * sq
            u = g / np.sqrt(v)
        if fm:
            out = (1 - b1) * u + b1 * up(c, mats[k])
            if t % kappa == 0:
                c = down(up(c, mats[k]), mats[k + 1])
                k += 1
            c = b1 * c + (1 - b1) * down(u, mats[k])
        else:
            out = (1 - b1) * u + b1 * m
            m = out
        out = out / max(np.sqrt(np.mean(out * out)) / clip, 1.0)
        w = w - wd * lr_t * w
        w = w - lr_t * out
        traj.append(w.copy())
    return traj


def _problem(seed):
    rng = np.random.default_rng(seed)
    dims = {min(s) for s in FACTORED.values()}
    mats = {d: rng.standard_normal((4, d, RANK)) / math.sqrt(RANK) for d in dims}
    w0 = {k: rng.standard_normal(s) * 0.1 for k, s in SHAPES.items()}
    grads = [{k: rng.standard_normal(s) * (1 + 0.1 * t) for k, s in SHAPES.items()}
             for t in range(STEPS)]
    return mats, w0, grads


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_flora_parity_with_the_reference_over_three_resamples(layout):
    mats, w0, grads = _problem(5)
    labels = {"attn": {"q": True, "k": True}, "mlp": {"up": True}, "norm": False,
              "embed": False}
    for name, tx_labels in (("reference rule", None), ("explicit labels", labels)):
        tx = flora(LR, rank=RANK, update_proj_gap=KAPPA, weight_decay=WD, layout=layout,
                   projector=FixedProjector(mats, KAPPA, offset=1), labels=tx_labels)
        upds = updates_of_each_step(tx, w0, grads, layout)
        errors = {}
        for path, shape in SHAPES.items():
            d = min(shape)
            ref = flora_reference(w0[path], [g[path] for g in grads], mats.get(d))
            errors[path] = max_update_error([x[path] for x in upds], ref, w0[path])
            assert errors[path] < RTOL, (name, path, layout, errors[path])
        report_error("flora", errors, RTOL)


def test_flora_reference_rule_selects_the_factorised_matrices():
    params = {k[-1]: jnp.zeros(s) for k, s in SHAPES.items()}
    labels = lj.matrix_labels(min_dim=RANK, max_aspect=4)(params)
    assert labels == {"q": "lowrank", "k": "lowrank", "up": "lowrank", "norm": "dense",
                      "embed": "dense"}
    # a matrix smaller than the rank is not factorised (it keeps a full momentum)
    assert lj.matrix_labels(min_dim=16, max_aspect=4)(params)["q"] == "dense"


def test_flora_output_is_not_compressed_and_resamples_after_the_output():
    """Step 1: C = 0, so the output is (1 - b1) u exactly; the projector changes at step kappa
    (after it has been used for that step's output) and not before."""
    tx = scale_by_compressed_momentum(0.9, rank=2, update_every=3)
    u = {"w": jax.random.normal(jax.random.key(0), (12, 5))}
    state = tx.init(u)
    out, s1 = tx.update(u, state)
    np.testing.assert_allclose(out["w"], 0.1 * u["w"], rtol=1e-6)
    _, s2 = tx.update(u, s1)
    _, s3 = tx.update(u, s2)
    p1, p2, p3 = (np.asarray(s.projector["w"]) for s in (s1, s2, s3))
    np.testing.assert_array_equal(p1, p2)
    assert not np.allclose(p2, p3)
    assert [bool(lj.refreshed_leaves(s)["w"]) for s in (s1, s2, s3)] == [True, False, True]


def test_compressed_momentum_state_is_small():
    tx = scale_by_compressed_momentum(0.9, rank=8, update_every=2)
    state = tx.init({"w": jnp.zeros((64, 256))})  # flax (in, out): reduce in
    assert state.momentum["w"].shape == (8, 256)
    assert lj.projector_bases(state)["w"][0].shape == (64, 8)


def test_flora_nan_gradient_keeps_the_projector():
    tx = scale_by_compressed_momentum(0.9, rank=2, update_every=1)
    g = {"w": jnp.ones((8, 4))}
    _, s1 = tx.update(g, tx.init(g))
    _, s2 = tx.update({"w": jnp.full((8, 4), jnp.nan)}, s1)
    np.testing.assert_array_equal(s2.projector["w"], s1.projector["w"])
    assert not bool(lj.refreshed_leaves(s2)["w"])


def test_flora_without_scale_parameter_is_plain_lr():
    """scale_parameter=False: the first step of a vector is lr * (1 - b1) * sign-like u."""
    params = {"norm": jnp.full((4,), 10.0)}
    g = {"norm": jnp.array([1.0, -2.0, 3.0, -4.0])}
    for flag, factor in ((False, 1.0), (True, 10.0)):
        tx = flora(0.1, rank=2, scale_parameter=flag)
        u, _ = tx.update(g, tx.init(params), params)
        # u = g / sqrt((1 - beta2_1) g^2) = sign(g) (beta2_1 = 0); rms 1: no clipping
        expected = -0.1 * factor * 0.1 * np.sign(np.asarray(g["norm"]))
        np.testing.assert_allclose(u["norm"], expected, rtol=1e-5)
