"""Behaviour of scale_by_lowrank: geometry, refresh schedule, moments, telemetry, safety."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def test_full_projection_matches_the_reference_values():
    """``proj_type="full"`` against GaLore's two-sided projection, written from
    jiaweizzhao/GaLore ``galore_torch/galore_projector.py`` (l.40-43: ``A^T G B^T`` with
    ``A = U[:, :r]``, ``B = Vh[:r]`` of one float32 SVD, l.63-64: ``A N B`` times ``scale``)
    and ``adamw.py`` (l.108-129: Adam with eps on the uncorrected root, the bias correction
    folded into the step). One refresh period of 5 steps: the update is invariant to the
    SVD's signs there. Torch layout (10, 14). ``A^T G B^T`` of the refresh gradient is
    diagonal, its off-diagonal entries float32 round-off that Adam would blow up to O(1)
    with eps 1e-6 (in the reference as here): eps 0.1 keeps the comparison well posed."""
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((10, 14)).astype(np.float32) for _ in range(5)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(eps=0.1), rank=3, proj_type="full",
                             layout="torch", update_every=100, scale=0.25)
    outs, states = _run(tx, {"w": jnp.zeros((10, 14))}, [{"w": jnp.asarray(g)} for g in grads])
    u, _, vh = np.linalg.svd(grads[0].astype(np.float64), full_matrices=False)
    a_, b_ = u[:, :3], vh[:3]
    m = v = np.zeros((3, 3))
    for t, g in enumerate(grads, 1):
        low = a_.T @ g @ b_.T
        m = 0.9 * m + 0.1 * low
        v = 0.999 * v + 0.001 * low * low
        step = np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        want = 0.25 * step * (a_ @ (m / (np.sqrt(v) + 0.1)) @ b_)
        got = np.asarray(outs[t - 1]["w"], np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, t
    assert states[0].inner_state.mu["w"].shape == (3, 3)
    left, right = lj.projector_bases(states[-1])["w"]
    assert left.shape == (10, 3) and right.shape == (14, 3)
    with pytest.raises(ValueError, match="needs a one-sided proj_type"):
        lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3, proj_type="full",
                            residual="fira")


def test_stagger_refreshes_each_leaf_on_its_own_schedule_with_real_gradients():
    """Three leaves, T = 6, stagger: offsets 0, 2, 4. Leaf i refreshes at count 0 and at the
    counts c >= T with (c - o_i) % T == 0; each projector spans the top singular vectors of
    the gradient of its last refresh, and the updates are GaLore's with that projector."""
    T, steps, r = 6, 18, 2
    shapes = {"a": (12, 5), "b": (5, 12), "c": (9, 7)}        # flax (in, out)
    rng = np.random.default_rng(3)
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
             for _ in range(steps)]
    tx = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=r, update_every=T,
                             stagger=True, scale=1.0)
    outs, states = _run(tx, {k: jnp.zeros(s) for k, s in shapes.items()}, grads)
    offsets = {"a": 0, "b": 2, "c": 4}
    for k, off in offsets.items():
        want = [c == 0 or (c >= T and (c - off) % T == 0) for c in range(steps)]
        got = [bool(lj.refreshed_leaves(st)[k]) for st in states]
        assert got == want, (k, got)
        m = v = 0.0
        last = None
        for c in range(steps):
            g = np.asarray(grads[c][k], np.float64)
            q = np.asarray(lj.projector_bases(states[c])[k][0], np.float64)
            if want[c]:
                last = g
            # kernel (in, out): reduce the smaller torch dim; its singular vectors
            axis = reduced_axes(shapes[k], "std", "flax")[0]
            mat = last if axis == 1 else last.T
            _, _, vh = np.linalg.svd(mat, full_matrices=False)
            assert float(lj.subspace_overlap(q, vh[:r].T)) == pytest.approx(1.0, abs=1e-5)
            low = g @ q if axis == 1 else q.T @ g
            m = 0.9 * m + 0.1 * low
            v = 0.999 * v + 0.001 * low * low
            n = m / (np.sqrt(v) + 1e-6) * np.sqrt(1 - 0.999 ** (c + 1)) / (1 - 0.9 ** (c + 1))
            back = n @ q.T if axis == 1 else q @ n
            got_u = np.asarray(outs[c][k], np.float64)
            assert np.linalg.norm(got_u - back) / np.linalg.norm(back) < 1e-5, (k, c)


