"""GUM against the NumPy re-statement of the paper's update rule (``reference_gum.py``).

Three projected matrices (tall, square, wide; ``N = 3``), one full-rank matrix per
period (``q = 1/3``), period 4, 24 steps: six periods, six draws, each matrix both
full-rank and low-rank along the way. The draws and the SVD signs are the
implementation's, fed to the reference.

The parity runs use float64 (``jax.enable_x64``): Newton-Schulz's quintic has slope
3.4 at zero, so in float32 the full-rank branch (the residual ``G - P P^T G`` has a
spread-out spectrum) carries errors of ~1e-4 relative from the 1e-7 error of the
float32 SVD; ``test_gum_float32_stays_close`` bounds that separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_gum as rgum
import reference_numpy as ref
from methods_support import assert_updates_match, separated_grad
from parity_support import PLAIN, PROJECTED, SHAPES, from_layout, get, nest

from lowrank_jax.gum import gum_muon, newton_schulz, scale_by_gum

RANK, PERIOD, STEPS, LR, WD, BETA = 4, 4, 24, 0.01, 0.1, 0.9


def make_problem(seed: int):
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    grads = [{p: (separated_grad(rng, s, scale=rng.uniform(0.5, 2.0)) if p in PROJECTED
                  else rng.standard_normal(s).astype(np.float32)) for p, s in SHAPES.items()}
             for _ in range(STEPS)]
    return params, grads


def nested(flat: dict, layout: str, dtype) -> dict:
    """Torch-layout NumPy leaves -> nested dict of ``dtype`` JAX arrays in ``layout``."""
    return nest({k: jnp.asarray(v.T if (layout == "flax" and v.ndim == 2) else v, dtype)
                 for k, v in flat.items()})


def run_case(layout: str, dtype=jnp.float64):
    """Run the alias (float64 under ``jax.enable_x64``, or float32); per step the params,
    updates, bases and full-rank flags."""
    params, grads = make_problem(31)
    with jax.enable_x64(dtype == jnp.float64):
        tx = gum_muon(LR, rank=RANK, update_proj_gap=PERIOD, num_full=1, beta=BETA, weight_decay=WD,
                      layout=layout, seed=5)
        p = nested(params, layout, dtype)
        state = tx.init(p)
        step = jax.jit(tx.update)
        traj, upds, bases, fulls = [], [], [], []
        for g in grads:
            u, state = step(nested(g, layout, dtype), state, p)
            p = optax.apply_updates(p, u)
            traj.append(from_layout(p, layout))
            upds.append(from_layout(u, layout))
            gum = state[0].inner_states["lowrank"].inner_state
            bases.append({k: np.asarray(get(gum.projector, k), np.float64) for k in PROJECTED})
            fulls.append({k: bool(get(gum.full, k)) for k in PROJECTED})
    return layout, params, grads, traj, upds, bases, fulls


@pytest.fixture(scope="module", params=["flax", "torch"])
def gum_run(request):
    return run_case(request.param)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PROJECTED))
def test_gum_matches_reference(gum_run, path):
    layout, params, grads, traj, upds, bases, fulls = gum_run
    out = rgum.gum_reference(params[path], [g[path] for g in grads], rank=RANK, period=PERIOD,
                             q=1 / 3, beta=BETA, lr=LR, weight_decay=WD,
                             full=lambda t: fulls[t - 1][path],
                             align=lambda t, b: ref.align_columns(b, bases[t - 1][path]))
    worst = assert_updates_match(f"{layout} {path}", params[path], out["params"],
                                 [x[path] for x in traj], [x[path] for x in upds], STEPS)
    assert worst < 1e-9
    draws = [fulls[t][path] for t in range(0, STEPS, PERIOD)]
    assert any(draws) and not all(draws)           # both branches ran for this matrix


@pytest.mark.slow
def test_gum_draws_exactly_gamma_per_period(gum_run):
    _, _, _, _, _, _, fulls = gum_run
    for t in range(STEPS):
        assert sum(fulls[t].values()) == 1
        assert fulls[t] == fulls[t - t % PERIOD]       # constant within a period


@pytest.mark.slow
def test_gum_plain_leaves_follow_torch_adamw(gum_run):
    layout, params, grads, traj, upds, _, _ = gum_run
    for path in PLAIN:
        out = ref.torch_adamw_reference(params[path], [g[path] for g in grads], lr=LR,
                                        weight_decay=WD)
        assert_updates_match(f"{layout} {path}", params[path], out["params"],
                             [x[path] for x in traj], [x[path] for x in upds], STEPS)


@pytest.mark.slow
def test_gum_float32_stays_close(gum_run):
    """float32 against float64 (same draws): low-rank periods within 1e-5, full-rank
    ones within 1e-3 (Newton-Schulz amplifies the float32 SVD's error, see above)."""
    layout, _, _, _, upds64, _, fulls = gum_run
    _, _, _, _, upds32, _, fulls32 = run_case(layout, jnp.float32)
    assert fulls32 == fulls
    for path in PROJECTED:
        for t in range(STEPS):
            d = upds64[t][path]
            rel = np.abs(upds32[t][path] - d).max() / np.abs(d).max()
            assert rel < (1e-3 if fulls[t][path] else 1e-5), (path, t, rel)


def test_newton_schulz_matches_reference():
    rng = np.random.default_rng(0)
    for shape in ((6, 9), (9, 6)):
        x = rng.standard_normal(shape)
        got = np.asarray(newton_schulz(jnp.asarray(x, jnp.float32)), np.float64)
        np.testing.assert_allclose(got, rgum.newton_schulz(x), atol=2e-5)


def test_gum_slots_hold_the_full_rank_momenta():
    """One full-size slot per (shape, dtype) group and ``num_full``: two (16, 8) matrices
    share one slot; the low-rank momenta have the projected shapes."""
    params = {"attn": {"q": jnp.zeros((16, 8)), "k": jnp.zeros((16, 8)),
                       "o": jnp.zeros((8, 24))}}
    state = scale_by_gum(rank=2, num_full=1).init(params)
    assert [s.shape for s in state.slots] == [(1, 16, 8), (1, 8, 24)]   # tree order k, o, q
    assert state.momentum["attn"]["q"].shape == (16, 2)


def test_gum_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_full"):
        scale_by_gum(num_full=2).init({"a": jnp.zeros((4, 4)), "b": jnp.zeros((4, 4))})
    with pytest.raises(ValueError, match="update_proj_gap"):
        scale_by_gum(update_proj_gap=0)
