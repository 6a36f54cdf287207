"""FRUGAL: parity with NumPy re-statements of fzmushko/FRUGAL (commit c7ebe4c2), both modes.

Projection mode (``frugal_projection``), written from ``frugal/proj_optimizer_templates.py``
and ``frugal/adamw.py``:

* l.90-98 ``_update_states_if_necessary``: refresh when the 0-based step ``% update_gap``
  is 0; l.189-202 ``GaloreOptimizer._update_states``: new projector from this step's
  gradient, Adam state reset (``adamw.py`` l.69-83: step 0, zero moments);
* l.135: every parameter ``p *= 1 - lr * wd`` first; l.137 ``step += 1``;
* l.205-219 ``_proj_params_update``: ``R = project_down(G)``, Adam
  (``adamw.py`` l.86-106: ``-lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``) projected up,
  plus ``-lr * sign(G - project_up(R))`` (``"sgd"``: without ``sign``; ``"no"``: nothing);
* ``galore_projector.py`` l.5-17: the rank is ``round(density * d)`` of the reduced side
  (``std``: ``in`` when ``out >= in``), l.55-75 the top singular vectors;
  ``coordinate_projector.py`` l.8-30: ``"columns"`` keeps ``int(density * in)`` random
  columns of the torch ``(out, in)`` weight, whatever its shape.

With the Adam state reset at every refresh each period is invariant to the SVD's signs,
so the implementation runs its own (float32) SVD against the reference's float64 one.
The random columns cannot be matched across frameworks: the reference is given the
indices the implementation drew. 22 steps, refresh every 8 (steps 1, 9, 17); torch shapes
tall ``(24, 12)``, square ``(14, 14)``, wide ``(10, 22)``, density 0.3 (``round`` and
``int`` differ on 12 * 0.3 = 3.6); a 1-D and a 2-D leaf outside the projected set
(torch AdamW, decay first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from parity_support import max_update_error, ref, report_error, to_layout, updates_of_each_step

import lowrank_jax as lj
import lowrank_jax.block_subspace
from lowrank_jax.alias import frugal, frugal_projection

PROJECTED = {("attn", "q"): (24, 12), ("attn", "k"): (14, 14), ("mlp", "up"): (10, 22)}
SHAPES = {**PROJECTED, ("norm",): (12,), ("embed",): (7, 5)}
T, STEPS, LR, WD, DENSITY = 8, 22, 0.01, 0.1, 0.3
RTOL = 1e-5


def frugal_projection_reference(w0, grads, *, state_free, rank=None, density=None,
                                 columns=None, lr=LR, wd=WD, b1=0.9, b2=0.999, eps=1e-8):
    """float64 FRUGAL (GaloreOptimizer / CoordOptimizer) on one torch-layout matrix.

    ``columns(t)``: the column indices chosen at refresh step ``t`` (CoordOptimizer);
    otherwise the SVD projector of ``galore_projector.py`` with ``proj_side='std'``.
    """
    w = np.asarray(w0, np.float64).copy()
    m_, n_ = w.shape
    right = columns is not None or m_ >= n_
    d = n_ if right else m_
    if columns is None:
        r = rank if rank is not None else round(d * density)
    traj = []
    for t, g in enumerate(grads, 1):
        g = np.asarray(g, np.float64)
        if (t - 1) % T == 0:
            if columns is not None:
                q = np.eye(n_)[:, np.asarray(columns(t))]
            else:
                # the reference's SVD runs in float32 (galore_projector.py l.57-66)
                u, _, vh = np.linalg.svd(g.astype(np.float32), full_matrices=False)
                u, vh = u.astype(np.float64), vh.astype(np.float64)
                q = vh[:r].T if right else u[:, :r]
            mom = vel = 0.0
            step = 0
        w = w * (1 - lr * wd)
        step += 1
        low = g @ q if right else q.T @ g
        mom = b1 * mom + (1 - b1) * low
        vel = b2 * vel + (1 - b2) * low * low
        adam = -lr / (1 - b1 ** step) * mom / (np.sqrt(vel) / np.sqrt(1 - b2 ** step) + eps)
        up = (lambda x, q=q: x @ q.T) if right else (lambda x, q=q: q @ x)
        update = up(adam)
        free = g - up(low)
        if state_free == "signsgd":
            update = update - lr * np.sign(free)
        elif state_free == "sgd":
            update = update - lr * free
        w = w + update
        traj.append(w.copy())
    return traj


def _problem(seed):
    """Projected gradients with separated singular values; at refresh steps redrawn until
    every entry of R is >= 2e-3 (Adam's first step after a reset amplifies the float32 SVD's
    ~1e-6 basis error in entries of R near 0; see ``test_parity_galore``)."""
    rng = np.random.default_rng(seed)
    w0 = {p: rng.standard_normal(s) * 0.1 for p, s in SHAPES.items()}
    grads = []
    for t in range(1, STEPS + 1):
        g = {}
        for p, s in SHAPES.items():
            if p not in PROJECTED:
                g[p] = rng.standard_normal(s)
                continue
            rank = round(DENSITY * min(s))
            while True:
                x = ref.well_conditioned_grad(rng, s, scale=rng.uniform(0.5, 2.0))
                if (t - 1) % T or ref.min_abs_projection(x, rank) >= 2e-3:
                    break
            g[p] = x.astype(np.float64)
        grads.append(g)
    return w0, grads


def _check_plain(w0, grads, upds) -> dict:
    errors = {}
    for path in SHAPES:
        if path in PROJECTED:
            continue
        r = ref.torch_adamw_reference(w0[path], [g[path] for g in grads], lr=LR, eps=1e-8,
                                      weight_decay=WD)["params"]
        errors[path] = max_update_error([u[path] for u in upds], r, w0[path])
        assert errors[path] < RTOL, path
    return errors


@pytest.mark.parametrize("layout", ["torch", "flax"])
@pytest.mark.parametrize("state_free", ["signsgd", "sgd", "none"])
def test_frugal_projection_svd_density_parity(layout, state_free):
    w0, grads = _problem(11)
    tx = frugal_projection(LR, density=DENSITY, update_proj_gap=T, state_free=state_free,
                           weight_decay=WD, layout=layout)
    upds = updates_of_each_step(tx, w0, grads, layout)
    errors = {}
    for path in PROJECTED:
        r = frugal_projection_reference(w0[path], [g[path] for g in grads],
                                        state_free=state_free, density=DENSITY)
        errors[path] = max_update_error([u[path] for u in upds], r, w0[path])
        assert errors[path] < RTOL, (path, layout, state_free, errors[path])
    report_error("frugal_projection", {**errors, **_check_plain(w0, grads, upds)}, RTOL)


def test_frugal_density_rank_is_rounded_per_leaf_and_not_capped():
    params = {"attn": {"q": jnp.zeros((12, 24)), "k": jnp.zeros((14, 14))},   # flax (in, out)
              "mlp": {"up": jnp.zeros((22, 10)), "big": jnp.zeros((1024, 1024))}}
    state = frugal_projection(1e-2, density=DENSITY, projector="random").init(params)
    bases = lj.projector_bases(state)
    # round(0.3 * 12) = 4 (int would give 3), round(0.3 * 14) = 4, round(0.3 * 10) = 3
    assert {k: b[0].shape for k, b in bases.items()} == {
        "attn/q": (12, 4), "attn/k": (14, 4), "mlp/up": (10, 3), "mlp/big": (1024, 307)}
    state = frugal_projection(1e-2, density=0.25).init(params)   # no rank cap at 128
    assert lj.projector_bases(state)["mlp/big"][0].shape == (1024, 256)


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_frugal_columns_keep_columns_of_the_torch_weight(layout):
    """``columns``: int(density * in) columns of the (out, in) weight, for tall and wide
    weights alike; values as the reference given the same indices."""
    w0, grads = _problem(12)
    tx = frugal_projection(LR, density=DENSITY, update_proj_gap=T, projector="columns",
                           weight_decay=WD, layout=layout)
    params = to_layout(w0, layout)
    state = tx.init(params)
    step = jax.jit(tx.update)
    chosen = {p: {} for p in PROJECTED}
    upds = []
    for t, g in enumerate(grads, 1):
        u, state = step(to_layout(g, layout), state, params)
        params = optax.apply_updates(params, u)
        inner = lj.state_reader.find_states(state)[0]
        for p in PROJECTED:
            node = inner.projector
            for k in p:
                node = node[k]
            chosen[p][t] = np.asarray(node.indices)
        flat = {}
        for p in SHAPES:
            x = np.asarray(u[p[0]][p[1]] if len(p) == 2 else u[p[0]], np.float64)
            flat[p] = x.T if (layout == "flax" and x.ndim == 2) else x
        upds.append(flat)
    errors = {}
    for p, (out, inp) in PROJECTED.items():
        assert chosen[p][1].shape == (int(DENSITY * inp),), p
        assert chosen[p][1].max() < inp
        r = frugal_projection_reference(w0[p], [g[p] for g in grads], state_free="signsgd",
                                        columns=lambda t, p=p: chosen[p][t])
        errors[p] = max_update_error([x[p] for x in upds], r, w0[p])
        assert errors[p] < RTOL, (p, layout, errors[p])
    report_error("frugal_projection (columns)", errors, RTOL)
    assert not np.array_equal(chosen[("attn", "q")][1], chosen[("attn", "q")][9])


def test_frugal_projection_resets_the_adam_count():
    params = {"attn": {"q": jnp.ones((64, 32))}}
    tx = frugal_projection(1e-2, rank=4, update_proj_gap=2, projector="random")
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    step = jax.jit(tx.update)
    counts = []
    for _ in range(4):
        _, state = step(grads, state, params)
        inner = lj.find_lowrank_states(state)[0].inner_state
        counts.append(int(optax.tree_utils.tree_get(inner, "count")))
    assert counts == [1, 2, 1, 2]


def test_frugal_projection_rejects_rank_and_density_together():
    with pytest.raises(ValueError, match="rank or density, not both"):
        frugal_projection(1e-2, rank=4, density=0.25).init({"attn": {"q": jnp.ones((8, 8))}})


# ---------------------------------------------------------------------------
# blockwise mode (the reference's pre-training setting): whole matrices take turns

BLOCK_SHAPES = {("attn", "a0"): (6, 4), ("attn", "a1"): (4, 6), ("attn", "a2"): (3, 5),
                ("attn", "a3"): (4, 4), ("mlp", "m0"): (6, 4), ("mlp", "m1"): (5, 3)}


def frugal_blocks_reference(w0, grads, *, density, gap, order, state_free, lr=LR, b1=0.9,
                            b2=0.999, eps=1e-8):
    """BlockOptimizer as the reference writes it (``proj_optimizer_templates.py`` l.293-390):
    ``round(n * density)`` active blocks (l.327), a moving start index (l.353-368), the
    state of every block dropped at a refresh (l.338-342), Adam on the active ones
    (``adamw.py`` l.86-106), the state-free rule on the others (l.384-390)."""
    n = len(w0)
    k = round(n * density)
    ws = [w.astype(np.float64).copy() for w in w0]
    state = [None] * n
    start = None
    traj = []
    for t, gs in enumerate(grads, 1):
        if (t - 1) % gap == 0:                   # refresh: every state dropped, k re-created
            state = [None] * n
            if order == "descending":
                start = n - 1 if start is None else start
                chosen = [idx % n for idx in range(start, start - k, -1)]
                start -= k
                if start < 0:
                    start += n
            else:
                start = 0 if start is None else start
                chosen = [idx % n for idx in range(start, start + k)]
                start += k
                if start >= n:
                    start -= n
            for idx in chosen:
                state[idx] = {"m": 0.0, "v": 0.0, "step": 0}
        for i, g in enumerate(gs):
            s = state[i]
            if s is None:
                upd = {"signsgd": np.sign(g), "sgd": g, "none": 0.0 * g}[state_free]
                ws[i] = ws[i] - lr * upd
                continue
            s["step"] += 1
            s["m"] = b1 * s["m"] + (1 - b1) * g
            s["v"] = b2 * s["v"] + (1 - b2) * g * g
            denom = np.sqrt(s["v"]) / np.sqrt(1 - b2 ** s["step"]) + eps
            ws[i] = ws[i] - lr / (1 - b1 ** s["step"]) * s["m"] / denom
        traj.append([w.copy() for w in ws])
    return traj


@pytest.mark.parametrize("order,state_free", [("descending", "signsgd"),
                                              ("ascending", "sgd"), ("descending", "none")])
def test_frugal_blocks_parity(order, state_free):
    """Six matrices (tall, wide, square), k = round(6 * 0.4) = 2 active, T = 3, 24 steps:
    eight refreshes with wrap-around; a 1-D leaf outside the blocks gets torch Adam."""
    rng = np.random.default_rng(5)
    keys = list(BLOCK_SHAPES)
    w0 = [rng.standard_normal(BLOCK_SHAPES[k]) * 0.1 for k in keys]
    grads = [[rng.standard_normal(BLOCK_SHAPES[k]) for k in keys] for _ in range(24)]
    norm0 = rng.standard_normal(4)
    norm_grads = [rng.standard_normal(4) for _ in range(24)]

    def tree(mats, norm):
        out: dict = {"norm": jnp.asarray(norm, jnp.float32)}
        for (a, b), x in zip(keys, mats):
            out.setdefault(a, {})[b] = jnp.asarray(x, jnp.float32)
        return out

    tx = frugal(LR, density=0.4, update_proj_gap=3, state_free=state_free, block_order=order)
    params = tree(w0, norm0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    upds = []
    for t in range(24):
        updates, state = step(tree(grads[t], norm_grads[t]), state, params)
        params = optax.apply_updates(params, updates)
        upds.append(updates)
    ref_traj = frugal_blocks_reference(w0, grads, density=0.4, gap=3, order=order,
                                       state_free=state_free)
    errors = {}
    for i, (a, b) in enumerate(keys):
        got = [np.asarray(u[a][b], np.float64) for u in upds]
        errors[(a, b)] = max_update_error(got, [r[i] for r in ref_traj], w0[i])
        assert errors[(a, b)] < RTOL, (a, b, errors[(a, b)])
    # the norm is not a block: plain torch Adam at full size every step
    r = ref.torch_adamw_reference(norm0, norm_grads, lr=LR, eps=1e-8)["params"]
    errors["norm"] = max_update_error([np.asarray(u["norm"], np.float64) for u in upds], r,
                                      norm0)
    report_error("frugal", errors, RTOL)


def _reference_peak_state_bytes(numels, density, order, refreshes):
    """Largest Adam state (m and v, float32) the reference holds at any refresh."""
    n, k = len(numels), round(len(numels) * density)
    peak = 0
    for j in range(refreshes):
        if order == "descending":
            chosen = [((n - 1 - j * k) - i) % n for i in range(k)]
        else:
            chosen = [(j * k + i) % n for i in range(k)]
        peak = max(peak, sum(2 * 4 * numels[i] for i in chosen))
    return peak


def test_frugal_blocks_state_holds_only_the_active_blocks():
    """LLaMA-like: 4 layers x 7 matrices, density 0.25 -> 7 active: one layer's moments."""
    d, f = 32, 88
    layer = {"attn": {n: jax.ShapeDtypeStruct((d, d), jnp.float32) for n in "qkvo"},
             "mlp": {"down": jax.ShapeDtypeStruct((f, d), jnp.float32),
                     "gate": jax.ShapeDtypeStruct((d, f), jnp.float32),
                     "up": jax.ShapeDtypeStruct((d, f), jnp.float32)}}
    params = {"layers": [layer] * 4}
    numels = [int(np.prod(x.shape)) for x in jax.tree.leaves(params)]
    for order in ("descending", "ascending"):
        state = jax.eval_shape(lj.block_subspace.scale_by_block_subspace(
            density=0.25, block_order=order).init, params)
        moments = lj.state_nbytes((state.mu, state.nu))
        assert moments == _reference_peak_state_bytes(numels, 0.25, order, 8)
        assert moments == 2 * 4 * (4 * d * d + 3 * d * f)
        adam = lj.state_nbytes(jax.eval_shape(optax.scale_by_adam().init, params))
        assert moments * 4 == adam - 4                       # a quarter of Adam's moments


