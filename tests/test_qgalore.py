"""Q-GaLore against the NumPy re-statement of VITA-Group/Q-GaLore (``reference_qgalore.py``).

Tall ``(24, 10)``, square ``(10, 10)`` and wide ``(10, 24)`` projected matrices (torch
shapes) and two plain leaves, 24 steps, ``update_proj_gap=2``, ``queue_size=2``,
``gamma_proj=2``: with gradients whose singular vectors drift slowly, every leaf
refreshes at 0-based steps 0, 2, 4, then (period 4) 8, then (period 8) 16: five SVDs
instead of twelve. The reference adopts the implementation's column signs after each
SVD (the SVD leaves them free; the asymmetric quantiser and the signed cosine depend on
them). Inner Adam: ``inner="adam"``, bitsandbytes' 32-bit formula (what the reference
runs for states under 4096 elements).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_numpy as ref
import reference_qgalore as rq
from methods_support import assert_updates_match, separated_grad
from parity_support import (
    PARITY_RTOL,
    PLAIN,
    PROJECTED,
    SHAPES,
    get,
    max_update_error,
    run_jax,
    to_layout,
)

import lowrank_jax as lj
from lowrank_jax.qgalore import (
    QGaLoreProjector,
    dequantize_groups,
    int8_weight_rounding,
    qgalore_adamw8bit,
    quantize_groups,
    svd_counts,
)
from lowrank_jax.stateful_lowrank import LeafContext

RANK, GAP, STEPS, LR, WD, SCALE, B2 = 4, 2, 24, 0.01, 0.1, 0.25, 0.95
LAZY = {"cos_threshold": 0.4, "gamma_proj": 2, "queue_size": 2}


MIN_ABS_R = 0.01


def make_problem(seed: int):
    """Gradients whose singular vectors drift slowly around a fixed base (well-separated
    singular values). Every entry of the projection on the base's top-r basis (float and
    its 4-bit versions) is >= MIN_ABS_R: Adam's normalisation turns a relative error
    ``delta / |R|`` of a small entry into an O(1) update error (the float32 SVD and the
    quantiser's scales carry ``delta ~ 1e-7 .. 1e-6``)."""
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    base, top = {}, {}
    for p, s in PROJECTED.items():
        u, _, vh = np.linalg.svd(separated_grad(rng, s).astype(np.float64), full_matrices=False)
        base[p] = (u, vh.T)
        side = ref.std_side(s)
        q = (vh.T if side == "right" else u)[:, :RANK]                 # (d, r)
        stored = q.T if side == "right" else q
        top[p] = [q] + [(rq.quantize(stored, 4, grp).T if side == "right" else
                         rq.quantize(stored, 4, grp)) for grp in (8, -1)]
    grads = []
    for _ in range(STEPS):
        g = {}
        for p, s in SHAPES.items():
            if p not in PROJECTED:
                g[p] = rng.standard_normal(s).astype(np.float32)
                continue
            while True:
                x = separated_grad(rng, s, scale=rng.uniform(0.5, 2.0), near=base[p])
                if min(np.abs(ref.project(x.astype(np.float64), q, ref.std_side(s))).min()
                       for q in top[p]) >= MIN_ABS_R:
                    break
            g[p] = x
        grads.append(g)
    return params, grads


def align_signs(basis: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Flip columns of ``basis`` (unit columns) to the signs of ``target`` (possibly
    quantised); asserts they describe the same directions (cosine >= 0.9 in size)."""
    cos = np.sum(basis * target, axis=0) / np.linalg.norm(target, axis=0)
    assert np.all(np.abs(cos) >= 0.9), cos
    return basis * np.where(cos < 0, -1.0, 1.0)


# (bits, group_size, rtol of the largest entry's error); every case's relative Frobenius
# error is < 1e-5 (PARITY_RTOL). Float projectors keep the float32 SVD's rounding (no INT4
# grid absorbs it), which moves the largest entry of a step by up to ~1.1e-5 of it.
CASES = {"int4_groups": (4, 8, 1e-5), "int4_rows": (4, -1, 1e-5), "float": (None, 8, 2e-5)}


@pytest.fixture(scope="module", params=[("flax", "int4_groups"), ("torch", "int4_groups"),
                                        ("flax", "int4_rows"), ("torch", "float")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def qgalore_run(request):
    return run_case(*request.param)


def run_case(layout: str, case: str) -> dict:
    """Run the alias on the problem; the trajectory, states and a basis reader."""
    bits, group, rtol = CASES[case]
    params, grads = make_problem(11)
    tx = qgalore_adamw8bit(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, b2=B2,
                           weight_decay=WD, layout=layout, proj_bits=bits,
                           proj_group_size=group, weight_bits=None, inner="adam", **LAZY)
    traj, upds, states = run_jax(tx, params, grads, layout, entry=lambda state: state)
    proj = QGaLoreProjector(GAP, bits, group, **LAZY)
    in_axis = 1 if layout == "torch" else 0

    def basis(path, t):
        m, n = SHAPES[path]
        shape = (n, m) if layout == "flax" else (m, n)
        reduced = 0 if (layout == "flax") == (m >= n) else 1      # std side, as array axis
        d = shape[reduced]
        side = LeafContext(reduced == in_axis, rank=min(RANK, m, n))
        return np.asarray(proj.basis(states[t][path], d, jnp.float32, side), np.float64)

    return {"layout": layout, "bits": bits, "group": group, "rtol": rtol, "params": params,
            "grads": grads,
            "traj": traj, "upds": upds, "states": states, "basis": basis}


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PROJECTED))
def test_qgalore_matches_reference(qgalore_run, path):
    c = qgalore_run
    out = rq.qgalore_adamw_reference(
        c["params"][path], [g[path] for g in c["grads"]], rank=RANK, update_proj_gap=GAP,
        scale=SCALE, lr=LR, bits=c["bits"], group_size=c["group"], b2=B2, weight_decay=WD,
        align=lambda t, q: align_signs(q, c["basis"](path, t - 1)), **LAZY)
    name = f"{c['layout']} {c['bits']}/{c['group']} {path}"
    worst = assert_updates_match(name, c["params"][path], out["params"],
                                 [x[path] for x in c["traj"]], [x[path] for x in c["upds"]],
                                 STEPS, rtol=c["rtol"])
    assert worst < c["rtol"]
    ours = [np.asarray(x[path], np.float64) for x in c["upds"]]
    assert max_update_error(ours, out["params"], c["params"][path]) < PARITY_RTOL, name
    for t in range(STEPS):                     # the dequantised projector itself
        np.testing.assert_allclose(c["basis"](path, t), out["projectors"][t], atol=1e-5,
                                   err_msg=f"{name}: projector after step {t + 1}")
    gaps = [int(c["states"][t][path].gap) for t in range(STEPS)]
    assert gaps == out["gaps"], (gaps, out["gaps"])
    assert out["gaps"][-1] > GAP                                 # the lazy rule fired
    assert int(c["states"][-1][path].svds) == out["svds"]


@pytest.mark.slow
def test_qgalore_plain_leaves_follow_bitsandbytes_adamw(qgalore_run):
    c = qgalore_run
    for path in PLAIN:
        out = rq.bnb_adamw_reference(c["params"][path], [g[path] for g in c["grads"]], lr=LR,
                                     b2=B2, weight_decay=WD)
        assert_updates_match(path, c["params"][path], out["params"],
                             [x[path] for x in c["traj"]], [x[path] for x in c["upds"]], STEPS)


def _svds_after(grads, params, **lazy):
    tx = qgalore_adamw8bit(LR, rank=RANK, update_proj_gap=GAP, proj_group_size=8,
                           weight_bits=None, inner="adam", **lazy)
    p = to_layout(params, "flax")
    state = tx.init(p)
    step = jax.jit(tx.update)
    for g in grads:
        _, state = step(to_layout(g, "flax"), state, p)
    return svd_counts(state)


@pytest.mark.slow
def test_lazy_schedule_with_sign_free_cosine():
    """With ``abs_cosine`` the rule ignores the SVD's sign choice: on slowly drifting
    gradients every leaf refreshes at steps 0, 2, 4, 8, 16 (5 SVDs); with a threshold
    above 1 it never stretches the period (12 SVDs in 24 steps)."""
    params, grads = make_problem(12)
    lazy = {"gamma_proj": 2, "queue_size": 2}
    assert _svds_after(grads, params, cos_threshold=0.4, abs_cosine=True, **lazy) == {
        "attn/q": 5, "attn/k": 5, "mlp/up": 5}
    assert _svds_after(grads, params, cos_threshold=1.5, **lazy) == {
        "attn/q": 12, "attn/k": 12, "mlp/up": 12}


def test_quantize_groups_matches_reference_quantizer():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 8))
    for bits, group in ((4, 16), (4, -1), (8, 8), (2, 4)):
        codes, scales, zeros = quantize_groups(jnp.asarray(w, jnp.float32), bits, group)
        got = np.asarray(scales * (codes.astype(jnp.float32) - zeros)).reshape(w.shape)
        np.testing.assert_allclose(got, rq.quantize(w, bits, group), atol=1e-6)
        assert codes.dtype == jnp.uint8 and int(codes.max()) <= 2 ** bits - 1


def test_int8_weight_rounding_deterministic_matches_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)      # flax (in=16, out=8)
    u = 0.01 * rng.standard_normal((16, 8)).astype(np.float32)
    tx = int8_weight_rounding(group_size=32, stochastic=False)
    out, _ = tx.update({"k": jnp.asarray(u)}, tx.init({"k": jnp.asarray(w)}), {"k": jnp.asarray(w)})
    new = np.asarray(w + out["k"], np.float64)
    want = rq.quantize((w + u).astype(np.float64).T, 8, 32).T       # groups of the torch rows
    np.testing.assert_allclose(new, want, atol=1e-6)


def test_int8_stochastic_rounding_is_unbiased_and_on_the_grid():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    tx = int8_weight_rounding(group_size=32, stochastic=True, layout="torch")
    step = jax.jit(tx.update)
    state = tx.init({"k": jnp.asarray(w)})
    # an update below float32's resolution at |w| ~ 1 (W + u == W) that is not zero, so
    # the weight is re-quantised; an exactly zero update leaves it alone
    tiny = {"k": jnp.full_like(jnp.asarray(w), 1e-12)}
    zero = {"k": jnp.zeros_like(jnp.asarray(w))}
    out, _ = step(zero, state, {"k": jnp.asarray(w)})
    np.testing.assert_array_equal(np.asarray(out["k"]), 0.0)
    draws = []
    for _ in range(400):
        out, state = step(tiny, state, {"k": jnp.asarray(w)})
        draws.append(np.asarray(w + out["k"], np.float64))
    draws = np.stack(draws)
    step_size = (w.max() - w.min()) / 255
    lower = np.floor(w / step_size) * step_size
    assert np.all((np.abs(draws - lower) < 1e-4 * step_size + 1e-6)
                  | (np.abs(draws - lower - step_size) < 1e-4 * step_size + 1e-6))
    # unbiased away from the group's extremes (the reference clamps codes to [0, 255],
    # which can only round the maximum down and the minimum up)
    inner = (w > w.min()) & (w < w.max())
    np.testing.assert_allclose(draws.mean(0)[inner], w[inner], atol=0.15 * step_size)
    assert np.mean(np.ptp(draws, axis=0) > 0) > 0.9          # most entries really vary


def test_qgalore_state_bytes():
    """Codes one byte per entry, scales and zeros per group, the schedule and the top vector."""
    proj = QGaLoreProjector(200, 4, 256)
    d, r = 512, 128
    want = d * r + 2 * 4 * (d * r // 256) + 4 + 4 * 5 + 4 + 4 * d + 4
    assert proj.nbytes(d, r, jnp.float32) == want
    params = {"attn": {"q": jax.ShapeDtypeStruct((512, 512), jnp.float32)}}
    state = jax.eval_shape(qgalore_adamw8bit(1e-3, labels={"attn": {"q": True}}).init, params)
    low = lj.find_lowrank_states(state)[0]
    assert lj.state_nbytes(get(low.projector, ("attn", "q"))) == want


def test_indivisible_groups_quantise_their_real_entries():
    """21 entries in groups of 8: the first two groups as the reference's quantiser, the
    last (5 real entries, padded) as the reference's quantiser on those 5 alone."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 7))
    codes, scales, zeros = quantize_groups(jnp.asarray(w, jnp.float32), 4, 8)
    assert codes.shape == (3, 8)
    got = np.asarray(dequantize_groups(codes, scales, zeros, (3, 7)), np.float64).reshape(-1)
    flat = w.reshape(-1)
    np.testing.assert_allclose(got[:16], rq.quantize(flat[:16].reshape(2, 8), 4, 8).reshape(-1),
                               atol=1e-6)
    np.testing.assert_allclose(got[16:], rq.quantize(flat[16:].reshape(1, 5), 4, 5).reshape(-1),
                               atol=1e-6)


def test_qgalore_on_indivisible_shapes_and_bad_inner():
    """A (10, 7) matrix at rank 3 (21 projector entries, groups of 8) runs, and its basis
    is the dequantised projector (close to orthonormal)."""
    tx = qgalore_adamw8bit(1e-3, rank=3, proj_group_size=8, weight_group_size=8)
    params = {"attn": {"q": jnp.asarray(np.random.default_rng(5).standard_normal((10, 7)),
                                        jnp.float32)}}
    _, state = tx.update(params, tx.init(params), params)
    (basis,) = lj.projector_bases(state)["attn/q"]
    assert basis.shape == (7, 3)
    np.testing.assert_allclose(np.asarray(basis.T @ basis), np.eye(3), atol=0.2)
    with pytest.raises(ValueError, match="inner"):
        qgalore_adamw8bit(1e-3, inner="sgd")
