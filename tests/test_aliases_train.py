"""Every alias of ``lowrank_jax.OPTIMIZERS`` builds through the trainer and trains a tiny model.

``train.step.build_optimizer`` passes ``rank``, ``update_proj_gap``, ``scale``,
``weight_decay`` (and ``seed``) to every alias, wraps it in gradient clipping, so each
alias must accept those arguments. Three steps (two refreshes at ``T = 2``) on a
one-layer LLaMA with real next-token gradients must change the parameters, lower
nothing to NaN, and keep the state's structure and dtypes from step to step (as
``jax.jit`` with donated state needs); :func:`lowrank_jax.sharding.optimizer_state_specs`
must give every state leaf a spec that fits its shape on a ``fsdp x tensor`` mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax import sharding as sh
from lowrank_jax.models import Llama, get_preset, loss_from_state
from train.config import OptimizerConfig
from train.step import build_optimizer

CFG = get_preset("llama_tiny", num_layers=1, hidden_size=32, intermediate_size=48,
                 num_heads=2, vocab_size=64)


@functools.cache
def _model():
    graphdef, params = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
    batch = {"tokens": tokens, "mask": jnp.ones((2, 8), jnp.float32)}
    grad_fn = jax.jit(jax.grad(lambda p: loss_from_state(graphdef, p, batch)[0]))
    return params, grad_fn


def _check_state_specs(tx, params, state):
    """The library's distributed state specs cover the state and fit every leaf's shape."""
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    specs = sh.optimizer_state_specs(tx, params, sh.param_specs(params, mesh), mesh)
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    leaves = jax.tree.leaves(state)
    assert len(flat) == len(leaves)
    for spec, leaf in zip(flat, leaves):
        assert len(spec) <= leaf.ndim
        for axes, n in zip(spec, leaf.shape):
            size = int(np.prod([mesh[a] for a in ((axes,) if isinstance(axes, str) else
                                                  (axes or ()))]))
            assert n % size == 0, (spec, leaf.shape)


@pytest.mark.parametrize("name", sorted(lj.OPTIMIZERS))
def test_alias_builds_and_trains(name):
    opt = OptimizerConfig(name=name, lr=1e-3, weight_decay=0.01, rank=4, update_proj_gap=2,
                          scale=0.25)
    tx = build_optimizer(opt, optax.constant_schedule(1e-3), seed=3)
    params, grad_fn = _model()
    state = tx.init(params)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update = jax.jit(tx.update)
    start = params
    for _ in range(3):
        updates, state = update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    _check_state_specs(tx, params, state)
    leaves = jax.tree.leaves(params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), name
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves, jax.tree.leaves(start))]
    assert np.max(moved) > 0, name


@pytest.mark.parametrize("name", sorted(lj.OPTIMIZERS))
def test_alias_is_a_valid_lowrank_train_config(name):
    """``lowrank-train --config configs/demo_galore.yaml optimizer.name=<alias>`` validates."""
    from pathlib import Path

    from train.config import load_config, validate

    path = Path(__file__).resolve().parent.parent / "configs" / "demo_galore.yaml"
    extra = ["optimizer.kwargs.num_heads=4"] if "adam_mini" in name else []
    cfg = load_config(path, [f"optimizer.name={name}", *extra])
    validate(cfg)
    assert cfg.optimizer.name == name
