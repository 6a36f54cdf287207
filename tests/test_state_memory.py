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


# --- COAP, Grass, GUM, Q-GaLore -------------------------------------------------------

def _adam8bit_moment(n: int, block: int = 256, min_size: int = 4096) -> int:
    """One 8-bit moment of ``n`` elements: uint8 codes padded to whole blocks plus one
    float32 absmax per block; tensors under ``min_size`` elements stay float32."""
    if n < min_size:
        return n * F32
    blocks = -(-n // block)
    return blocks * block + blocks * F32


def test_coap_state_is_galore_adam_with_its_basis():
    """COAP keeps the basis (min, r) itself, Adam at (max, r): GaLore's bytes."""
    tx = lj.coap_adamw(1e-2, rank=R)
    expected = _analytic(lambda k, d: _adam_lowrank(k, d, lambda d: d * R * F32),
                         2 * F32, WRAPPER + I32 + I32)
    assert _measure(tx) == expected


def test_grass_state_stores_indices_and_scales():
    """Grass (proj_type='left', flax kernel (in, out)): r int32 indices and r float32
    scales along the output axis; Adam moments at (in, r)."""
    tx = lj.grass_adamw(1e-2, rank=R)
    projected, dense = _projected_and_dense()
    total = sum(2 * x.shape[0] * R * F32 + R * (I32 + F32) + 2 * BOOL + F32 for x in projected)
    total += sum(int(np.prod(x.shape)) * 2 * F32 for x in dense)
    assert _measure(tx) == total + WRAPPER + I32 + I32


@pytest.mark.parametrize("num_full", [1, 3])
def test_gum_state_has_low_rank_momenta_and_full_rank_slots(num_full):
    """GUM: basis (min, r) and momentum (max, r) per matrix, three bool flags and the
    overlap; per distinct matrix shape min(num_full, matrices of that shape) full-size
    momentum slots; count and key; the dense leaves' Adam."""
    tx = lj.gum_muon(1e-2, rank=R, num_full=num_full)
    projected, dense = _projected_and_dense()
    total = sum((min(x.shape) + max(x.shape)) * R * F32 + 3 * BOOL + F32 for x in projected)
    shapes = [tuple(x.shape) for x in projected]
    for shape in set(shapes):
        total += min(num_full, shapes.count(shape)) * shape[0] * shape[1] * F32
    total += sum(int(np.prod(x.shape)) * 2 * F32 for x in dense)
    assert _measure(tx) == total + I32 + 2 * 4 + I32


@pytest.mark.parametrize("group_size,weight_bits", [(256, 8), (96, 8), (256, None)])
def test_qgalore_state_bytes(group_size, weight_bits):
    """Q-GaLore: the projector as uint8 codes in groups (padded to whole groups) with a
    float32 scale and zero point per group, the lazy-refresh bookkeeping (gap, queue of
    cosines, its length, the last top singular vector, SVDs done), 8-bit Adam
    everywhere (float32 under 4096 elements), the INT8 weight rounding's count and key."""
    queue = 5
    tx = lj.qgalore_adamw8bit(1e-2, rank=R, proj_group_size=group_size,
                              weight_bits=weight_bits, queue_size=queue)
    projected, dense = _projected_and_dense()
    total = 0
    for x in projected:
        k, d = max(x.shape), min(x.shape)
        groups = -(-(d * R) // group_size)
        total += groups * group_size + 2 * groups * F32                  # codes, scale, zero
        total += I32 + queue * F32 + I32 + d * F32 + I32                  # lazy-refresh state
        total += 2 * BOOL + F32 + 2 * _adam8bit_moment(k * R)
    total += sum(2 * _adam8bit_moment(int(np.prod(x.shape))) for x in dense)
    scalars = WRAPPER + I32 + I32 + (I32 + 2 * 4 if weight_bits is not None else 0)
    assert _measure(tx) == total + scalars


def _llama_analytic(preset: str, optimizer: str, rank: int) -> int:
    """Optimizer-state bytes (fp32) of a LLaMA preset written out from its architecture."""
    from lowrank_jax.models import get_preset

    c = get_preset(preset)
    d, f, v, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    kernels = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]             # flax (in, out), per layer
    dense = [v * d, v * d] + [d] * (2 * n + 1)                  # embed, head, norms
    flags = 2 * BOOL + F32
    if optimizer == "coap_adamw":
        per = sum(2 * max(s) * rank * F32 + min(s) * rank * F32 + flags for s in kernels)
        return n * per + sum(2 * F32 * x for x in dense) + WRAPPER + 2 * I32
    if optimizer == "grass_adamw":
        per = sum(2 * s[0] * rank * F32 + rank * (I32 + F32) + flags for s in kernels)
        return n * per + sum(2 * F32 * x for x in dense) + WRAPPER + 2 * I32
    if optimizer == "gum_muon":
        per = sum((min(s) + max(s)) * rank * F32 + 3 * BOOL + F32 for s in kernels)
        slots = (d * d + d * f + f * d) * F32                    # one of each shape
        return n * per + slots + sum(2 * F32 * x for x in dense) + I32 + 2 * 4 + I32
    if optimizer == "qgalore_adamw8bit":
        per = 0
        for s in kernels:
            groups = -(-(min(s) * rank) // 256)
            per += groups * (256 + 2 * F32) + 3 * I32 + 5 * F32 + min(s) * F32
            per += flags + 2 * _adam8bit_moment(max(s) * rank)
        return (n * per + sum(2 * _adam8bit_moment(x) for x in dense)
                + WRAPPER + 2 * I32 + I32 + 2 * 4)
    raise AssertionError(optimizer)


@pytest.mark.parametrize("preset,rank", [
    ("llama_60m", 128),
    pytest.param("llama_1b", 512, marks=pytest.mark.slow),
    pytest.param("llama_7b", 1024, marks=pytest.mark.slow),
])
def test_lowrank_memory_reports_new_methods(capsys, preset, rank):
    """``lowrank-memory``: every new method's optimizer bytes equal the formula written
    out from the architecture (fp32), at the README's presets and ranks."""
    import json

    from train.memory_cli import main

    names = ["coap_adamw", "qgalore_adamw8bit", "grass_adamw", "gum_muon"]
    assert main(["--model", preset, "--optimizer", *names, "--rank", str(rank),
                 "--dtype", "fp32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["optimizer"] for r in rows] == names
    for row in rows:
        assert row["optimizer_bytes"] == _llama_analytic(preset, row["optimizer"], rank), row
