"""SARA: the sampling law of ``sample_without_replacement``, the SARA projector, and
SARA-AdamW parity given the sampled indices.

REFERENCE.md "SARA": r indices drawn WITHOUT replacement with probability proportional to
sigma (each draw renormalised over the remaining indices), sorted ascending, then used to
slice U or Vh.  The exact law is computed by enumeration in ``reference_numpy``.

Statistical tolerances (all with fixed PRNG keys, so the tests are deterministic; the
thresholds are chosen so that a correct sampler passes with overwhelming probability
for any key and a wrong law is rejected, which is asserted for the natural wrong law):
* k-subset frequencies: Pearson chi-square goodness of fit over all C(6,3) = 20 subsets
  (every expected count >= 30), p-value > 1e-4;
* inclusion frequencies: within 5 standard errors ``sqrt(p(1-p)/N)`` of the exact
  inclusion probability for every index, N = 20000 draws.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import parity_support as ps
import pytest
import scipy.stats

import lowrank_jax as lj

try:
    from . import reference_numpy as ref
except ImportError:  # tests/ is not a package
    import reference_numpy as ref

WEIGHTS = np.array([4.0, 2.5, 1.5, 1.0, 0.6, 0.4])   # unnormalised on purpose (sum 10)
K = 3
N_DRAWS = 20000
N_SE = 5.0
CHI2_PMIN = 1e-4


@pytest.fixture(scope="module")
def draws() -> np.ndarray:
    keys = jax.random.split(jax.random.key(1234), N_DRAWS)
    sample = jax.jit(jax.vmap(
        lambda key: lj.projectors.sample_without_replacement(key, jnp.asarray(WEIGHTS), K)))
    out = np.asarray(sample(keys))
    assert out.shape == (N_DRAWS, K) and out.dtype == np.int32
    return out


def test_sorted_distinct_in_range(draws):
    assert np.all(np.diff(draws, axis=1) > 0)           # ascending => distinct
    assert draws.min() >= 0 and draws.max() < len(WEIGHTS)


def test_subset_law_chi_square(draws):
    law = ref.sara_subset_probabilities(WEIGHTS, K)
    subsets = list(itertools.combinations(range(len(WEIGHTS)), K))
    assert sorted(law) == subsets and np.isclose(sum(law.values()), 1.0)
    expected = np.array([law[s] for s in subsets]) * N_DRAWS
    assert expected.min() >= 30
    index = {s: i for i, s in enumerate(subsets)}
    observed = np.bincount([index[tuple(row)] for row in draws.tolist()],
                           minlength=len(subsets))
    _, p = scipy.stats.chisquare(observed, expected)
    assert p > CHI2_PMIN, (p, observed, expected.round(1))


def test_inclusion_probabilities(draws):
    incl = ref.sara_inclusion_probabilities(WEIGHTS, K)
    np.testing.assert_allclose(incl.sum(), K)
    freq = np.bincount(draws.ravel(), minlength=len(WEIGHTS)) / N_DRAWS
    se = np.sqrt(incl * (1 - incl) / N_DRAWS)
    assert np.all(np.abs(freq - incl) <= N_SE * se), (freq, incl, se)
    # the test has power: the tempting wrong law P(i in S) = k w_i / sum(w) (capped at 1)
    naive = np.minimum(K * WEIGHTS / WEIGHTS.sum(), 1.0)
    assert np.any(np.abs(freq - naive) > N_SE * se)


def test_zero_weights_never_drawn_and_jit():
    w = jnp.array([1.0, 0.0, 2.0, 0.0, 3.0])
    f = jax.jit(lj.projectors.sample_without_replacement, static_argnums=2)
    for i in range(20):
        np.testing.assert_array_equal(np.asarray(f(jax.random.key(i), w, 3)), [0, 2, 4])


def test_reference_law_matches_sequential_sampler():
    """Self-check of the enumeration against the reference's sequential NumPy sampler."""
    rng = np.random.default_rng(7)
    law = ref.sara_subset_probabilities(WEIGHTS, K)
    n = 20000
    counts: dict = {}
    for _ in range(n):
        s = tuple(ref.sara_sample_reference(WEIGHTS, K, rng).tolist())
        counts[s] = counts.get(s, 0) + 1
    subsets = sorted(law)
    _, p = scipy.stats.chisquare([counts.get(s, 0) for s in subsets],
                                 [law[s] * n for s in subsets])
    assert p > CHI2_PMIN
    ordered = ref.sara_ordered_probabilities(WEIGHTS, K)
    np.testing.assert_allclose(sum(ordered.values()), 1.0)
    np.testing.assert_allclose(ordered[(0, 1, 2)], 0.4 * 2.5 / 6 * 1.5 / 3.5)


