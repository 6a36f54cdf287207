"""Tests of the architecture methods (CoLA, SLTrain, LoRA/ReLoRA) on llama_tiny."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lj
from lowrank_jax.models import LINEAR_SPECS, LinearDims, Llama, get_preset, next_token_loss
from lowrank_jax.models.cola import CoLALinear, CoLASpec
from lowrank_jax.models.llama import effective_weights, trainable_param_count_formula
from lowrank_jax.models.lora import FrozenWeight, LoRALinear, LoRASpec
from lowrank_jax.models.relora import cosine_with_restarts_schedule, relora_merge_and_reinit
from lowrank_jax.models.sltrain import SLTrainLinear, SLTrainSpec, SparseSupport
from lowrank_jax.selection import default_lowrank_labels

METHODS = ("cola", "sltrain", "lora")
RANK = 8


def _cfg(linear: str, **kw):
    return get_preset("llama_tiny", linear=linear, linear_rank=RANK, **kw)


def _tokens(seed: int, shape=(2, 17)) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, 256, dtype=jnp.int32)


def _flat(state) -> dict[str, jax.Array]:
    return {"/".join(str(k) for k in p): v[...] for p, v in nnx.to_flat_state(state)}


@nnx.jit
def _fwd(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Jitted forward (eager Flax is slow on CPU); RNG state updates propagate."""
    return model(tokens)


def _randomize_lora_b(model: nnx.Module, seed: int = 5) -> None:
    """Give every ``lora_b`` nonzero values (they start at zero)."""
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        if path[-1] == "lora_b":
            var[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), var.shape)


def _dims(d_in: int, d_out: int) -> LinearDims:
    return LinearDims(d_in, d_out, ("embed", "mlp"), 0.02, jnp.float32, jnp.float32)


def test_specs_registered_and_build_their_layers():
    for name, spec, cls in (("cola", CoLASpec, CoLALinear), ("sltrain", SLTrainSpec, SLTrainLinear),
                            ("lora", LoRASpec, LoRALinear)):
        assert LINEAR_SPECS[name] is spec
        assert isinstance(spec(rank=4).build(_dims(8, 12), nnx.Rngs(0)), cls)
    assert _cfg("lora", lora_alpha=16.0).linear == LoRASpec(rank=RANK, alpha=16.0)
    with pytest.raises(ValueError, match="LoRA rank must be positive"):
        LoRASpec(rank=0)


@pytest.mark.parametrize("linear", METHODS)
def test_forward_and_galore_labels(linear):
    model = Llama(_cfg(linear), rngs=nnx.Rngs(0))
    logits = _fwd(model, _tokens(0, (2, 16)))
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_labels = jax.tree_util.tree_flatten_with_path(default_lowrank_labels(params))[0]
    lowrank = sorted(lj.tree_util.path_string(p) for p, lab in flat_labels if lab == "lowrank")
    # two 2-D factors per projection, 7 projections per block, all under attn/ or mlp/
    assert len(lowrank) == 2 * 7 * model.cfg.num_layers
    assert all(("/attn/" in p or "/mlp/" in p) and "_proj/" in p for p in lowrank)


def test_cola_structure_and_no_dense():
    model = Llama(_cfg("cola"), rngs=nnx.Rngs(0))
    q = model.layers[0].attn.q_proj
    assert q.cola_a.shape == (64, RANK) and q.cola_b.shape == (RANK, 64)
    x = jax.random.normal(jax.random.key(1), (3, 64))
    np.testing.assert_allclose(q(x), jax.nn.silu(x @ q.cola_a[...]) @ q.cola_b[...],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nonlinearity"):
        q.dense_equivalent()
    with pytest.raises(ValueError, match="no dense"):
        effective_weights(nnx.state(model), model.cfg)


@pytest.mark.parametrize("impl", ["dense", "gather"])
def test_sltrain_full_support_equals_dense(impl):
    d_in, d_out, r, alpha = 12, 20, 4, 32.0
    layer = SLTrainSpec(rank=r, alpha=alpha, density=1.0, sparse_impl=impl).build(
        _dims(d_in, d_out), nnx.Rngs(3))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (r, d_out))
    idx = np.asarray(layer.sparse_index[...])
    assert sorted(idx.tolist()) == list(range(d_in * d_out))  # full support
    s = np.zeros(d_in * d_out, np.float32)
    s[idx] = np.asarray(layer.sparse_values[...])
    w = (np.asarray(layer.lora_a[...]) @ np.asarray(layer.lora_b[...])) * alpha / r \
        + s.reshape(d_in, d_out)
    x = jax.random.normal(jax.random.key(4), (2, 5, d_in))
    np.testing.assert_allclose(layer(x), np.asarray(x) @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.dense_equivalent(), w, rtol=1e-6, atol=1e-6)
    # the support has the configured density and the values are U(+-1/sqrt(in))
    assert np.all(np.abs(np.asarray(layer.sparse_values[...])) <= 1 / math.sqrt(d_in))


