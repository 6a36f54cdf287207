"""LOST layer against a NumPy re-statement of its construction and forward pass.

No implementation by the authors could be had; the re-statement below follows the
paper's description (Li et al. 2025, arXiv 2508.02668, as summarised in
``docs/methods/lost.md``): SVD of the dense initial weight ``W`` (torch ``(out, in)``),
low-rank factors ``V_r sqrt(S_r)`` / ``sqrt(S_r) U_r^T``, the residual's ``k`` input
columns of largest L2 norm as the sparse part, output
``gamma f(x A) B + (1 - gamma) x[:, I] W_c[:, I]^T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import (
    LINEAR_SPECS,
    Llama,
    count_params,
    get_preset,
    trainable_param_count_formula,
)
from lowrank_jax.models.layers import LinearDims
from lowrank_jax.models.lost import LOSTLinear, LOSTSpec, lost_channels
from lowrank_jax.tree_util import path_string


def lost_reference(w_torch: np.ndarray, x: np.ndarray, rank: int, k: int, gamma: float,
                   silu: bool) -> np.ndarray:
    """float64: split ``W`` (out, in) by its SVD and apply LOST to ``x`` (..., in)."""
    u, s, vh = np.linalg.svd(w_torch, full_matrices=False)
    a = vh[:rank].T * np.sqrt(s[:rank])                     # (in, r)
    b = np.sqrt(s[:rank])[:, None] * u[:, :rank].T           # (r, out)
    rest = w_torch - (u[:, :rank] * s[:rank]) @ vh[:rank]
    idx = np.sort(np.argsort(-np.linalg.norm(rest, axis=0))[:k])
    h = x @ a
    if silu:
        h = h / (1 + np.exp(-h))
    return gamma * h @ b + (1 - gamma) * x[..., idx] @ rest[:, idx].T, idx


def make_layer(**kw) -> LOSTLinear:
    dims = LinearDims(24, 16, ("embed", "mlp"), 0.3, jnp.dtype(jnp.float32),
                      jnp.dtype(jnp.float32))
    return LOSTSpec(**kw).build(dims, nnx.Rngs(7))


@pytest.mark.parametrize("activation", [None, "silu"])
def test_lost_forward_matches_reference(activation):
    layer = make_layer(rank=4, channel_fraction=0.25, gamma=0.3, activation=activation)
    dense = 0.3 * jax.random.normal(nnx.Rngs(7).params(), (24, 16), jnp.float32)  # same draw
    x = np.random.default_rng(0).standard_normal((5, 24))
    want, idx = lost_reference(np.asarray(dense, np.float64).T, x, 4, lost_channels(24, 0.25),
                               0.3, activation == "silu")
    np.testing.assert_array_equal(np.asarray(layer.sparse_index[...]), idx)
    got = np.asarray(layer(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_lost_split_reconstructs_the_low_rank_part_and_dense_equivalent():
    layer = make_layer(rank=4, channel_fraction=0.25, gamma=0.4)
    x = jax.random.normal(jax.random.key(1), (3, 24))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ layer.dense_equivalent()),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no dense equivalent"):
        make_layer(rank=4, activation="silu").dense_equivalent()


def test_lost_in_the_model_registry_and_param_count():
    assert LINEAR_SPECS["lost"] is LOSTSpec
    cfg = get_preset("llama_tiny", linear="lost", linear_rank=8, lost_gamma=0.25)
    assert cfg.linear == LOSTSpec(rank=8, gamma=0.25)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model.layers[0].attn.q_proj, LOSTLinear)
    assert count_params(model) == trainable_param_count_formula(cfg)


@pytest.mark.slow
def test_lost_model_forward_and_gradient():
    cfg = get_preset("llama_tiny", linear="lost", linear_rank=8)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model))
    named = {path_string(p): g for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    sparse = [g for name, g in named.items() if name.endswith("q_proj/lost_s")]
    assert sparse and sparse[0].shape == (lost_channels(cfg.hidden_size, 0.05), cfg.hidden_size)
    assert not any("sparse_index" in name for name in named)        # fixed, not trained
    assert any(float(jnp.abs(g).max()) > 0 for g in sparse)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in named.values())


def test_lost_rejects_bad_settings():
    with pytest.raises(ValueError, match="rank"):
        make_layer(rank=17)
    with pytest.raises(ValueError, match="channel_fraction"):
        make_layer(rank=4, channel_fraction=0.0)
    with pytest.raises(ValueError, match="gamma"):
        make_layer(rank=4, gamma=1.5)
    with pytest.raises(ValueError, match="activation"):
        make_layer(rank=4, activation="relu")
