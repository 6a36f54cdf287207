"""Tests of the LLaMA decoder (lowrank_jax.models), all on the tiny byte-level preset."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import (
    PRESETS,
    Llama,
    count_params,
    get_preset,
    logical_axes,
    loss_from_state,
    make_linear,
    next_token_loss,
    param_count_formula,
)
from lowrank_jax.models.layers import apply_rope, rms_norm, rope_cos_sin

TINY = get_preset("llama_tiny")
BATCH, SEQ = 8, 32  # shared shapes, so each jitted function compiles once


@pytest.fixture(scope="module")
def model() -> Llama:
    return Llama(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    """Jitted ``tokens (B, L) -> logits``; tests share shape (B, L) = (8, 32) to compile once."""
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(lambda tokens: nnx.merge(graphdef, params)(tokens))


@pytest.fixture(scope="module")
def loss_and_grad(model):
    """Jitted ``batch -> ((loss, aux), grads)`` through ``loss_from_state``; tokens (8, 33)."""
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(jax.value_and_grad(loss_from_state, argnums=1, has_aux=True))
    return lambda batch: fn(graphdef, params, batch)


def _tokens(seed: int, shape: tuple[int, int]) -> jnp.ndarray:
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size, dtype=jnp.int32)


def _flat_params(model) -> dict[str, jax.Array]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(k) for k in path): var[...] for path, var in flat}


def test_output_shape_and_dtype(forward):
    logits = forward(_tokens(1, (BATCH, SEQ)))
    assert logits.shape == (BATCH, SEQ, TINY.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_causality(forward):
    tokens = _tokens(2, (BATCH, SEQ))
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % TINY.vocab_size)
    a, b = forward(tokens), forward(changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 10:] - b[:, 10:]))) > 1e-4


def test_param_paths_and_shapes(model):
    d, f, v = TINY.hidden_size, TINY.intermediate_size, TINY.vocab_size
    expected = {"embed/embedding": (v, d), "final_norm/scale": (d,), "lm_head/kernel": (d, v)}
    for i in range(TINY.num_layers):
        p = f"layers/{i}"
        expected |= {f"{p}/attn/{n}_proj/kernel": (d, d) for n in "qkvo"}
        expected |= {f"{p}/mlp/gate_proj/kernel": (d, f), f"{p}/mlp/up_proj/kernel": (d, f)}
        expected |= {f"{p}/mlp/down_proj/kernel": (f, d)}
        expected |= {f"{p}/attn_norm/scale": (d,), f"{p}/mlp_norm/scale": (d,)}
    got = {path: tuple(x.shape) for path, x in _flat_params(model).items()}
    assert got == expected
    # The model holds nothing but Params, so splitting on Param is exhaustive.
    all_paths = [path for path, _ in nnx.to_flat_state(nnx.state(model))]
    assert len(all_paths) == len(got)


def test_galore_selection_rule(model):
    params = nnx.state(model, nnx.Param)
    selected = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if leaf.ndim == 2
        and any(word in jax.tree_util.keystr(path) for word in ("attn", "attention", "mlp"))
    ]
    assert len(selected) == 7 * TINY.num_layers
    assert all("_proj" in s for s in selected)


def test_logical_axes(model):
    expected = {
        "embedding": ("vocab", "embed"), "q_proj": ("embed", "heads"),
        "k_proj": ("embed", "heads"), "v_proj": ("embed", "heads"),
        "o_proj": ("heads", "embed"), "gate_proj": ("embed", "mlp"),
        "up_proj": ("embed", "mlp"), "down_proj": ("mlp", "embed"),
        "lm_head": ("embed", "vocab"), "scale": ("embed",),
    }
    params = nnx.state(model, nnx.Param)
    pairs = jax.tree.leaves(
        jax.tree.map(lambda p, ax: (p.ndim, ax), params, logical_axes(model)),
        is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], int),
    )
    assert len(pairs) == len(jax.tree.leaves(params))
    for ndim, ax in pairs:
        assert len(ax) == ndim
    for path, var in nnx.to_flat_state(logical_axes(model)):
        key = next(k for k in expected if k in path)
        assert var.get_value() == expected[key], path
    with nnx.logical_axis_rules([("embed", None), ("heads", "model"), ("mlp", "model"),
                                 ("vocab", "model")]):
        specs = nnx.get_partition_spec(params)
    assert specs["lm_head"]["kernel"].get_value() == jax.sharding.PartitionSpec(None, "model")


def _numpy_rope(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """Rotate-half RoPE on one vector: pairs (i, i + D/2) rotate by pos * base^(-2i/D)."""
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        theta = pos * base ** (-2.0 * i / x.shape[-1])
        c, s = math.cos(theta), math.sin(theta)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def test_rope_matches_numpy_and_is_relative():
    rng = np.random.default_rng(0)
    head_dim, seq = 16, 12
    x = rng.standard_normal((1, seq, 2, head_dim)).astype(np.float32)
    cos, sin = rope_cos_sin(jnp.arange(seq), head_dim, 10000.0)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    want = np.stack([[_numpy_rope(x[0, t, h], t) for h in range(2)] for t in range(seq)])
    np.testing.assert_allclose(got[0], want, atol=1e-5)

    q, k = rng.standard_normal(head_dim), rng.standard_normal(head_dim)
    for m, n in [(3, 1), (7, 7), (2, 9)]:
        base_score = _numpy_rope(q, m) @ _numpy_rope(k, n)
        for shift in (1, 5, 40):
            shifted = _numpy_rope(q, m + shift) @ _numpy_rope(k, n + shift)
            np.testing.assert_allclose(shifted, base_score, rtol=1e-9, atol=1e-9)
    assert not np.isclose(_numpy_rope(q, 3) @ _numpy_rope(k, 1), _numpy_rope(q, 4) @ _numpy_rope(k, 1))


def test_rms_norm_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32) * 3.0
    scale = rng.standard_normal(8).astype(np.float32)
    want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6)),
                               want, rtol=1e-5, atol=1e-6)


def test_initial_loss_near_log_vocab(loss_and_grad):
    batch = {"tokens": _tokens(3, (BATCH, SEQ + 1)), "mask": jnp.ones((BATCH, SEQ), jnp.float32)}
    (loss, aux), _ = loss_and_grad(batch)
    assert abs(float(loss) - math.log(TINY.vocab_size)) < 0.1
    assert float(aux["num_tokens"]) == BATCH * SEQ


def test_masked_loss_by_hand(forward, loss_and_grad):
    tokens = _tokens(4, (BATCH, SEQ + 1))
    mask = jnp.asarray(np.random.default_rng(2).integers(0, 2, (BATCH, SEQ)), jnp.float32)
    (loss, aux), _ = loss_and_grad({"tokens": tokens, "mask": mask})
    logits = np.asarray(forward(tokens[:, :-1]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    targets = np.asarray(tokens[:, 1:])
    ce = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    m = np.asarray(mask)
    np.testing.assert_allclose(float(aux["sum_loss"]), (ce * m).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(aux["num_tokens"]), m.sum())
    np.testing.assert_allclose(float(loss), (ce * m).sum() / m.sum(), rtol=1e-5)


def test_loss_from_state_grads(model, loss_and_grad):
    batch = {"tokens": _tokens(5, (BATCH, SEQ + 1)), "mask": jnp.ones((BATCH, SEQ), jnp.float32)}
    _, grads = loss_and_grad(batch)
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


def test_next_token_loss_matches_pure_form(model, loss_and_grad):
    batch = {"tokens": _tokens(6, (BATCH, SEQ + 1))}  # no mask: all ones
    (pure, _), _ = loss_and_grad({**batch, "mask": jnp.ones((BATCH, SEQ), jnp.float32)})
    loss, aux = jax.jit(next_token_loss)(model, batch)
    np.testing.assert_allclose(float(loss), float(pure), rtol=1e-6)
    assert float(aux["num_tokens"]) == BATCH * SEQ


def test_bf16_params_and_f32_logits():
    cfg = TINY.replace(param_dtype="bfloat16", dtype="bfloat16")
    m = Llama(cfg, rngs=nnx.Rngs(0))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    logits = nnx.jit(lambda mod, t: mod(t))(m, _tokens(6, (1, 8)))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", ["llama_60m", "llama_350m", "llama_7b", "llama_tiny"])
def test_param_count_formula(name):
    cfg = get_preset(name)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    assert count_params(abstract) == param_count_formula(cfg)


def test_param_count_60m_is_about_58m():
    assert param_count_formula(get_preset("llama_60m")) == 58_073_600


def test_presets_table():
    assert {n: (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers)
            for n, c in PRESETS.items() if c.vocab_size == 32000} == {
        "llama_9m": (128, 352, 4, 4), "llama_20m": (256, 688, 4, 4),
        "llama_35m": (384, 1024, 8, 6), "llama_60m": (512, 1376, 8, 8),
        "llama_130m": (768, 2048, 12, 12), "llama_350m": (1024, 2736, 16, 24),
        "llama_1b": (2048, 5461, 32, 24), "llama_3b": (2560, 6848, 32, 32),
        "llama_7b": (4096, 11008, 32, 32),
    }
    assert get_preset("llama_demo").vocab_size == 256
    assert get_preset("llama_60m", max_seq_len=512).max_seq_len == 512


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="valid presets: .*llama_60m"):
        get_preset("llama_61m")
    with pytest.raises(ValueError, match="unknown LlamaConfig field.*hidden"):
        get_preset("llama_tiny", hiden_size=3)


def test_unknown_linear_type():
    with pytest.raises(ValueError, match="unknown linear type 'lowrank'.*dense"):
        make_linear(TINY.replace(linear="lowrank"), 4, 4, ("embed", "mlp"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown remat 'all'"):
        TINY.replace(remat="all")
