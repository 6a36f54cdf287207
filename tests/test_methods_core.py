"""COAP, Q-GaLore, Grass and GUM through the core's public readers and policies.

For each alias, on a small tree (two tall kernels, one wide, a 1-D leaf): the readers
``projector_bases`` / ``projector_overlaps`` / ``refreshed_leaves`` name every projected
matrix, return the basis the method really projects with (the update of a matrix
projected by back-projection lies in the span of that basis, checked against a NumPy
least-squares fit), follow the method's own refresh schedule, work through optax
wrappers, and a non-finite gradient at a refresh returns, keeps the projector and is
not counted as a refresh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax.gum import GUMState

# each alias compiles once per module (about 10 s each on two cores): CI's slow run
pytestmark = pytest.mark.slow

SHAPES = {"attn/q": (12, 6), "attn/k": (12, 6), "mlp/up": (6, 10)}     # flax (in, out)
NAMES = list(SHAPES)
R, T, STEPS = 2, 2, 7
ALIASES = {
    "coap_adamw": {"rank": R, "update_proj_gap": T, "reproject_factor": 2},
    # INT8 weight rounding off: its re-quantisation moves weights off the subspace
    "qgalore_adamw8bit": {"rank": R, "update_proj_gap": T, "queue_size": 2,
                          "cos_threshold": -2.0, "weight_bits": None},
    "grass_adamw": {"rank": R, "update_proj_gap": T},
    "gum_muon": {"rank": R, "update_proj_gap": T, "num_full": 1},
}


def _params():
    rng = np.random.default_rng(0)
    tree = {"attn": {"q": None, "k": None}, "mlp": {"up": None}, "norm": jnp.ones(6)}
    for name, shape in SHAPES.items():
        a, b = name.split("/")
        tree[a][b] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return tree


def _get(tree, name):
    a, b = name.split("/")
    return tree[a][b]


def _grads(k):
    leaves, treedef = jax.tree.flatten(_params())
    keys = jax.random.split(jax.random.key(100 + k), len(leaves))
    return treedef.unflatten([jax.random.normal(kk, x.shape) for kk, x in zip(keys, leaves)])


@pytest.fixture(scope="module", params=sorted(ALIASES))
def run(request):
    name = request.param
    tx = lj.OPTIMIZERS[name](1e-2, **ALIASES[name])
    params = _params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads, updates, states = [], [], []
    for k in range(STEPS):
        g = _grads(k)
        u, state = step(g, state, params)
        grads.append(g)
        updates.append(u)
        states.append(state)
    return name, tx, step, grads, updates, states


def _in_span(u: np.ndarray, basis: np.ndarray, axis: int) -> float:
    """Relative residual of ``u`` outside the span of ``basis`` along ``axis``."""
    m = u if axis == 1 else u.T                                 # rows live in R^d
    coef, *_ = np.linalg.lstsq(basis, m.T, rcond=None)
    return float(np.linalg.norm(m.T - basis @ coef) / np.linalg.norm(m))


def _reduced_axis(name: str, method: str) -> int:
    a, b = SHAPES[name]                                          # flax (in, out)
    if method == "grass_adamw":
        return 1                                                 # "left": torch rows = out
    return 0 if a < b else 1                                     # std: the smaller side


def test_bases_are_what_the_method_projects_with(run):
    method, _, _, _, updates, states = run
    bases = lj.projector_bases(states[-1])
    assert sorted(bases) == sorted(NAMES)
    full = [s for s in jax.tree.leaves(states[-1], is_leaf=lambda x: isinstance(x, GUMState))
            if isinstance(s, GUMState)]
    for name in NAMES:
        (b,) = bases[name]
        axis = _reduced_axis(name, method)
        assert b.shape == (SHAPES[name][axis], R) and b.dtype == jnp.float32
        resid = _in_span(np.asarray(_get(updates[-1], name), np.float64),
                         np.asarray(b, np.float64), axis)
        if full and bool(_get(full[0].full, name)):
            assert resid > 1e-2, (method, name)                  # GUM's full-rank branch
        else:
            assert resid < 1e-4, (method, name, resid)


def test_bases_follow_the_methods_definition(run):
    """Grass: the ``r`` rows of largest norm, one-hot; GUM and Q-GaLore: the top-``r``
    singular subspace of the refresh's gradient (Q-GaLore's dequantised, so close to but
    not exactly orthonormal); COAP after its first range-finder pass: a basis of ``r``
    orthonormal columns inside the gradient's row space."""
    method, _, _, grads, _, states = run
    g0, b0 = grads[0], lj.projector_bases(states[0])
    for name in NAMES:
        axis = _reduced_axis(name, method)
        g = np.asarray(_get(g0, name), np.float64)
        x = g if axis == 1 else g.T                              # (k, d)
        b = np.asarray(b0[name][0], np.float64)
        if method == "grass_adamw":
            top = np.sort(np.argsort(-np.sum(x * x, axis=0))[:R])
            want = np.zeros_like(b)
            want[top, np.arange(R)] = 1.0
            np.testing.assert_array_equal(b, want)
            continue
        _, _, vh = np.linalg.svd(x, full_matrices=False)
        if method == "coap_adamw":
            np.testing.assert_allclose(b.T @ b, np.eye(R), atol=1e-5)
            assert _in_span(b.T, vh.T, 1) < 1e-5
            continue
        overlap = float(lj.subspace_overlap(jnp.asarray(b), jnp.asarray(vh[:R].T)))
        if method == "qgalore_adamw8bit":                      # INT4 codes, dequantised
            assert overlap > 0.9, (name, overlap)
            assert not np.allclose(b.T @ b, np.eye(R), atol=1e-4)
        else:
            assert overlap == pytest.approx(1.0, abs=1e-5)