def test_reader_works_through_every_optax_wrapper():
    params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(0), p.shape), params)
    base = lambda: lj.galore_adamw(1e-2, rank=2, update_proj_gap=3)
    wrapped = {
        "plain": base(),
        "chain": optax.chain(optax.clip_by_global_norm(1.0), base()),
        "multisteps": optax.MultiSteps(base(), every_k_schedule=1),
        "inject": optax.inject_hyperparams(lj.galore_adamw, static_args=("rank",
                                           "update_proj_gap"))(1e-2, rank=2, update_proj_gap=3),
        "apply_if_finite": optax.apply_if_finite(base(), 3),
    }
    for name, tx in wrapped.items():
        state = tx.init(params)
        assert float(lj.projector_overlaps(state)["attn/q"]) == -1.0, name
        _, state = tx.update(grads, state, params)
        bases = lj.projector_bases(state)
        assert list(bases) == ["attn/q"] and bases["attn/q"][0].shape == (8, 2), name
        assert bool(lj.refreshed_leaves(state)["attn/q"]), name
        _, state = tx.update(grads, state, params)
        assert not bool(lj.refreshed_leaves(state)["attn/q"]), name


def test_dimension_numbers_project_an_nd_leaf_as_its_matrix():
    """A (8, 2, 4) kernel with reduction axis 0 and output axes (1, 2) is the (8, 8) matrix."""
    g3 = jax.random.normal(jax.random.key(0), (8, 2, 4))
    tx3 = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3,
                              dimension_numbers=lj.DimensionNumbers(0, (1, 2)))
    tx2 = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3)
    u3, s3 = tx3.update({"w": g3}, tx3.init({"w": g3}))
    u2, _ = tx2.update({"w": g3.reshape(8, 8)}, tx2.init({"w": g3.reshape(8, 8)}))
    assert u3["w"].shape == (8, 2, 4)
    np.testing.assert_allclose(u3["w"].reshape(8, 8), u2["w"], rtol=1e-5, atol=1e-7)
    assert lj.projector_bases(s3)["w"][0].shape == (8, 3)
    # axes out of order: the matrix is formed by transposing first
    gt = jnp.transpose(g3, (1, 0, 2))                             # (2, 8, 4): reduction axis 1
    txt = lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=3,
                              dimension_numbers=lj.DimensionNumbers(1, (0, 2)))
    ut, _ = txt.update({"w": gt}, txt.init({"w": gt}))
    np.testing.assert_allclose(jnp.transpose(ut["w"], (1, 0, 2)), u3["w"], rtol=1e-5, atol=1e-7)


def test_mu_dtype_and_projector_dtype():
    params = {"attn": {"q": jnp.ones((16, 8), jnp.bfloat16)}}
    grads = {"attn": {"q": jax.random.normal(jax.random.key(0), (16, 8)).astype(jnp.bfloat16)}}
    tx = lj.galore_adamw(1e-2, rank=2, mu_dtype="bfloat16")
    state = tx.init(params)
    inner = lj.find_lowrank_states(state)[0]
    assert inner.inner_state.mu["attn"]["q"].dtype == jnp.bfloat16
    assert inner.projector["attn"]["q"].dtype == jnp.float32       # default projector_dtype
    tx_ref = lj.galore_adamw(1e-2, rank=2, projector_dtype=None)  # GaLore: the weight's dtype
    assert lj.find_lowrank_states(tx_ref.init(params))[0].projector["attn"]["q"].dtype == \
        jnp.bfloat16
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
    tx16 = lj.galore_adamw(1e-2, rank=2, mu_dtype="bfloat16")
    tx32 = lj.galore_adamw(1e-2, rank=2)
    s16, s32 = tx16.init(params32), tx32.init(params32)
    for _ in range(3):
        u16, s16 = tx16.update(grads32, s16, params32)
        u32, s32 = tx32.update(grads32, s32, params32)
    mu = lj.find_lowrank_states(s16)[0].inner_state.mu["attn"]["q"]
    assert mu.dtype == jnp.bfloat16
    np.testing.assert_allclose(u16["attn"]["q"], u32["attn"]["q"], rtol=2e-2, atol=1e-5)


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
