"""8-bit blockwise-quantised Adam: state size and closeness to float32 Adam.

* the state of :func:`scale_by_adam_8bit` is >= 3.5x smaller than float32 Adam's
  (1 byte per element + a float32 absmax per 256-element block, vs 8 bytes), both as
  a plain transformation and as the inner of GaLore (``galore_adamw8bit``);
* over 10 steps with random gradients (changing scale) the 8-bit updates stay close to
  :func:`scale_by_reference_adam`'s: cosine similarity > 0.995 and relative error
  of the update norm < 5% at every step;
* quantise/dequantise round trip: relative error per element bounded by the code
  book's spacing (a few % near the block maximum, exact zeros and maxima).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lj
from lowrank_jax.alias import galore_adamw, galore_adamw8bit
from lowrank_jax.quantized import dequantize, dynamic_code_book, quantize, scale_by_adam_8bit

PARAMS = {"a": jnp.zeros((128, 96)), "b": jnp.zeros((300, 40))}  # 300*40 not a multiple of 256


def test_state_bytes_cut_by_at_least_3_5x():
    q = lj.state_nbytes(jax.eval_shape(scale_by_adam_8bit().init, PARAMS))
    f = lj.state_nbytes(jax.eval_shape(lj.scale_by_reference_adam().init, PARAMS))
    assert f / q >= 3.5, f / q


def test_galore_inner_state_bytes_cut():
    params = {"mlp": {"up": jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}}
    s8 = jax.eval_shape(galore_adamw8bit(1e-2, rank=64).init, params)
    s32 = jax.eval_shape(galore_adamw(1e-2, rank=64).init, params)
    inner8 = lj.state_nbytes(lj.find_lowrank_states(s8)[0].inner_state)
    inner32 = lj.state_nbytes(lj.find_lowrank_states(s32)[0].inner_state)
    assert inner32 / inner8 >= 3.5, inner32 / inner8


def test_updates_close_to_float32_adam():
    tx8, tx32 = scale_by_adam_8bit(), lj.scale_by_reference_adam()
    s8, s32 = tx8.init(PARAMS), tx32.init(PARAMS)
    step8, step32 = jax.jit(tx8.update), jax.jit(tx32.update)
    for t in range(10):
        keys = jax.random.split(jax.random.key(t), 2)
        g = {k: jax.random.normal(kk, p.shape) * (1 + t % 3)
             for (k, p), kk in zip(PARAMS.items(), keys)}
        u8, s8 = step8(g, s8)
        u32, s32 = step32(g, s32)
        for k in PARAMS:
            a, b = np.asarray(u8[k]).ravel(), np.asarray(u32[k]).ravel()
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cos > 0.995, (t, k, cos)
            assert abs(np.linalg.norm(a) / np.linalg.norm(b) - 1) < 0.05, (t, k)


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip(signed):
    x = jax.random.normal(jax.random.key(0), (1000,))
    x = x if signed else x * x
    y = np.asarray(dequantize(quantize(x, signed), x.shape, jnp.float32, signed))
    x = np.asarray(x)
    book = dynamic_code_book(signed)
    assert np.all(np.diff(book) > 0)
    blocks = np.pad(np.abs(x), (0, 24)).reshape(-1, 256).max(1)
    scale = np.repeat(blocks, 256)[:1000]
    # error below half the largest code spacing (relative to the block maximum)
    assert np.max(np.abs(y - x) / scale) <= np.max(np.diff(book)) / 2 + 1e-6
    # relative error small for values not tiny compared to their block maximum
    big = np.abs(x) > 0.1 * scale
    assert np.median(np.abs(y - x)[big] / np.abs(x)[big]) < 0.05


def test_galore_adamw8bit_trains_like_galore_adamw():
    rng = np.random.default_rng(0)
    params = {"mlp": {"up": jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)}}
    target = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    loss = lambda p: jnp.mean((p["mlp"]["up"] - target) ** 2)
    out = {}
    for name, make in (("8bit", galore_adamw8bit), ("fp32", galore_adamw)):
        tx = make(1e-1, rank=16, update_proj_gap=5, scale=1.0)
        p, s = params, tx.init(params)

        @jax.jit
        def step(p, s, tx=tx):
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return jax.tree.map(lambda a, b: a + b, p, u), s

        for _ in range(20):
            p, s = step(p, s)
        out[name] = float(loss(p))
    assert out["8bit"] < float(loss(params)) * 0.9
    assert abs(out["8bit"] - out["fp32"]) / out["fp32"] < 0.05, out
