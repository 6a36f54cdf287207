"""Every alias of ``lowrank_jax.OPTIMIZERS`` as the trainer builds it, on a tiny model.

``train.step.build_optimizer`` passes ``rank``, ``update_proj_gap``, ``scale``,
``weight_decay`` (and ``seed``) to every alias and clips the gradient first, so each
alias must accept those arguments and the trainer must give them through unchanged:
three steps (two refreshes at ``T = 2``) on a one-layer LLaMA with real next-token
gradients must equal the alias built directly and fed the clipped gradient, keep the
state's structure and dtypes, and fit the library's sharding specs.
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


#: the aliases without a projection (the config's rank/T/scale mean nothing to them)
FULL_RANK = ("adamw", "adam_mini")
#: projection aliases without randomness (no seed argument)
UNSEEDED = ("dct_adamw",)
CLIP = 0.05   # small enough that every gradient here is clipped


def _torch_clip(grads, max_norm):
    """PyTorch's ``clip_grad_norm_`` in NumPy: ``g * min(1, c / (||g|| + 1e-6))``."""
    leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]
    norm = np.sqrt(sum(float(np.sum(x * x)) for x in leaves))
    factor = np.float32(min(1.0, max_norm / (norm + 1e-6)))
    return jax.tree.map(lambda g: np.asarray(g) * factor, grads)


def _reference(name, schedule):
    """The alias with the arguments the config names, built directly (no trainer code)."""
    alias = lj.OPTIMIZERS[name]
    if name in FULL_RANK:
        return alias(schedule, weight_decay=0.1)
    kwargs = {"rank": 4, "update_proj_gap": 2, "scale": 0.25, "weight_decay": 0.1}
    if name not in UNSEEDED:
        kwargs["seed"] = 3
    takes = set(lj.alias.alias_arguments(name))          # e.g. GUM has no scale
    return alias(schedule, **{k: v for k, v in kwargs.items() if k in takes})


#: aliases checked in ``make test`` (full rank, seeded and unseeded projections); the rest are slow
FAST_ALIASES = ("adamw", "dct_adamw", "fira_adamw", "galore_adamw", "sara_adamw")


@pytest.mark.parametrize("name", [n if n in FAST_ALIASES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(lj.OPTIMIZERS)])
def test_trainer_optimizer_is_the_clipped_alias(name):
    """``build_optimizer`` = PyTorch's gradient clipping, then the alias with the config's
    rank, refresh period, scale, decay and seed: over three updates (two projector
    refreshes at ``T = 2``) its updates equal the alias's own ``tx.update`` on the
    clipped gradient, and the first one descends (``<g, u> < 0``). The state keeps its
    structure and dtypes from step to step (as ``jax.jit`` with donated state needs) and
    the library's sharding specs fit it on a ``fsdp x tensor`` mesh."""
    opt = OptimizerConfig(name=name, lr=1e-3, weight_decay=0.1, rank=4, update_proj_gap=2,
                          scale=0.25, grad_clip=CLIP)
    schedule = optax.constant_schedule(1e-3)
    tx, ref = build_optimizer(opt, schedule, seed=3), _reference(name, schedule)
    params, grad_fn = _model()
    state, ref_state = tx.init(params), ref.init(params)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for k in range(3):
        grads = grad_fn(params)
        updates, state = update(grads, state, params)
        expected, ref_state = ref_update(_torch_clip(grads, CLIP), ref_state, params)
        for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
            # the clip's norm is summed in another order: a refresh's SVD sees ~1e-7 changes
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3,
                                       atol=1e-3 * float(np.max(np.abs(want))),
                                       err_msg=f"{name} update {k + 1}")
        if k == 0:
            inner = sum(float(jnp.vdot(g, u)) for g, u in
                        zip(jax.tree.leaves(grads), jax.tree.leaves(updates)))
            assert inner < 0, (name, inner)
        params = optax.apply_updates(params, updates)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    _check_state_specs(tx, params, state)


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