def test_sara_projector_returns_sampled_singular_vectors():
    """x = U diag(s) V^T (k=8, d=6): every column of the returned (d, r) basis is +-a
    column of V, at strictly increasing indices (descending sigma), and the indices
    follow the sampling law with weights s (inclusion within 5 SE, 4000 keys)."""
    rng = np.random.default_rng(8)
    k, d, r = 8, 6, 3
    s = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    u = ref.random_orthonormal(rng, k, d)
    v = ref.random_orthonormal(rng, d, d)
    x = jnp.asarray((u * s) @ v.T, jnp.float32)
    proj = lj.get_projector("sara")
    previous = proj.init(d, r, jnp.float32)

    def one(key):
        st = proj.compute(key, x, r, previous, jnp.asarray(0, jnp.int32))
        return proj.basis(st, d, jnp.float32)

    n = 4000
    qs = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(99), n)))
    assert qs.shape == (n, d, r)
    dots = np.abs(np.einsum("di,ndr->nir", v, qs))        # (n, d, r): |<v_i, q_j>|
    idx = dots.argmax(axis=1)                              # (n, r)
    np.testing.assert_allclose(dots.max(axis=1), 1.0, atol=1e-4)
    assert np.all(np.diff(idx, axis=1) > 0)
    incl = ref.sara_inclusion_probabilities(s, r)
    freq = np.bincount(idx.ravel(), minlength=d) / n
    se = np.sqrt(incl * (1 - incl) / n)
    assert np.all(np.abs(freq - incl) <= N_SE * se), (freq, incl)


# ---- SARA-AdamW end to end ------------------------------------------------------------

LR, WD, T, RANK, STEPS = 0.05, 0.1, 3, 4, 21


@pytest.mark.parametrize("layout", ["torch", pytest.param("flax", marks=pytest.mark.slow)])
def test_sara_adamw_parity_given_indices(layout):
    """SARA-AdamW = GaLore-AdamW on the sampled singular vectors (arXiv 2502.05790 has no
    published code; the GaLore part re-states ``galore_torch/adamw.py``, see
    ``test_parity_galore``). The implementation's projector is read at every step and
    matched to the reference SVD: its columns must be +-singular vectors at ascending
    indices; the reference is then run with those indices (``sara_adamw_reference``) and
    signs over 21 steps (refreshes at 1, 4, ..., 19) on tall, square and wide projected
    matrices, a 1-D and a 2-D plain leaf (GaLore's Adam). Relative update error < 1e-5
    (gradients conditioned as in ``test_parity_galore``, here min |R| >= 2e-3 over ALL
    singular directions: any r of them may be drawn)."""
    rng = np.random.default_rng(9)
    w0 = {p: rng.standard_normal(sh) for p, sh in ps.SHAPES.items()}
    grads = []
    for t in range(1, STEPS + 1):
        g = {}
        for p, sh in ps.SHAPES.items():
            while p in ps.PROJECTED:
                g[p] = ref.well_conditioned_grad(rng, sh, scale=rng.uniform(0.5, 2.0))
                if (t - 1) % T or ref.min_abs_projection(g[p], min(sh)) >= 2e-3:
                    break
            else:
                g[p] = rng.standard_normal(sh).astype(np.float32)
        grads.append(g)
    tx = lj.sara_adamw(LR, rank=RANK, update_proj_gap=T, scale=0.25, weight_decay=WD,
                       layout=layout)
    traj, upds, projs = ps.run_jax(tx, w0, grads, layout)
    saw_non_top = False
    errors = {}
    for p, shape in ps.PROJECTED.items():
        side = ref.std_side(shape)
        chosen = {}
        for t in range(1, STEPS + 1, T):
            basis, _ = ref.svd_basis(grads[t - 1][p].astype(np.float64), side)
            dots = np.abs(basis.T @ projs[t - 1][p])          # (d, r)
            np.testing.assert_allclose(dots.max(axis=0), 1.0, atol=1e-4)
            chosen[t] = dots.argmax(axis=0)
            assert np.all(np.diff(chosen[t]) > 0), chosen[t]
            saw_non_top |= not np.array_equal(chosen[t], np.arange(RANK))
        r = ref.sara_adamw_reference(
            w0[p], [g[p] for g in grads], indices=chosen.__getitem__,
            align=lambda t, q, p=p: ref.align_columns(q, projs[t - 1][p]),
            lr=LR, rank=RANK, update_proj_gap=T, scale=0.25, eps=1e-6, weight_decay=WD)
        errors[p] = ps.assert_leaf(f"SARA {p} {layout}", p, w0, r["params"], traj, upds,
                                   STEPS)
    errors.update(ps.check_plain_leaves(ref.adamw_reference, w0, grads, traj, upds, STEPS,
                                        lr=LR, eps=1e-6, weight_decay=WD))
    ps.report_error("sara_adamw", errors)
    assert saw_non_top, "sampling never left the top-r indices: test not informative"