def test_refresh_flags_and_overlaps_follow_the_schedule(run):
    method, _, _, _, _, states = run
    flags = [{k: bool(v) for k, v in lj.refreshed_leaves(s).items()} for s in states]
    # every step that is a multiple of T; Q-GaLore's lazy rule (queue of 2, threshold
    # below any cosine) doubles each period after its third SVD: steps 0, 2, 4, then 8
    lazy = method == "qgalore_adamw8bit"
    want = [c % T == 0 and not (lazy and c > 2 * T) for c in range(STEPS)]
    for name in NAMES:
        assert [f[name] for f in flags] == want, (method, name)
    ov0 = lj.projector_overlaps(states[0])
    assert all(float(v) == -1.0 for v in ov0.values())
    # COAP's gradient step (not re-orthonormalised) and Q-GaLore's INT4 codes leave their
    # bases only nearly orthonormal, so the overlap may pass 1 by a little
    last = lj.projector_overlaps(states[-1])
    assert all(0.0 <= float(v) <= 1.01 for v in last.values()), last


def test_readers_through_optax_wrappers(run):
    """MultiSteps(apply_if_finite(chain(clip, alias))): the readers still find the state."""
    method, tx, _, grads, _, _ = run
    wrapped = optax.MultiSteps(
        optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), tx), 3),
        every_k_schedule=1)
    params = _params()
    _, state = jax.jit(wrapped.update)(grads[0], wrapped.init(params), params)
    assert sorted(lj.projector_bases(state)) == sorted(NAMES), method
    assert all(bool(v) for v in lj.refreshed_leaves(state).values()), method


@pytest.mark.timeout(240, method="thread")
def test_inf_at_a_refresh_returns_and_keeps_the_projector(run):
    method, _, step, grads, _, states = run
    params = _params()
    s_before = states[1]                                          # next step (2) refreshes
    bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.inf) if g.ndim == 2 else g, grads[2])
    _, s_after = step(bad, s_before, params)
    before, after = lj.projector_bases(s_before), lj.projector_bases(s_after)
    for name in NAMES:
        np.testing.assert_array_equal(np.asarray(after[name][0]), np.asarray(before[name][0]))
        assert not bool(lj.refreshed_leaves(s_after)[name]), (method, name)
        assert np.all(np.isfinite(np.asarray(after[name][0])))


def test_analysis_reads_the_bases_through_the_public_reader(run):
    """``lowrank-analyze``'s checkpoint overlaps (``analysis.units.consecutive``) see the
    same bases as :func:`lowrank_jax.projector_bases`, and its overlap rows are
    ``||A^T B||_F^2 / r`` between the first and the last state's bases."""
    from types import SimpleNamespace

    from analysis.units.consecutive import _bases, _overlap_rows

    method, _, _, _, _, states = run
    first, last = _bases(states[0]), _bases(states[-1])
    public = lj.projector_bases(states[-1])
    assert sorted(last) == sorted(NAMES), method
    for name in NAMES:
        np.testing.assert_array_equal(last[name], np.asarray(public[name][0]))
    rows = _overlap_rows(SimpleNamespace(name="run", method=method), STEPS,
                         "proj_overlap_prev", first, last)
    got = {r["layer"]: r["value"] for r in rows}
    assert sorted(got) == sorted([*NAMES, "mean"]), method
    for name in NAMES:
        a, b = first[name].astype(np.float64), last[name].astype(np.float64)
        assert got[name] == pytest.approx(np.sum((a.T @ b) ** 2) / R, rel=1e-4), (method, name)