def test_sltrain_support_density_and_impls_agree():
    dense = SLTrainSpec(rank=4, density=0.03).build(_dims(64, 176), nnx.Rngs(7))
    gather = SLTrainSpec(rank=4, density=0.03, sparse_impl="gather").build(_dims(64, 176),
                                                                          nnx.Rngs(7))
    idx = np.asarray(dense.sparse_index[...])
    assert idx.dtype == np.int32 and len(np.unique(idx)) == len(idx) == int(0.03 * 64 * 176)
    x = jax.random.normal(jax.random.key(0), (3, 64))
    np.testing.assert_allclose(dense(x), gather(x), rtol=1e-5, atol=1e-5)


def test_lora_zero_b_equals_base_layer():
    layer = LoRASpec(rank=4, alpha=32.0).build(_dims(16, 24), nnx.Rngs(0))
    assert float(jnp.abs(layer.lora_b[...]).max()) == 0.0
    assert float(jnp.abs(layer.lora_a[...]).max()) <= 1 / math.sqrt(16)
    x = jax.random.normal(jax.random.key(1), (3, 16))
    np.testing.assert_array_equal(layer(x), x @ layer.kernel[...])
    layer.lora_b[...] = jnp.ones((4, 24))
    expected = x @ layer.kernel[...] + (x @ layer.lora_a[...]) @ layer.lora_b[...] * 8.0
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x @ layer.dense_equivalent(), expected, rtol=1e-5, atol=1e-5)


def test_lora_dropout_train_and_eval():
    model = Llama(_cfg("lora", lora_dropout=0.5), rngs=nnx.Rngs(0))
    _randomize_lora_b(model)
    tokens = _tokens(1, (2, 8))
    a, b = _fwd(model, tokens), _fwd(model, tokens)
    assert not np.allclose(a, b)  # fresh dropout masks
    model.eval()
    np.testing.assert_array_equal(_fwd(model, tokens), _fwd(model, tokens))


@pytest.mark.parametrize("linear", ["sltrain", "lora"])
def test_effective_weights_reproduce_logits(linear):
    cfg = _cfg(linear)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    _randomize_lora_b(model)
    dense = Llama(cfg.replace(linear="dense"), rngs=nnx.Rngs(1))
    dense_params = nnx.state(dense, nnx.Param)
    nnx.replace_by_pure_dict(dense_params, effective_weights(nnx.state(model), cfg))
    nnx.update(dense, dense_params)
    tokens = _tokens(2, (2, 16))
    np.testing.assert_allclose(_fwd(dense, tokens), _fwd(model, tokens), rtol=1e-4, atol=1e-4)


