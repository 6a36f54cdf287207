"""Behaviour of scale_by_lowrank: geometry, refresh schedule, moments, telemetry, safety."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.geometry import reduced_axes


def _grads(shape, steps, seed=0):
    keys = jax.random.split(jax.random.key(seed), steps)
    return [jax.random.normal(k, shape) for k in keys]


def _run(tx, params, grads_seq):
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs, states = [], []
    for g in grads_seq:
        u, state = update(g, state, params)
        outs.append(u)
        states.append(state)
    return outs, states


@pytest.mark.parametrize("torch_shape", [(24, 10), (10, 24), (12, 12)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_flax_and_torch_layouts_give_transposed_updates(torch_shape, proj_type):
    """The projection rule is stated on (out, in): a Flax kernel is the transpose."""
    grads = _grads(torch_shape, 4)
    inner = lj.scale_by_reference_adam()
    kw = {"rank": 4, "update_every": 10, "proj_type": proj_type}
    torch_out, _ = _run(lj.scale_by_lowrank(inner, layout="torch", **kw),
                        {"w": jnp.zeros(torch_shape)}, [{"w": g} for g in grads])
    flax_out, _ = _run(lj.scale_by_lowrank(inner, layout="flax", **kw),
                       {"w": jnp.zeros(torch_shape[::-1])}, [{"w": g.T} for g in grads])
    for a, b in zip(torch_out, flax_out):
        np.testing.assert_allclose(a["w"], b["w"].T, rtol=2e-5, atol=1e-6)


def test_std_reduces_the_smaller_dimension_and_square_reduces_in():
    assert reduced_axes((1376, 512), "std", "torch") == (1,)   # (out, in): reduce in
    assert reduced_axes((512, 1376), "std", "torch") == (0,)   # out smaller: reduce out
    assert reduced_axes((512, 1376), "std", "flax") == (0,)    # (in, out): reduce in
    assert reduced_axes((64, 64), "std", "torch") == (1,)      # square: in
    assert reduced_axes((64, 64), "std", "flax") == (0,)       # square: in
    assert reduced_axes((64, 64), "reverse_std", "flax") == (1,)
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=8)
    state = tx.init({"a": jnp.zeros((40, 16)), "b": jnp.zeros((16, 40))})
    assert state.inner_state.mu["a"].shape == (40, 8)
    assert state.inner_state.mu["b"].shape == (8, 40)


@pytest.mark.parametrize("rule,expected", [("galore", {1, 4, 7}), ("first_and_multiples", {1, 3, 6})])
def test_projector_refreshes_on_the_documented_steps(rule, expected):
    grads = [{"w": g} for g in _grads((12, 20), 8)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3, update_every=3,
                             refresh_rule=rule)
    _, states = _run(tx, {"w": jnp.zeros((12, 20))}, grads)
    changed = set()
    previous = np.zeros((12, 3))
    for step, st in enumerate(states, start=1):
        q = np.asarray(st.projector["w"])
        if not np.allclose(q, previous):
            changed.add(step)
        previous = q
    assert changed == expected


def test_projector_is_top_singular_subspace():
    g = jax.random.normal(jax.random.key(3), (30, 10))
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=4, layout="torch")
    _, states = _run(tx, {"w": jnp.zeros((30, 10))}, [{"w": g}])
    q = np.asarray(states[0].projector["w"])        # (in=10, 4): right projector
    _, _, vh = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    expected = vh[:4].T
    assert float(lj.subspace_overlap(q, expected)) == pytest.approx(1.0, abs=1e-5)


def test_moments_reset_restarts_inner_state_at_refresh():
    grads = [{"w": g} for g in _grads((16, 8), 5)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=2, update_every=2,
                             moments="reset")
    _, states = _run(tx, {"w": jnp.zeros((16, 8))}, grads)
    assert [int(s.inner_state.count) for s in states] == [1, 2, 1, 2, 1]
    # right after a reset, mu is (1 - b1) * R with R the new projection
    q = states[2].projector["w"]
    r = grads[2]["w"] @ q            # kernel (in=16, out=8): reduce out, axis 1
    np.testing.assert_allclose(states[2].inner_state.mu["w"], 0.1 * r, rtol=1e-5, atol=1e-7)


def test_moments_transport_rotates_first_moment_into_new_basis():
    grads = [{"w": g} for g in _grads((20, 9), 3)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3, update_every=2,
                             moments="transport", layout="torch")
    _, states = _run(tx, {"w": jnp.zeros((20, 9))}, grads)
    old_q, new_q = np.asarray(states[1].projector["w"]), np.asarray(states[2].projector["w"])
    mu_before = np.asarray(states[1].inner_state.mu["w"])           # (20, 3)
    r_new = np.asarray(grads[2]["w"]) @ new_q
    expected = 0.9 * (mu_before @ old_q.T @ new_q) + 0.1 * r_new
    np.testing.assert_allclose(states[2].inner_state.mu["w"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(states[2].inner_state.nu["w"] > 0, True)


def test_overlap_telemetry_is_one_for_a_repeated_gradient_and_unset_before():
    g = jax.random.normal(jax.random.key(0), (16, 12))
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3, update_every=2)
    _, states = _run(tx, {"w": jnp.zeros((16, 12))}, [{"w": g}] * 3)
    assert float(states[0].overlap["w"]) == -1.0
    assert float(states[2].overlap["w"]) == pytest.approx(1.0, abs=1e-5)


def test_full_projection_uses_both_sides():
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3, proj_type="full")
    state = tx.init({"w": jnp.zeros((10, 14))})
    assert state.inner_state.mu["w"].shape == (3, 3)
    u, _ = jax.jit(tx.update)({"w": jnp.ones((10, 14))}, state)
    assert u["w"].shape == (10, 14)
    with pytest.raises(ValueError, match="residual='fira' needs a one-sided proj_type"):
        lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3, proj_type="full",
                            residual="fira")


def test_dct_basis_is_the_reference_matrix_and_scores_match_explicit_product():
    d = 7
    k = np.arange(d)[:, None]
    j = np.arange(d)[None, :]
    q = np.sqrt(2 / d) * np.cos(np.pi * k * (2 * j + 1) / (2 * d))
    q[0] *= np.sqrt(0.5)
    np.testing.assert_allclose(lj.dct_basis(jnp.arange(d), d), q, atol=1e-6)
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-12)
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, d)))
    state = lj.get_projector("dct").compute(None, jnp.asarray(x), 3, None, 0)
    scores = np.abs(x @ q).sum(axis=0)
    assert list(np.asarray(state.indices)) == list(np.argsort(-scores)[:3])


def test_random_projector_is_orthonormal_and_random_subspaces_overlap_about_r_over_d():
    proj = lj.get_projector("random")
    d, r = 200, 10
    qs = [proj.compute(jax.random.key(i), jnp.zeros((3, d)), r, jnp.zeros((d, r)), 0)
          for i in range(2)]
    np.testing.assert_allclose(qs[0].T @ qs[0], np.eye(r), atol=1e-5)
    assert float(lj.subspace_overlap(qs[0], qs[1])) == pytest.approx(r / d, abs=0.04)


def test_golore_switches_to_random_projections():
    g = jax.random.normal(jax.random.key(0), (16, 12))
    params = {"attn": {"w": jnp.zeros((16, 12))}}
    tx = lj.golore_adamw(1e-3, rank=3, update_proj_gap=2, random_after=2)
    _, states = _run(tx, params, [{"attn": {"w": g}}] * 3)
    svd_q = lj.find_lowrank_states(states[0])[0].projector["attn"]["w"]
    rand_q = lj.find_lowrank_states(states[2])[0].projector["attn"]["w"]
    assert float(lj.subspace_overlap(svd_q, rand_q)) < 0.9


@dataclasses.dataclass(frozen=True)
class _FailingSVD:
    """An SVD projector whose computation fails (NaN) from optimizer step `fail_from` on."""

    fail_from: int
    name: str = "failing"

    def init(self, d, rank, dtype):
        return lj.get_projector("svd").init(d, rank, dtype)

    def compute(self, key, x, rank, previous, count):
        q = lj.get_projector("svd").compute(key, x, rank, previous, count)
        return jnp.where(count >= self.fail_from, jnp.nan, q)

    def basis(self, state, d, dtype):
        return state.astype(dtype)

    def nbytes(self, d, rank, dtype):
        return d * rank * 4


def test_failed_projector_computation_keeps_previous_projector():
    grads = [{"w": g} for g in _grads((16, 8), 4)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=2, update_every=2,
                             projector=_FailingSVD(fail_from=2))
    _, states = _run(tx, {"w": jnp.zeros((16, 8))}, grads)
    np.testing.assert_array_equal(states[2].projector["w"], states[0].projector["w"])
    assert bool(states[2].ready["w"])
    assert np.isfinite(np.asarray(states[3].inner_state.mu["w"])).all()


def test_first_projector_failure_retries_next_step():
    grads = [{"w": g} for g in _grads((16, 8), 3)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=2, update_every=100,
                             projector=_FailingSVD(fail_from=0))
    _, states = _run(tx, {"w": jnp.zeros((16, 8))}, grads)
    assert not bool(states[-1].ready["w"])
    assert np.isfinite(np.asarray(states[-1].projector["w"])).all()


def test_nan_gradient_never_poisons_the_projector():
    params = {"w": jnp.zeros((16, 8))}
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=2, update_every=1)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones((16, 8))}, state)
    q_before = np.asarray(state.projector["w"])
    _, state = tx.update({"w": jnp.full((16, 8), jnp.nan)}, state)
    np.testing.assert_array_equal(state.projector["w"], q_before)
