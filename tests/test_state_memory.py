"""state_nbytes equals the analytic size of every method's optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj

# a LLaMA-like block in Flax layout (in, out): d=32, ffn=80, two layers
D, F, R = 32, 80, 8
PARAMS = {
    "embed": jax.ShapeDtypeStruct((256, D), jnp.float32),
    "layers": [{"attn": {n: jax.ShapeDtypeStruct((D, D), jnp.float32) for n in "qkvo"},
                "mlp": {"gate": jax.ShapeDtypeStruct((D, F), jnp.float32),
                        "up": jax.ShapeDtypeStruct((D, F), jnp.float32),
                        "down": jax.ShapeDtypeStruct((F, D), jnp.float32)},
                "attn_norm": jax.ShapeDtypeStruct((D,), jnp.float32)} for _ in range(2)],
    "lm_head": jax.ShapeDtypeStruct((D, 256), jnp.float32),
}
F32, I32, BOOL = 4, 4, 1


def _projected_and_dense():
    projected, dense = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(PARAMS)[0]:
        name = jax.tree_util.keystr(path)
        (projected if leaf.ndim == 2 and ("attn" in name or "mlp" in name) else dense).append(leaf)
    return projected, dense


def _analytic(per_matrix_state, dense_state_per_elem, extra_scalars):
    """Bytes = per projected matrix + per dense element + fixed scalars."""
    projected, dense = _projected_and_dense()
    total = sum(per_matrix_state(max(x.shape), min(x.shape)) for x in projected)
    total += sum(int(np.prod(x.shape)) * dense_state_per_elem for x in dense)
    return total + extra_scalars


def _measure(tx):
    return lj.state_nbytes(jax.eval_shape(tx.init, PARAMS))


# every projected matrix under proj_type='std': moments (max, r) x2, projector (min, r),
# plus bool "ready" and "refreshed" flags and a float32 overlap value per matrix.
def _adam_lowrank(k, d, projector_bytes):
    return 2 * k * R * F32 + projector_bytes(d) + 2 * BOOL + F32


# wrapper scalars: count + key (2 x uint32); inner Adam count; dense Adam count.
WRAPPER = I32 + 2 * 4


@pytest.mark.parametrize("name", ["galore_adamw", "sara_adamw", "golore_adamw"])
def test_galore_family_state_bytes(name):
    tx = lj.OPTIMIZERS[name](1e-2, rank=R)
    expected = _analytic(lambda k, d: _adam_lowrank(k, d, lambda d: d * R * F32),
                         2 * F32, WRAPPER + I32 + I32)
    assert _measure(tx) == expected


def test_fira_state_bytes_add_limiter_and_bias_correction_count():
    tx = lj.fira_adamw(1e-2, rank=R)
    expected = _analytic(lambda k, d: _adam_lowrank(k, d, lambda d: d * R * F32) + F32 + BOOL,
                         2 * F32, WRAPPER + I32 + I32 + I32)
    assert _measure(tx) == expected


def test_dct_state_stores_only_indices():
    tx = lj.dct_adamw(1e-2, rank=R)
    expected = _analytic(lambda k, d: _adam_lowrank(k, d, lambda d: R * I32),
                         2 * F32, WRAPPER + I32 + I32)
    assert _measure(tx) == expected


def test_galore_adafactor_state_bytes():
    tx = lj.galore_adafactor(1e-2, rank=R)
    # factored second moment of the small (k, r) gradient: k + r floats, plus a 1-float slot
    lowrank = lambda k, d: (k + R + 1) * F32 + d * R * F32 + 2 * BOOL + F32
    projected, dense = _projected_and_dense()
    total = sum(lowrank(max(x.shape), min(x.shape)) for x in projected)
    for x in dense:
        total += (sum(x.shape) + 1) * F32 if x.ndim == 2 else (2 + x.shape[0]) * F32
    assert _measure(tx) == total + WRAPPER + I32 + I32


def test_adamw_state_is_two_moments_per_element():
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(PARAMS))
    assert _measure(lj.adamw(1e-3)) == 2 * n * F32 + I32


def test_state_nbytes_counts_arrays_and_shape_structs_alike():
    concrete = {"a": jnp.zeros((3, 5), jnp.bfloat16), "b": jnp.zeros((2,), jnp.int32)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), concrete)
    assert lj.state_nbytes(concrete) == lj.state_nbytes(abstract) == 3 * 5 * 2 + 2 * 4


@pytest.mark.slow
def test_projected_state_report_7b_apollo_mini_frugal_8bit():
    """Projected 7B matrices only: APOLLO-Mini < 0.1% of AdamW, FRUGAL blocks 1/4, 8-bit < GaLore/2."""
    from lowrank_jax.memory import projected_state_report

    mini = projected_state_report("llama_7b", "apollo_mini")
    assert mini["matrices"] == 32 * 7 and mini["ratio"] < 1e-3, mini
    frug = projected_state_report("llama_7b", "frugal")
    assert abs(frug["ratio"] - 0.25) < 1e-6, frug          # a quarter of the matrices
    q8 = projected_state_report("llama_7b", "galore_adamw8bit", rank=1024)
    g32 = projected_state_report("llama_7b", "galore_adamw", rank=1024)
    assert q8["state_bytes"] < g32["state_bytes"] / 2