def test_frozen_weight_and_support_not_trained():
    assert not issubclass(FrozenWeight, nnx.Param)
    assert not issubclass(SparseSupport, nnx.Param)
    batch = {"tokens": _tokens(3, (2, 9)), "mask": jnp.ones((2, 8), jnp.float32)}
    for linear, frozen in (("lora", "kernel"), ("sltrain", "sparse_index")):
        model = Llama(_cfg(linear), rngs=nnx.Rngs(0))
        _randomize_lora_b(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        assert all(p.endswith(frozen) for p in _flat(rest) if "_proj" in p)
        assert any(p.endswith(frozen) for p in _flat(rest))

        def loss(p, graphdef=graphdef, rest=rest):
            return next_token_loss(nnx.merge(graphdef, p, rest), batch)[0]

        grads = _flat(jax.jit(jax.grad(loss))(params))
        assert not any(p.endswith(frozen) for p in grads if "_proj" in p)
        assert any(p.endswith("lora_a") for p in grads)
        lora_b_grads = [g for p, g in grads.items() if p.endswith("lora_b")]
        assert lora_b_grads and all(float(jnp.abs(g).max()) > 0 for g in lora_b_grads)


def test_relora_merge_preserves_outputs_and_reinits():
    cfg = _cfg("lora", num_layers=1)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    _randomize_lora_b(model)
    tokens = _tokens(4, (2, 16))
    before = _fwd(model, tokens)
    graphdef, state = nnx.split(model)
    params = nnx.state(model, nnx.Param)
    opt_state = optax.adamw(1e-3).init(params)
    merge = jax.jit(relora_merge_and_reinit, static_argnames=("prune_fraction", "prune"))
    new_state, _ = merge(state, opt_state, jax.random.key(0), alpha=cfg.linear.alpha)
    after = _fwd(nnx.merge(graphdef, new_state), tokens)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    old, new = _flat(state), _flat(new_state)
    bound = 1 / math.sqrt(cfg.hidden_size)
    for p in new:
        if p.endswith("lora_b"):
            assert float(jnp.abs(new[p]).max()) == 0.0
        elif p.endswith("lora_a"):
            assert not np.allclose(new[p], old[p])
            assert float(jnp.abs(new[p]).max()) <= 1 / math.sqrt(new[p].shape[0]) + 1e-7
        elif not p.endswith("kernel") or "lm_head" in p:
            np.testing.assert_array_equal(new[p], old[p])
    assert bound > 0
    # deterministic given the key, and the pure-dict form gives the same answer
    again, _ = merge(state, opt_state, jax.random.key(0), alpha=cfg.linear.alpha)
    pure, _ = merge(nnx.to_pure_dict(state), opt_state, jax.random.key(0), alpha=cfg.linear.alpha)
    for p, v in _flat(again).items():
        np.testing.assert_array_equal(v, new[p])
    flat_pure = {"/".join(str(k) for k in path): v
                 for path, v in jax.tree_util.tree_flatten_with_path(pure)[0]
                 for path in [tuple(getattr(k, "key", k) for k in path)]}
    for p, v in flat_pure.items():
        np.testing.assert_allclose(v, new[p], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["random", "magnitude"])
def test_relora_pruning_only_lora_state(mode):
    cfg = _cfg("lora", num_layers=1)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = nnx.to_pure_dict(nnx.state(model))
    opt_state = optax.adamw(1e-3).init(params)
    # fill mu/nu with nonzero values 3 + N(0, 1)
    opt_state = jax.tree.map(lambda x: x + 3.0 if x.ndim else x, opt_state)
    leaves, treedef = jax.tree.flatten(opt_state)
    rng = np.random.default_rng(0)
    opt_state = treedef.unflatten(
        [x + rng.normal(size=x.shape).astype(np.float32) if x.ndim else x for x in leaves])
    frac = 0.9
    merge = jax.jit(relora_merge_and_reinit, static_argnames=("prune_fraction", "prune"))
    _, pruned = merge(state, opt_state, jax.random.key(1), prune_fraction=frac, prune=mode)
    old = [(p, np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    new = [np.asarray(y) for y in jax.tree.leaves(pruned)]
    n_lora = 0
    for (path, x), y in zip(old, new, strict=True):
        name = lj.tree_util.path_string(path)
        if name.endswith(("lora_a", "lora_b")):
            n_lora += 1
            zero = float(np.mean(y == 0))
            assert abs(zero - frac) < (0.05 if x.size > 500 else 0.15), (name, zero)
            kept = y != 0
            np.testing.assert_array_equal(y[kept], x[kept])
        else:
            np.testing.assert_array_equal(y, x)
    assert n_lora == 2 * 2 * 7 * cfg.num_layers  # (mu, nu) x (A, B) x 7 x layers


def test_cosine_with_restarts_schedule_formula():
    lr, total, w0, reset, wr, m = 1e-3, 1000, 50, 200, 20, 0.1
    sched = jax.jit(cosine_with_restarts_schedule(lr, total, w0, reset, wr, m))

    def expected(t: int) -> float:  # independent re-statement of the docstring formula
        def cos_at(s):
            prog = min(max((s - w0) / (total - w0), 0.0), 1.0)
            return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * prog))
        if t < w0:
            return lr * t / w0
        k, j = divmod(t, reset)
        if k >= 1 and j < wr:
            return lr * j / wr * cos_at(k * reset + wr)
        return lr * cos_at(t)

    for t in list(range(0, 1001, 7)) + [0, 49, 50, 199, 200, 201, 219, 220, 400, 999]:
        np.testing.assert_allclose(float(sched(t)), expected(t), rtol=1e-5, atol=1e-10)
    assert float(sched(200)) == 0.0 and float(sched(400)) == 0.0
    np.testing.assert_allclose(float(sched(w0)), lr, rtol=1e-6)
    np.testing.assert_allclose(float(sched(total - 1)), lr * m, rtol=1e-3)


@pytest.mark.parametrize("preset", ["llama_60m", pytest.param("llama_350m", marks=pytest.mark.slow)])
@pytest.mark.parametrize("linear", METHODS)
def test_param_counts_and_adamw_state(preset, linear):
    cfg = get_preset(preset, linear=linear)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert n == trainable_param_count_formula(cfg)
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    # mu + nu (float32 like params) + one int32 step count
    assert lj.state_nbytes(opt_state) == 2 * lj.state_nbytes(params) + 4
    assert lj.state_nbytes(params) == 4 * n
