"""The aliases behave as optax transformations: jit, chains, wrappers, shapes, dtypes, errors."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj

PARAMS = {
    "layers": {"attn": {"q": jnp.full((16, 24), 0.1), "o": jnp.full((24, 16), 0.1)},
               "mlp": {"up": jnp.full((16, 16), 0.1)}},
    "norm": jnp.ones(16),
    "embed": jnp.full((32, 16), 0.01),
}
#: aliases of the fast suite (one per kind: plain, SVD projector, residual rule, random
#: projection, stateful projector); the others run in `make test-slow` (CI runs both)
FAST = {"adamw", "galore_adamw", "fira_adamw", "apollo_mini", "qgalore_adamw8bit"}


def _marked(names):
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


ALIASES = _marked(sorted(lj.LOWRANK_OPTIMIZERS))
ALL = _marked(sorted(lj.OPTIMIZERS))
#: arguments that set shapes and schedules (integers, FRUGAL's density): static in inject_hyperparams
INT_ARGS = ("rank", "update_proj_gap", "seed", "block_size", "random_after", "num_heads",
            "density", "reproject_factor", "num_full", "ns_steps", "queue_size", "proj_bits",
            "proj_group_size", "weight_bits", "weight_group_size")
#: relative (Frobenius, per leaf) tolerance of the MultiSteps comparison: GUM's Newton-Schulz iteration (slope
#: 3.4 at zero, five times) amplifies the ~1e-7 rounding of the averaged gradient
MULTISTEPS_RTOL = {"gum_muon": 1e-3}


def _make(name, **candidates):
    """``OPTIMIZERS[name](1e-2, ...)`` with the candidates that alias takes."""
    return lj.OPTIMIZERS[name](1e-2, **lj.alias.accepted_kwargs(name, candidates))


def _grads(seed):
    leaves, treedef = jax.tree.flatten(PARAMS)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _shape_dtype(tree):
    return jax.tree.map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("name", ALIASES)
def test_jit_and_state_shapes_dtypes_unchanged_by_update(name):
    tx = _make(name, rank=4, update_proj_gap=2, weight_decay=0.01)
    state = tx.init(PARAMS)
    before = _shape_dtype(state)
    params = PARAMS
    for step in range(3):
        updates, state = jax.jit(tx.update)(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
    assert jax.tree.structure(state) == jax.tree.structure(tx.init(PARAMS))
    assert _shape_dtype(state) == before
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ALL)
def test_init_accepts_shape_dtype_structs(name):
    tx = _make(name, rank=4)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
    shapes = jax.eval_shape(tx.init, abstract)
    assert _shape_dtype(shapes) == _shape_dtype(tx.init(PARAMS))


def _zero(tree) -> bool:
    return all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ALL)
def test_chain_with_clipping_and_schedule(name):
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10, 1e-3)
    alias = lj.OPTIMIZERS[name]
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     alias(schedule, **lj.alias.accepted_kwargs(name, {"rank": 4})))
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    updates, state = step(_grads(0), state, PARAMS)
    assert _zero(updates), name            # the warmup's first lr is 0: nothing moves
    updates, state = step(_grads(1), state, PARAMS)
    assert float(jnp.abs(updates["layers"]["attn"]["q"]).max()) > 0.0, name


@pytest.mark.parametrize("name", ALL)
def test_inject_hyperparams_with_static_integer_arguments(name):
    """Every alias works inside inject_hyperparams; the injected lr really drives the step."""
    kwargs = lj.alias.accepted_kwargs(name, {"rank": 4, "update_proj_gap": 2})
    static = tuple(a for a in INT_ARGS if a in lj.alias.alias_arguments(name))
    tx = optax.inject_hyperparams(lj.OPTIMIZERS[name], static_args=static)(
        learning_rate=1e-2, **kwargs)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    u1, state = step(_grads(0), state, PARAMS)
    assert not _zero(u1), name
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u2, _ = step(_grads(1), state, PARAMS)
    assert _zero(u2), name


def test_inject_hyperparams_without_static_rank_gives_clear_error():
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(lj.galore_adamw)(learning_rate=1e-2, rank=4).init(PARAMS)


@pytest.mark.parametrize("name", ALL)
def test_multisteps_accumulates_then_applies_the_mean(name):
    make = lambda: _make(name, rank=4)
    tx = optax.MultiSteps(make(), every_k_schedule=2)
    state = tx.init(PARAMS)
    step = jax.jit(tx.update)
    u1, state = step(_grads(0), state, PARAMS)
    assert _zero(u1), name
    u2, state = step(_grads(1), state, PARAMS)
    assert float(jnp.abs(u2["layers"]["mlp"]["up"]).max()) > 0.0, name
    ref = make()
    mean = jax.tree.map(lambda a, b: (a + b) / 2, _grads(0), _grads(1))
    u_ref, _ = jax.jit(ref.update)(mean, ref.init(PARAMS), PARAMS)
    # per leaf ||u - u_ref||_F / ||u_ref||_F: MultiSteps' running mean rounds the averaged
    # gradient differently (~1e-7), which Adam's first step amplifies in its smallest entries
    for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(u_ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert err < MULTISTEPS_RTOL.get(name, 1e-4), (name, err)


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "sara_adamw", "dct_adamw"])
def test_apply_if_finite_leaves_state_untouched_on_nan_gradient(name):
    tx = optax.apply_if_finite(_make(name, rank=4, update_proj_gap=1), 3)
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(_grads(0), state, PARAMS)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(1))
    updates, new_state = jax.jit(tx.update)(bad, state, PARAMS)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    for a, b in zip(jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(new_state)
               if jnp.issubdtype(x.dtype, jnp.inexact))


@pytest.mark.parametrize("name", ALL)
def test_bf16_params_keep_bf16(name):
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    tx = _make(name, rank=4)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads(0))
    updates, state = jax.jit(tx.update)(grads, state, params)
    assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(optax.apply_updates(params, updates)))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("rank", [0, -3, 2.5])
def test_bad_rank_is_named(rank):
    with pytest.raises(ValueError, match="rank must be an int >= 1"):
        lj.galore_adamw(1e-2, rank=rank)


def test_rank_larger_than_matrix_is_clamped_with_a_warning():
    """One warning names every clamped leaf; nothing else leaks."""
    tx = lj.galore_adamw(1e-2, rank=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = tx.init(PARAMS)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "rank=100 exceeds min(shape) of 3 leaves" in message
    assert "'layers/attn/q' (16, 24)" in message and "'layers/mlp/up' (16, 16)" in message
    mu = lj.find_lowrank_states(state)[0].inner_state.mu
    assert mu["layers"]["attn"]["q"].shape == (16, 24)


@pytest.mark.parametrize("kwarg,value", [("projector", "qr"), ("proj_type", "diag"),
                                         ("moments", "forget"), ("layout", "jax")])
def test_unknown_choices_are_named(kwarg, value):
    with pytest.raises(ValueError, match=kwarg):
        lj.galore_adamw(1e-2, rank=4, **{kwarg: value})


def test_non_matrix_leaf_selected_for_projection_is_named():
    labels = jax.tree.map(lambda _: True, PARAMS)
    tx = lj.galore_adamw(1e-2, rank=4, labels=labels)
    with pytest.raises(ValueError, match="leaf 'norm' has shape \\(16,\\); only 2-D.*dimension_numbers"):
        tx.init(PARAMS)


def test_inner_that_needs_params_is_rejected():
    inner = optax.chain(optax.add_decayed_weights(0.1), lj.scale_by_reference_adam())
    tx = lj.scale_by_lowrank(inner, rank=2)
    with pytest.raises(ValueError, match="cannot run without params"):
        tx.init({"w": jnp.zeros((8, 4))})


def test_default_selection_matches_galore_rule():
    labels = lj.default_lowrank_labels(PARAMS)
    assert labels["layers"]["attn"]["q"] == "lowrank"
    assert labels["layers"]["mlp"]["up"] == "lowrank"
    assert labels["embed"] == "dense" and labels["norm"] == "dense"


def test_no_warnings_for_valid_setup():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lj.galore_adamw(1e-2, rank=4).init(PARAMS)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALIASES)
def test_state_reader_for_every_alias(name):
    """``projector_bases`` / ``refreshed_leaves`` / ``projector_overlaps`` read every
    low-rank alias's state (here inside a chain with clipping): one entry per projected
    matrix, named by its path, each basis ``(d, r)`` float32 with ``d`` a side of that
    matrix; every projector is computed at the first update; no overlap before a
    second refresh."""
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     _make(name, rank=4, update_proj_gap=3))
    state = tx.init(PARAMS)
    _, state = jax.jit(tx.update)(_grads(0), state, PARAMS)
    bases = lj.projector_bases(state)
    flat = {lj.tree_util.path_string(p): x for p, x in jax.tree_util.tree_leaves_with_path(PARAMS)}
    assert bases and set(bases) <= set(flat), (name, list(bases))
    for key, found in bases.items():
        for b in found:
            assert b.dtype == jnp.float32 and b.ndim == 2 and b.shape[0] in flat[key].shape, (
                name, key, b.shape)
            assert bool(jnp.all(jnp.isfinite(b))), (name, key)
    refreshed = lj.refreshed_leaves(state)
    assert set(refreshed) == set(bases) and any(bool(v) for v in refreshed.values()), name
    assert all(float(v) == -1.0 for v in lj.projector_overlaps(state).values()), name