def test_frugal_blocks_counts_restart_and_window_moves():
    """Adam on the active blocks restarts its step count at each refresh; the window moves."""
    params = {"attn": {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3, 2))}}
    tx = lj.block_subspace.scale_by_block_subspace(density=0.5, update_every=2)
    g = {"attn": {"a": jnp.full((3, 2), 2.0), "b": jnp.full((3, 2), -3.0)}}
    state = tx.init(params)
    outs = []
    for _ in range(4):
        u, state = tx.update(g, state)
        outs.append((float(u["attn"]["a"][0, 0]), float(u["attn"]["b"][0, 0])))
    # refresh 0 activates "b" (last, descending), refresh 1 activates "a"; a constant
    # gradient gives Adam's step +-1 and signSGD the sign: both +-1, so look at the state
    assert np.allclose(outs, [(1.0, -1.0)] * 4, atol=1e-6)
    assert state.mu[0].shape == (1, 6)                        # one slot for the 2 blocks
    np.testing.assert_allclose(np.asarray(state.mu[0][0]), 2.0 * (1 - 0.9 ** 2), rtol=1e-6)


def test_frugal_blocks_rejects_projection_arguments_and_bad_options():
    """The blockwise alias has no rank or projector (they belong to frugal_projection)."""
    with pytest.raises(TypeError, match="projector"):
        frugal(1e-2, projector="random")
    with pytest.raises(ValueError, match="block_order"):
        frugal(1e-2, block_order="sideways")
    with pytest.raises(ValueError, match="state_free"):
        frugal(1e-2, state_free="adam")
