"""lowrank_jax.metrics against independent NumPy re-statements and closed forms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import metrics as M
from lowrank_jax.models import Llama, get_preset, loss_from_state

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- NumPy references
def np_cka_features(x, y):
    """Kornblith et al. linear CKA, feature-space form, float64."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def np_cka_hsic(x, y):
    """The same CKA through the biased HSIC with the centring matrix H."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def np_unbiased_hsic(k, l_):
    """Song et al. (2012) unbiased HSIC, written out term by term."""
    n = k.shape[0]
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    ones = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return (term1 + term2 - term3) / (n * (n - 3))


def np_debiased_cka(x, y):
    k, l_ = x @ x.T, y @ y.T
    return np_unbiased_hsic(k, l_) / np.sqrt(np_unbiased_hsic(k, k) * np_unbiased_hsic(l_, l_))


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize("n,p,q", [(40, 6, 9), (12, 30, 20)])   # feature form / Gram form
def test_linear_cka_matches_kornblith(n, p, q):
    x = RNG.normal(size=(n, p)) + 3.0
    y = x @ RNG.normal(size=(p, q)) + 0.5 * RNG.normal(size=(n, q))
    got = float(M.linear_cka(x, y))
    np.testing.assert_allclose(got, np_cka_features(x, y), rtol=1e-4)
    np.testing.assert_allclose(got, np_cka_hsic(x, y), rtol=1e-4)


def test_linear_cka_invariances():
    x = RNG.normal(size=(50, 8))
    y = RNG.normal(size=(50, 5)) + x[:, :5]
    q, _ = np.linalg.qr(RNG.normal(size=(8, 8)))
    base = float(M.linear_cka(x, y))
    np.testing.assert_allclose(float(M.linear_cka(x @ q, y)), base, rtol=1e-4)
    np.testing.assert_allclose(float(M.linear_cka(7.5 * x, 0.1 * y)), base, rtol=1e-4)
    np.testing.assert_allclose(float(M.linear_cka(x, x)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(M.debiased_linear_cka(x, x)), 1.0, rtol=1e-5)


def test_debiased_cka_matches_unbiased_hsic():
    x = RNG.normal(size=(30, 7)) + 2.0          # non-centred on purpose
    y = np.tanh(x @ RNG.normal(size=(7, 11))) + RNG.normal(size=(30, 11))
    got = float(M.debiased_linear_cka(x, y))
    np.testing.assert_allclose(got, np_debiased_cka(x, y), rtol=1e-4, atol=1e-6)
    assert got < np_cka_features(x, y) + 1e-6  # debiasing removes the positive bias here
    jitted = jax.jit(M.debiased_linear_cka)(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(float(jitted), got, rtol=1e-5)


def test_l2_and_cosine():
    x, y = RNG.normal(size=(9, 4)), RNG.normal(size=(9, 4))
    np.testing.assert_allclose(float(M.l2_distance(x, y)),
                               np.mean(np.linalg.norm(x - y, axis=1)), rtol=1e-5)
    cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(float(M.cosine_similarity(x, y)), cos.mean(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- spectra
def test_spectrum_metrics_known_values():
    assert float(M.effective_rank(jnp.ones(7))) == pytest.approx(7.0, rel=1e-5)
    assert float(M.effective_rank(jnp.array([0.0, 3.0, 0.0]))) == pytest.approx(1.0, rel=1e-6)
    s = np.array([4.0, 2.0, 1.0, 0.05])
    p = s / s.sum()
    assert float(M.effective_rank(s)) == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-5)
    assert float(M.stable_rank(s)) == pytest.approx((16 + 4 + 1 + 0.0025) / 16, rel=1e-6)
    assert float(M.spectral_gap(s)) == pytest.approx(0.5)
    assert int(M.count_above(s)) == 3
    assert int(M.count_above(s, threshold=1.5)) == 2
    assert float(M.top_singular(s)) == 4.0


def test_matrix_spectra_selection_and_delta():
    w = np.diag([3.0, 1.0, 0.0])
    params = {"layers": {"0": {"attn": {"q_proj": {"kernel": jnp.asarray(w)}},
                               "mlp": {"up_proj": {"kernel": jnp.asarray(2 * w)}},
                               "attn_norm": {"scale": jnp.ones(3)}}},
              "embed": {"embedding": jnp.ones((5, 3))}}
    out = M.matrix_spectra(params)
    assert sorted(out["per_matrix"]) == ["layers/0/attn/q_proj/kernel",
                                         "layers/0/mlp/up_proj/kernel"]
    assert out["per_matrix"]["layers/0/mlp/up_proj/kernel"]["top_singular"] == pytest.approx(6.0)
    assert out["mean"]["top_singular"] == pytest.approx(4.5)
    assert out["mean"]["stable_rank"] == pytest.approx(10 / 9, rel=1e-5)
    delta = M.delta_spectra(params, jax.tree.map(lambda a: 2 * a, params))  # dW = params
    assert delta["mean"]["top_singular"] == pytest.approx(4.5)


# ---------------------------------------------------------------- directions
@pytest.fixture(scope="module")
def tiny():
    model = Llama(get_preset("llama_tiny"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.random.randint(jax.random.key(3), (2, 17), 0, 256, dtype=jnp.int32)
    batch = {"tokens": tokens, "mask": jnp.ones((2, 16), jnp.float32)}
    return functools.partial(loss_from_state, graphdef), params, batch


def test_filter_normalization_on_flax_kernels(tiny):
    _, params, _ = tiny
    d = jax.jit(M.filter_normalized_direction)(jax.random.key(1), params)
    for (path, w), dl in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(d)):
        assert dl.shape == w.shape and dl.dtype == w.dtype
        if w.ndim == 1:
            assert not np.any(np.asarray(dl)), path
        else:                                  # column j (output unit) has ||W[:, j]||
            np.testing.assert_allclose(np.linalg.norm(dl, axis=0), np.linalg.norm(w, axis=0),
                                       rtol=1e-5)
    small = {"kernel": jnp.ones((3, 2)), "scale": jnp.full(2, 5.0)}
    raw = M.gaussian_direction(jax.random.key(1), small)
    kept = M.filter_normalized_direction(jax.random.key(1), small, one_d="keep")
    np.testing.assert_array_equal(kept["scale"], raw["scale"])
    copied = M.filter_normalized_direction(jax.random.key(1), small, one_d="copy")
    np.testing.assert_array_equal(copied["scale"], small["scale"])


def test_gaussian_direction_statistics():
    params = {"a": jnp.zeros((200, 100)), "b": jnp.zeros(50)}
    d = M.gaussian_direction(jax.random.key(0), params)
    assert abs(float(d["a"].mean())) < 0.02 and abs(float(d["a"].std()) - 1) < 0.02
    stacked = M.random_directions(jax.random.key(0), params, 3)
    assert stacked["a"].shape == (3, 200, 100)
    assert not np.allclose(stacked["a"][0], stacked["a"][1])


def test_random_filter_directions_pass_the_1d_option():
    params = {"kernel": jnp.arange(1.0, 7.0).reshape(3, 2), "scale": jnp.full(2, 5.0)}
    keys = jax.random.split(jax.random.key(4), 2)
    for one_d in ("zero", "keep", "copy"):
        stacked = M.random_directions(jax.random.key(4), params, 2, "filter", one_d=one_d)
        for i in range(2):                  # row i is direction i of the same key split
            single = M.filter_normalized_direction(keys[i], params, one_d=one_d)
            np.testing.assert_allclose(stacked["scale"][i], single["scale"], rtol=1e-6)
            # each output column has the weight column's norm (NumPy re-statement)
            w = np.asarray(params["kernel"])
            np.testing.assert_allclose(np.linalg.norm(np.asarray(stacked["kernel"][i]), axis=0),
                                       np.linalg.norm(w, axis=0), rtol=1e-5)
    zero = M.random_directions(jax.random.key(4), params, 2, "filter")
    assert not np.any(np.asarray(zero["scale"]))


def test_rank1_svd_directions_reconstruct():
    w = RNG.normal(size=(6, 4)).astype(np.float32)
    params = {"attn": {"kernel": jnp.asarray(w)}, "norm": jnp.ones(4)}
    terms = [M.rank1_svd_direction(params, k) for k in range(1, 5)]
    np.testing.assert_allclose(sum(t["attn"]["kernel"] for t in terms), w, atol=1e-5)
    s = np.linalg.svd(w, compute_uv=False)
    for k, t in enumerate(terms):
        np.testing.assert_allclose(np.linalg.norm(t["attn"]["kernel"]), s[k], rtol=1e-5)
        assert not np.any(np.asarray(t["norm"]))
    # k > min(m, n): the last component, as the reference clamps it
    np.testing.assert_allclose(M.rank1_svd_direction(params, 5)["attn"]["kernel"],
                               terms[-1]["attn"]["kernel"], atol=1e-6)


def test_trajectory_pca_recovers_line():
    final = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    u = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32), "b": jnp.ones(2)}
    ckpts = [jax.tree.map(lambda f, v, t=t: f + t * v, final, u) for t in (3.0, 2.0, 1.0, 0.5)]
    ckpts.append(final)
    dirs, ratio = M.trajectory_pca_directions(ckpts, n=1)
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    cos = abs(flat(dirs[0]) @ flat(u)) / np.linalg.norm(flat(u))
    assert cos == pytest.approx(1.0, abs=1e-5) and ratio[0] == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------- landscape
def test_expected_sharpness_quadratic():
    c = 3.0
    theta0 = {"w": jnp.asarray(RNG.normal(size=5), jnp.float32)}
    d = RNG.normal(size=5)
    dirs = {"w": jnp.asarray(d / np.linalg.norm(d), jnp.float32)[None]}
    alphas = np.linspace(-1.0, 1.0, 9)
    loss = lambda p, b: 0.5 * c * jnp.sum(p["w"] ** 2)
    curves = M.landscape_1d(loss, theta0, dirs, alphas)
    assert curves.shape == (1, 9)
    es = float(M.expected_sharpness(curves.mean(0), center_index=4))
    assert es == pytest.approx(0.5 * c * np.mean(alphas[5:] ** 2), rel=1e-4)
    es2 = float(M.expected_sharpness(curves.mean(0), center_index=4, pairs=2))
    assert es2 == pytest.approx(0.5 * c * np.mean(alphas[5:7] ** 2), rel=1e-4)
    prof = M.centered_profile(curves, 4)
    assert float(prof[0, 4]) == 0.0
    # direction variance: mean over points of the across-direction variance (ddof 0)
    curves2 = RNG.normal(size=(6, 9))
    assert float(M.direction_variance(curves2)) == pytest.approx(np.var(curves2, 0).mean(),
                                                                  rel=1e-5)


def test_default_grid():
    assert M.DEFAULT_ALPHAS.shape == (25,) and M.DEFAULT_NUM_DIRECTIONS == 100
    assert abs(M.DEFAULT_ALPHAS[M.DEFAULT_CENTER_INDEX]) < 1e-12


def test_landscape_chunking_with_remainder():
    loss = lambda p, b: (jnp.sum(jnp.sin(p["w"])) * b, {"aux": 0})   # (loss, aux) accepted
    params = {"w": jnp.asarray(RNG.normal(size=(3, 2)), jnp.float32)}
    dirs = M.random_directions(jax.random.key(0), params, 5)
    alphas = np.linspace(-1, 1, 4)
    want = np.array([[np.sum(np.sin(np.asarray(params["w"]) + a * np.asarray(dirs["w"][i]))) * 2
                      for a in alphas] for i in range(5)])
    for chunk, a_chunk in ((1, None), (2, 3), (8, 1), (None, None)):
        got = M.landscape_1d(loss, params, dirs, alphas, 2.0, chunk, a_chunk)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_landscape_matches_python_loop(tiny):
    loss_fn, params, batch = tiny
    dirs = M.random_directions(jax.random.key(0), params, 3, kind="filter")
    alphas = np.array([-0.5, -0.1, 0.0, 0.3])
    got = np.asarray(M.landscape_1d(loss_fn, params, dirs, alphas, batch, chunk_size=2))
    single = jax.jit(lambda p, d, i, a: loss_fn(
        jax.tree.map(lambda x, v: x + a * v[i], p, d), batch)[0])
    want = np.array([[float(single(params, dirs, i, a)) for a in alphas] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[:, 2], float(loss_fn(params, batch)[0]), rtol=1e-5)


# ---------------------------------------------------------------- interpolation
def test_barrier_double_well_and_interior_max():
    double_well = lambda p, b: (p["t"] ** 2 - 1.0) ** 2
    losses = M.interpolate_losses(double_well, {"t": jnp.array(-1.0)}, {"t": jnp.array(1.0)},
                                  None, num=21)
    assert float(losses[10]) == pytest.approx(1.0)
    assert float(M.barrier_height(losses)) == pytest.approx(1.0, abs=1e-6)
    bowl = lambda p, b: p["t"] ** 2                  # max at a=0.95 on the grid, not the end
    losses = M.interpolate_losses(bowl, {"t": jnp.array(0.0)}, {"t": jnp.array(2.0)}, None)
    assert float(M.barrier_height(losses)) == pytest.approx(1.9 ** 2 - 2.0, rel=1e-5)


def test_ccbh_and_imbh(tiny):
    loss_fn, params, batch = tiny
    other = jax.tree.map(lambda p: p * 0.5, params)
    ckpts = [params, other, params]
    barriers = M.consecutive_checkpoint_barriers(loss_fn, ckpts, batch, num=5)
    assert len(barriers) == 2 and barriers[0] == pytest.approx(barriers[1], abs=1e-5)
    losses = M.interpolate_losses(loss_fn, params, other, batch, num=5, chunk_size=2)
    mix = jax.jit(lambda a: loss_fn(jax.tree.map(lambda x, y: (1 - a) * x + a * y, params, other),
                                    batch)[0])
    want = [float(mix(a)) for a in np.linspace(0, 1, 5)]
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5)
    assert M.inter_method_barrier(loss_fn, params, other, batch, num=5) == pytest.approx(
        barriers[0], abs=1e-5)


# ---------------------------------------------------------------- subspace
def test_subspace_overlaps():
    q, _ = np.linalg.qr(RNG.normal(size=(20, 20)))
    a, b, c = q[:, :4], q[:, 2:6], q[:, 10:14]
    assert float(M.subspace_overlap(a, a)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(M.consecutive_overlaps([a, b, c]), [0.5, 0.0], atol=1e-5)
    np.testing.assert_allclose(M.anchor_overlaps([a, b, c, a]), [1.0, 0.5, 0.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(M.anchor_overlaps([a, b, c], anchor_index=1), [0.5, 1.0, 0.0],
                               atol=1e-5)


# ---------------------------------------------------------------- the reference's rank table
# NumPy re-statements of NamrataRShivagunde/low-rank-geometry @9fdfb317,
# loss-landscape/scripts/single_checkpoint_scripts/ (read there, written here anew).
def np_reference_rank_metrics(sv, rows, cols, rank_tol=None, sv_threshold=0.1):
    """5_ranks.py ``_metrics_from_singular_values`` (l.71-125), float64."""
    sv = np.asarray(sv, np.float64)
    min_dim = max(1, min(rows, cols))
    tol = 1e-12 if rank_tol is None else rank_tol
    n_thr = float(np.sum(sv > sv_threshold))
    kept = sv[sv > tol]
    if kept.size == 0:
        return {"rank": 0.0, "rank_ratio": 0.0, "effective_rank": 0.0,
                "effective_rank_ratio": 0.0, "stable_rank": 0.0, "spectral_gap": 0.0,
                "singular_value_ratio": 0.0, "count_above": n_thr,
                "count_above_ratio": n_thr / min_dim}
    p = kept / kept.sum()
    erank = float(np.exp(-np.sum(p * np.log(p))))
    second = kept[1] if kept.size > 1 else 0.0
    return {"rank": float(kept.size), "rank_ratio": kept.size / min_dim,
            "effective_rank": erank, "effective_rank_ratio": erank / min_dim,
            "stable_rank": float(np.sum(kept ** 2) / kept[0] ** 2),
            "spectral_gap": float((kept[0] - second) / kept[0]),
            "singular_value_ratio": float(second / kept[0]),
            "count_above": n_thr, "count_above_ratio": n_thr / min_dim}


def _ranked(m, n, r, scale=1.0):
    return (scale * RNG.normal(size=(m, r)) @ RNG.normal(size=(r, n))).astype(np.float32)


@pytest.mark.parametrize("w", [
    RNG.normal(size=(7, 5)).astype(np.float32),          # full rank
    _ranked(8, 6, 2),                                    # rank 2 up to float32 rounding
    np.zeros((4, 6), np.float32),                        # all zero: every statistic 0
    np.full((3, 3), 1e-14, np.float32),                  # only values below the tolerance
    _ranked(5, 9, 1, scale=0.05),                        # one value, below the 0.1 count
    np.array([[2.0, 0.0], [0.0, 0.0]], np.float32),      # one kept value: gap 1, ratio 0
])
def test_rank_metrics_match_reference(w):
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    want = np_reference_rank_metrics(s, *w.shape)
    got = M.rank_metrics(jnp.asarray(s, jnp.float32), w.shape)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), k


def test_spectrum_statistics_of_a_zero_matrix_are_zero():
    """5_ranks.py l.86-98: no singular value above 1e-12 -> every statistic 0 (was: erank 1)."""
    s = jnp.linalg.svd(jnp.zeros((5, 3)), compute_uv=False)
    for name, value in M.spectrum_metrics(s).items():
        assert float(value) == 0.0, name
    assert float(M.effective_rank(jnp.full(3, 1e-13))) == 0.0
    assert float(M.stable_rank(jnp.full(3, 1e-13))) == 0.0
    frozen = {"layers": {"0": {"attn": {"q_proj": {"kernel": jnp.ones((4, 4))}}}}}
    delta = M.delta_spectra(frozen, frozen)                       # dW = 0
    assert delta["mean"]["effective_rank"] == 0.0 and delta["mean"]["stable_rank"] == 0.0


def _np_layer_key(name):
    """5_ranks.py ``_extract_layer_key`` (l.51-56) on our '/' paths."""
    import re
    m = re.search(r"(?:^|/)layers/(\d+)(?:/|$)", name)
    return f"layer_{int(m.group(1)):03d}" if m else "non_layer"


def _rank_tree():
    mats = {"0": {"attn": {"q_proj": {"kernel": RNG.normal(size=(6, 4))},
                           "o_proj": {"kernel": np.zeros((4, 6))}},
                  "mlp": {"up_proj": {"kernel": _ranked(6, 10, 2)}},
                  "attn_norm": {"scale": np.ones(6)}},
            "1": {"attn": {"q_proj": {"kernel": _ranked(6, 4, 3)}},
                  "mlp": {"down_proj": {"kernel": RNG.normal(size=(10, 6))}}}}
    tree = {"layers": mats, "embed": {"embedding": RNG.normal(size=(9, 6))}}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_matrix_rank_metrics_means_and_layers():
    params = _rank_tree()
    out = M.matrix_rank_metrics(params)
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}
    chosen = {k: v for k, v in flat.items()
              if v.ndim == 2 and any(t in k for t in ("attn", "mlp"))}
    assert sorted(out["per_matrix"]) == sorted(chosen)
    want = {k: np_reference_rank_metrics(np.linalg.svd(v.astype(np.float64), compute_uv=False),
                                         *v.shape) for k, v in chosen.items()}
    for key, metrics in want.items():
        for m, v in metrics.items():
            assert out["per_matrix"][key][m] == pytest.approx(v, rel=1e-4, abs=1e-6), (key, m)
    for m in M.spectra.RANK_METRICS:
        assert out["mean"][m] == pytest.approx(np.mean([w[m] for w in want.values()]),
                                               rel=1e-4, abs=1e-6)
        for layer in ("layer_000", "layer_001"):
            vals = [w[m] for k, w in want.items() if _np_layer_key(k) == layer]
            assert out["per_layer"][layer][m] == pytest.approx(np.mean(vals), rel=1e-4, abs=1e-6)
    # the reference's --max_matrices cap stops after that many matrices, in order
    capped = M.matrix_rank_metrics(params, max_matrices=2)
    assert list(capped["per_matrix"]) == list(out["per_matrix"])[:2]


def test_update_norms_match_reference():
    """5_ranks_updates.py l.417-480: per-matrix ||dW||_F, ||W_prev||_F, ratio, means, totals."""
    prev = _rank_tree()
    cur = jax.tree.map(lambda a: a + jnp.asarray(0.1 * RNG.normal(size=a.shape), a.dtype), prev)
    out = M.update_norms(prev, cur)
    rows = []
    for (path, p), c in zip(jax.tree_util.tree_leaves_with_path(prev), jax.tree.leaves(cur)):
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if p.ndim != 2 or not any(t in name for t in ("attn", "mlp")):
            continue
        p64, c64 = np.asarray(p, np.float64), np.asarray(c, np.float64)
        u, b = np.linalg.norm(c64 - p64, "fro"), np.linalg.norm(p64, "fro")
        rows.append((name, u, b, u / b if b > 0 else np.nan))
    assert sorted(out["per_matrix"]) == sorted(r[0] for r in rows)
    for name, u, b, ratio in rows:
        got = out["per_matrix"][name]
        assert got["update_fro_norm"] == pytest.approx(u, rel=1e-4)
        assert got["prev_fro_norm"] == pytest.approx(b, rel=1e-5)
        if np.isnan(ratio):                              # the all-zero o_proj
            assert np.isnan(got["update_to_prev_ratio"])
        else:
            assert got["update_to_prev_ratio"] == pytest.approx(ratio, rel=1e-4)
    tu = np.sqrt(sum(r[1] ** 2 for r in rows))
    tp = np.sqrt(sum(r[2] ** 2 for r in rows))
    assert out["total"]["total_update_fro_norm"] == pytest.approx(tu, rel=1e-4)
    assert out["total"]["total_update_to_prev_ratio"] == pytest.approx(tu / tp, rel=1e-4)
    assert out["mean"]["update_fro_norm"] == pytest.approx(np.mean([r[1] for r in rows]),
                                                           rel=1e-4)
    assert np.isnan(out["mean"]["update_to_prev_ratio"])  # np.mean over a NaN, as the reference


def test_relative_l2_and_mean_norms_match_reference():
    """6_activations_comparison.py l.185-195 (eps 1e-12) and the layer mean of
    6_activations_comparison_plots.py l.100-106."""
    base = RNG.normal(size=(20, 8)) * 3.0
    target = base + RNG.normal(size=(20, 8))
    mean_norm = np.linalg.norm(base, axis=-1).mean()
    mean_l2 = np.linalg.norm(base - target, axis=-1).mean()
    assert float(M.mean_norm(base)) == pytest.approx(mean_norm, rel=1e-5)
    assert float(M.relative_l2_distance(base, target)) == pytest.approx(
        mean_l2 / (mean_norm + 1e-12), rel=1e-5)
    assert float(M.relative_l2_distance(np.zeros((3, 2)), np.ones((3, 2)))) == pytest.approx(
        np.sqrt(2) / 1e-12, rel=1e-4)
    layers = {"layer_000": {"cka": 0.9, "l2": 1.0}, "layer_001": {"cka": 0.5, "l2": None},
              "layer_002": {"cka": 0.4}}
    got = M.mean_over_layers(layers)
    assert got["cka"] == pytest.approx(np.mean([0.9, 0.5, 0.4]))
    assert got["l2"] == pytest.approx(1.0)


# ---------------------------------------------------------------- top-k "PCA" directions
def np_rank1_direction(w, k):
    """3b_landscape_2d_pca_topk_components_variants.py l.113-120 (``--svd_weight_mode sigma``)."""
    u, s, vh = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    idx = max(0, min(k - 1, s.size - 1))
    return s[idx] * np.outer(u[:, idx], vh[idx, :])


def test_rank1_svd_directions_match_reference_and_share_one_svd():
    params = {"a": jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32),
              "b": jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32),
              "scale": jnp.ones(5, jnp.float32)}
    ks = [1, 2, 3, 4, 7]
    stacked = M.rank1_svd_directions(params, ks)
    for i, k in enumerate(ks):
        for name in ("a", "b"):
            want = np_rank1_direction(params[name], k)
            # singular vectors are defined up to sign; sigma u v^T is not
            np.testing.assert_allclose(stacked[name][i], want, atol=1e-5)
        assert not np.any(np.asarray(stacked["scale"][i]))          # bias mode "zero"
        single = M.rank1_svd_direction(params, k)
        np.testing.assert_allclose(single["a"], stacked["a"][i], atol=1e-6)
    factors = M.svd_factors(params)
    again = M.rank1_svd_directions(params, [3], factors=factors)
    np.testing.assert_allclose(again["b"][0], stacked["b"][2], atol=1e-6)
    only_a = M.rank1_svd_directions(params, [1], select=lambda path, w: path == "a")
    assert not np.any(np.asarray(only_a["b"]))
    with pytest.raises(ValueError, match="1-based"):
        M.rank1_svd_directions(params, [0])


def np_reference_sharpness(curve):
    """4b_pca_aggregate_subsets.py ``compute_sharpness`` (l.22-62)."""
    curve = np.asarray(curve, np.float64)
    c = len(curve) // 2
    vals = []
    for off in range(1, min(c, len(curve) - 1 - c) + 1):
        lp, lm = curve[min(len(curve) - 1, c + off)], curve[max(0, c - off)]
        vals.append(0.5 * (lp + lm) - curve[c])
    return float(np.mean(vals)) if vals else 0.0


def test_topk_grids():
    ref = M.PCA_ALPHAS_REFERENCE
    np.testing.assert_allclose(ref, np.arange(-0.05, 0.0501, 0.004))
    assert len(ref) == 26 and not np.any(np.isclose(ref, 0.0, atol=1e-9))
    assert ref[M.reference_center_index(len(ref))] == pytest.approx(0.002)
    cen = M.PCA_ALPHAS_CENTERED
    c = M.reference_center_index(len(cen))
    assert cen[c] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(cen, -cen[::-1], atol=1e-12)
    np.testing.assert_allclose(np.diff(cen), 0.004, rtol=1e-9)
    assert ref.min() <= cen.min() and cen.max() <= ref.max()


@pytest.mark.parametrize("n_alphas", [26, 25])
def test_aggregate_topk_matches_reference(n_alphas):
    """4b_pca_aggregate_subsets.py l.91-126: subsets of components k <= K, mean/var curves,
    sharpness on the mean curve, mean of the variance curve."""
    ks = list(range(1, 21))
    curves = 3.0 + RNG.random((20, n_alphas)) + np.linspace(-1, 1, n_alphas) ** 2
    out = M.aggregate_topk(curves, ks, subsets=(1, 5, 10, 20, 50))
    assert sorted(out) == [1, 5, 10, 20, 50]
    for top in (1, 5, 10, 20, 50):
        sub = curves[:min(top, 20)]
        mean, var = sub.mean(0), sub.var(0)
        assert out[top]["components"] == sub.shape[0]
        np.testing.assert_allclose(out[top]["mean_curve"], mean, rtol=1e-12)
        np.testing.assert_allclose(out[top]["variance_curve"], var, rtol=1e-12, atol=1e-15)
        assert out[top]["expected_sharpness"] == pytest.approx(np_reference_sharpness(mean),
                                                               rel=1e-5, abs=1e-6)
        assert out[top]["direction_variance"] == pytest.approx(var.mean(), rel=1e-5, abs=1e-7)
    assert out[1]["direction_variance"] == 0.0                       # one curve: no spread
    # components evaluated out of order and a subset with none of them
    shuffled = M.aggregate_topk(curves[[4, 0, 2]], [5, 1, 3], subsets=(1, 3))
    np.testing.assert_allclose(shuffled[3]["mean_curve"], curves[[0, 2]].mean(0))
    assert M.aggregate_topk(curves[4:6], [5, 6], subsets=(1,)) == {}
