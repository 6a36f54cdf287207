"""Grass against the NumPy re-statement of the paper's equations (``reference_grass.py``).

Tall, square and wide projected matrices plus two plain leaves, 24 steps, refresh every
5 steps (0-based 0, 5, 10, 15, 20): ``top`` selection exactly; ``norm`` and ``uniform``
sampling with the implementation's draws fed to the reference (which recomputes the probabilities
and scales itself); the sampler's law and unbiasedness checked separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_grass as rg
import reference_numpy as ref
from methods_support import assert_updates_match
from parity_support import PLAIN, PROJECTED, SHAPES, run_jax

from lowrank_jax.grass import GrassProjector, grass_adamw

RANK, GAP, STEPS, LR, WD, SCALE = 4, 5, 24, 0.01, 0.1, 0.5


def make_problem(seed: int):
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    base = {p: rng.standard_normal(s) for p, s in SHAPES.items()}

    def grad(p, s):
        # correlated across steps (few sign changes: Adam's m is not a difference of
        # similar terms, which float32 would blur); rows of different sizes, so the
        # top-r rows are well defined
        rows = rng.uniform(0.5, 2.0, size=(s[0], 1)) if len(s) == 2 else 1.0
        return ((base[p] + 0.5 * rng.standard_normal(s)) * rows).astype(np.float32)

    grads = [{p: grad(p, s) for p, s in SHAPES.items()} for _ in range(STEPS)]
    return params, grads


@pytest.fixture(scope="module", params=[("flax", "top"), ("torch", "top"), ("flax", "norm"),
                                        ("torch", "uniform")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def grass_run(request):
    layout, selection = request.param
    params, grads = make_problem(21 if selection == "top" else 22)
    tx = grass_adamw(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, selection=selection,
                     weight_decay=WD, layout=layout, seed=3)
    traj, upds, states = run_jax(tx, params, grads, layout,
                                 entry=lambda s: np.asarray(s.indices))
    return layout, selection, params, grads, traj, upds, states


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PROJECTED))
def test_grass_matches_reference(grass_run, path):
    layout, selection, params, grads, traj, upds, states = grass_run
    out = rg.grass_adamw_reference(
        params[path], [g[path] for g in grads], rank=RANK, update_proj_gap=GAP, scale=SCALE,
        lr=LR, selection=selection, weight_decay=WD, drawn=lambda t: states[t - 1][path])
    worst = assert_updates_match(f"{layout} {selection} {path}", params[path], out["params"],
                                 [x[path] for x in traj], [x[path] for x in upds], STEPS)
    assert worst < 1e-5
    if selection == "top":
        sq = np.sum(grads[0][path].astype(np.float64) ** 2, axis=1)
        np.testing.assert_array_equal(states[0][path], np.sort(np.argsort(-sq)[:RANK]))
    np.testing.assert_array_equal(states[GAP - 1][path], states[0][path])   # kept


@pytest.mark.slow
def test_grass_plain_leaves_follow_torch_adamw(grass_run):
    layout, _, params, grads, traj, upds, _ = grass_run
    for path in PLAIN:
        out = ref.torch_adamw_reference(params[path], [g[path] for g in grads], lr=LR,
                                        weight_decay=WD)
        assert_updates_match(f"{layout} {path}", params[path], out["params"],
                             [x[path] for x in traj], [x[path] for x in upds], STEPS)


def test_norm_sampling_law_and_unbiasedness():
    """Draws follow ``q ~ ||column||^2``, scales are ``1 / sqrt(r q)`` and the mean of
    ``B B^T`` is the identity (unbiased projection), within 4 standard deviations."""
    proj = GrassProjector("norm")
    n, r = 8000, 3
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)) * np.arange(1, 6))
    q = np.asarray(jnp.sum(x * x, 0) / jnp.sum(x * x), np.float64)
    keys = jax.random.split(jax.random.key(1), n)
    states = jax.vmap(lambda k: proj.compute(k, x, r, proj.init(5, r, jnp.float32), 0))(keys)
    idx = np.asarray(states.indices)
    np.testing.assert_allclose(np.asarray(states.scales), 1 / np.sqrt(r * q[idx]), rtol=1e-6)
    counts = np.bincount(idx.ravel(), minlength=5)
    sd = np.sqrt(n * r * q * (1 - q))
    assert np.all(np.abs(counts - n * r * q) < 4 * sd), (counts, n * r * q)
    bases = jax.vmap(lambda s: proj.basis(s, 5, jnp.float32))(states)
    mean_ppt = np.asarray(jnp.mean(bases @ jnp.swapaxes(bases, 1, 2), axis=0), np.float64)
    assert np.abs(mean_ppt - np.diag(np.diag(mean_ppt))).max() == 0       # diagonal
    assert np.all(np.abs(np.diag(mean_ppt) - 1) < 4 * sd / (n * r * q)), np.diag(mean_ppt)


def test_grass_state_is_indices_and_scales():
    params = {"mlp": {"up": jax.ShapeDtypeStruct((64, 32), jnp.float32)}}
    state = jax.eval_shape(grass_adamw(1e-3, rank=8, labels={"mlp": {"up": True}}).init, params)
    low = state[0].inner_states["lowrank"].inner_state
    st = low.projector["mlp"]["up"]
    assert (st.indices.shape, st.indices.dtype, st.scales.shape) == ((8,), jnp.int32, (8,))
    assert low.inner_state.mu["mlp"]["up"].shape == (64, 8)   # kernel (in, out): 8 outputs kept
    assert GrassProjector().nbytes(32, 8, jnp.float32) == 64


def test_grass_rejects_unknown_selection():
    with pytest.raises(ValueError, match="selection"):
        grass_adamw(1e-3, selection="best")
