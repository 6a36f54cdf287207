"""Partition specs of parameters and optimizer states; per-device bytes; staggered refreshes."""

from __future__ import annotations

import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax import sharding as sh
from lowrank_jax.inner import scale_by_reference_adam
from lowrank_jax.models import Llama, get_preset
from lowrank_jax.transform import scale_by_lowrank
from train.mesh import parse_mesh, per_device_memory

MESH = {"data": 1, "fsdp": 4, "tensor": 2}
is_spec = lambda x: isinstance(x, P)


def _tiny_params():
    cfg = get_preset("llama_tiny")
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]


def _axes_size(axes) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(MESH[a] for a in axes)


def test_llama_param_specs_follow_the_rules():
    specs = sh.param_specs(_tiny_params(), MESH)
    layer = specs["layers"][0]
    assert layer["attn"]["q_proj"]["kernel"].get_value() == P("fsdp", "tensor")
    assert layer["attn"]["o_proj"]["kernel"].get_value() == P("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"].get_value() == P("tensor", "fsdp")
    assert specs["embed"]["embedding"].get_value() == P("tensor", "fsdp")
    assert specs["final_norm"]["scale"].get_value() == P("fsdp")
    # a dimension its mesh axes do not divide is replicated
    assert sh.logical_to_spec(("embed", "mlp"), (6, 8), MESH) == P(None, "tensor")


@pytest.mark.parametrize("name", sorted(lj.OPTIMIZERS))
def test_state_specs_for_every_optimizer_divide_and_match_the_state(name):
    params = _tiny_params()
    specs = sh.param_specs(params, MESH)
    alias = lj.OPTIMIZERS[name]
    takes_rank = "rank" in inspect.signature(alias).parameters
    kwargs = {"rank": 8} if takes_rank else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        txs = [optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0),
                                            alias(1e-3, **kwargs)), 2)]
        if name == "galore_adamw":   # aliases with **kwargs do not go through inject_hyperparams
            txs.append(optax.inject_hyperparams(alias, static_args=("rank", "update_proj_gap"))(
                learning_rate=1e-3, **kwargs))
        for tx in txs:
            state = jax.eval_shape(tx.init, params)
            st_specs = sh.optimizer_state_specs(tx, params, specs, MESH)
            assert jax.tree.structure(st_specs, is_leaf=is_spec) == jax.tree.structure(state)
            for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(st_specs, is_leaf=is_spec)):
                assert len(s) <= x.ndim
                for dim, axes in zip(x.shape, s):
                    assert dim % _axes_size(axes) == 0
                if x.ndim == 0 or jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 1:
                    assert s == P() or all(a is None for a in s)   # scalars, indices


def test_lowrank_state_specs_derive_from_their_own_shapes():
    # kernel (in=64, out=176) split (fsdp, tensor); GaLore std reduces in (axis 0)
    params = {"mlp": {"up": jax.ShapeDtypeStruct((64, 176), jnp.float32)}}
    specs = {"mlp": {"up": P("fsdp", "tensor")}}
    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    for projector in ("svd", "dct"):
        tx = scale_by_lowrank(scale_by_reference_adam(), rank=8, projector=projector)
        st = sh.optimizer_state_specs(tx, params, specs, mesh)
        mu = st.inner_state.mu["mlp"]["up"]            # (8, 176): out keeps tensor, gets fsdp
        assert mu == P(None, ("tensor", "fsdp"))
        proj = jax.tree.leaves(st.projector["mlp"]["up"], is_leaf=is_spec)[0]
        if projector == "svd":                          # (64, 8): along in, r replicated
            assert proj == P(("fsdp", "tensor"), None)
        else:                                           # int32 indices (8,)
            assert proj == P()
    # a rank axis never inherits a weight axis of another length
    tx = scale_by_lowrank(scale_by_reference_adam(), rank=8, proj_type="right")
    st = sh.optimizer_state_specs(tx, params, {"mlp": {"up": P(None, "tensor")}}, mesh)
    assert st.inner_state.mu["mlp"]["up"] == P(None, "tensor")


@pytest.mark.slow
def test_per_device_memory_7b_fsdp64_equals_formula():
    """``lowrank-memory --mesh fsdp=64`` figures, restated from the architecture."""
    c = get_preset("llama_7b")
    d, f, v, n, r, dev = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers, 1024, 64
    matrices = [(d, d)] * 4 + [(d, f)] * 3
    dense = 2 * v * d + (2 * n + 1) * d
    params = (dense + n * sum(a * b for a, b in matrices)) * 4
    mesh = parse_mesh("fsdp=64")
    assert mesh == {"data": 1, "fsdp": 64, "tensor": 1}
    adamw = per_device_memory("llama_7b", "adamw", mesh)
    assert adamw == {"params": params // dev, "frozen": 0, "grads": params // dev,
                     "optimizer": 2 * params // dev + 4}
    galore = per_device_memory("llama_7b", "galore_adamw", mesh, rank=r)
    # every d, f and r divides by 64: projector (min, r) and two moments (max, r)
    # per matrix split 64 ways; ready and refreshed flags + overlap (6 B) per matrix
    # replicated; dense Adam moments split; counts + key (20 B) replicated
    lowrank = n * sum((2 * max(a, b) * r + min(a, b) * r) * 4 // dev + 6 for a, b in matrices)
    assert galore["optimizer"] == lowrank + 2 * dense * 4 // dev + 20
    assert galore["params"] == params // dev


def test_mesh_errors_are_one_line():
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        parse_mesh("fsdp:4")
    with pytest.raises(ValueError, match="set one axis to -1"):
        sh.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        sh.resolve_mesh_shape({"model": 2}, 8)
    assert sh.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
        "data": 4, "fsdp": 1, "tensor": 2}


def test_staggered_refreshes_spread_over_the_period():
    t_gap, n = 4, 4
    names = [f"w{i}" for i in range(n)]
    g = {k: jnp.zeros((16, 8)) for k in names}
    tx = scale_by_lowrank(scale_by_reference_adam(), rank=2, update_every=t_gap,
                          projector="random", stagger=True)
    state = tx.init(g)
    upd = jax.jit(tx.update)
    refreshed = {k: [] for k in names}
    prev = state.projector
    for count in range(13):
        _, state = upd(g, state)
        for k in names:
            if not np.array_equal(np.asarray(prev[k]), np.asarray(state.projector[k])):
                refreshed[k].append(count)
        prev = state.projector
    # leaf i: offset o_i = i * T // n; refreshes at count 0, then counts c >= T with
    # (c - o_i) % T == 0
    for i, k in enumerate(names):
        o = i * t_gap // n
        want = [0] + [c for c in range(t_gap, 13) if (c - o) % t_gap == 0]
        assert refreshed[k] == want
    with pytest.raises(ValueError, match="moments='reset'"):
        scale_by_lowrank(scale_by_reference_adam(), rank=2, stagger=True, moments="reset")
