"""Randomized-SVD projector: orthonormal, close to the exact top-r subspace, usable in GaLore.

Test matrices (GaLore-like gradients, ``(k, d) = (128, 256)``, ``r = 16``), 2 seeds each:

* low-rank plus noise: ``U diag(geomspace(10, 1, r)) V^T + E`` with Haar ``U, V`` and
  ``E ~ N(0, 1/max(k, d))`` entries (the noise's top singular value, ~1.7, is above the
  signal's smallest, 1, so the tail of the subspace is genuinely hard);
* power-law spectra ``sigma_i = i^-alpha`` (alpha 1 and 0.5, full rank: no gap at ``r``).

Overlap = ``||B_exact^T B_rsvd||_F^2 / r`` (1: same subspace; ``r/d`` for random ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.projectors import PROJECTORS, RSVDProjector

K, D, R = 128, 256, 16


def _haar(rng, n, m):
    q, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return q


def low_rank_plus_noise(seed: int, noise: float = 1.0) -> jax.Array:
    rng = np.random.default_rng(seed)
    s = np.geomspace(10.0, 1.0, R)
    x = (_haar(rng, K, R) * s) @ _haar(rng, D, R).T
    x = x + noise * rng.standard_normal((K, D)) / np.sqrt(max(K, D))
    return jnp.asarray(x, jnp.float32)


def power_law(seed: int, alpha: float) -> jax.Array:
    rng = np.random.default_rng(seed)
    m = min(K, D)
    x = (_haar(rng, K, m) * np.arange(1, m + 1) ** -alpha) @ _haar(rng, D, m).T
    return jnp.asarray(x, jnp.float32)


@jax.jit
def _bases(x, key):
    exact = PROJECTORS["svd"].compute(None, x, R, jnp.zeros((D, R)), 0)
    approx = PROJECTORS["rsvd"].compute(key, x, R, jnp.zeros((D, R)), 0)
    return lj.subspace_overlap(exact, approx)


def overlap(x: jax.Array, seed: int) -> float:
    return float(_bases(x, jax.random.key(100 + seed)))


@pytest.mark.parametrize("kind", ["low_rank_plus_noise", "power_law_1", "power_law_0.5"])
def test_rsvd_overlap_with_exact_top_r(kind):
    make = {"low_rank_plus_noise": low_rank_plus_noise,
            "power_law_1": lambda s: power_law(s, 1.0),
            "power_law_0.5": lambda s: power_law(s, 0.5)}[kind]
    overlaps = [overlap(make(seed), seed) for seed in range(2)]
    assert np.mean(overlaps) >= 0.9, overlaps


def test_rsvd_basis_is_orthonormal_float32_and_exact_on_low_rank():
    x = low_rank_plus_noise(0, noise=0.0)  # exactly rank R
    p = RSVDProjector()
    q = p.compute(jax.random.key(0), x.astype(jnp.bfloat16), R, p.init(D, R, jnp.float32), 0)
    assert q.shape == (D, R) and q.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(q.T @ q), np.eye(R), atol=1e-4)
    assert overlap(x, 0) > 0.999


def test_rsvd_in_galore_adamw_runs_and_tracks_overlap():
    params = {"mlp": {"up": low_rank_plus_noise(1)}, "norm": jnp.ones(4)}
    tx = lj.galore_adamw(1e-2, rank=8, update_proj_gap=1, projector="rsvd")
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(2):
        updates, state = step(params, state, params)
    assert np.isfinite(np.asarray(updates["mlp"]["up"])).all()
    ov = lj.find_lowrank_states(state)[0].overlap["mlp"]["up"]
    assert float(ov) > 0.9  # same gradient twice: nearly the same subspace


def test_rsvd_columns_are_the_singular_vectors_in_order():
    """Rayleigh-Ritz: column i approximates v_i (up to sign) where sigma_i is well separated."""
    x = low_rank_plus_noise(0, noise=0.0)  # sigma = geomspace(10, 1, 16): ratio 1.17 per step
    _, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    q = np.asarray(PROJECTORS["rsvd"].compute(jax.random.key(3), x, R, jnp.zeros((D, R)), 0))
    cosines = np.abs(np.sum(q * vt[:R].T, axis=0))
    assert cosines.min() > 0.999, cosines


@pytest.mark.parametrize("kind", ["zero", "rank_one"])
def test_rsvd_degenerate_gradient_gives_an_orthonormal_basis(kind):
    rng = np.random.default_rng(5)
    x = np.zeros((K, D), np.float32)
    if kind == "rank_one":
        x = np.outer(rng.standard_normal(K), rng.standard_normal(D)).astype(np.float32)
    q = np.asarray(PROJECTORS["rsvd"].compute(jax.random.key(4), jnp.asarray(x), R,
                                              jnp.zeros((D, R)), 0))
    np.testing.assert_allclose(q.T @ q, np.eye(R), atol=1e-4)
    if kind == "rank_one":  # the one direction there is comes first
        v = np.linalg.svd(x.astype(np.float64))[2][0]
        assert abs(q[:, 0] @ v) > 0.999


@pytest.mark.parametrize("d, blocks", [(100, None), (300, None), (500, None), (257, 3), (64, 5)])
def test_symmetric_gram_equals_x_transpose_x(d, blocks):
    from lowrank_jax.projectors import _symmetric_gram

    x = np.random.default_rng(d).standard_normal((300, d)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(_symmetric_gram(jnp.asarray(x), blocks)),
                               x.astype(np.float64).T @ x, rtol=1e-4, atol=1e-3)
