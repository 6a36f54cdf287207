"""Scanned layers, rematerialisation and the module layering of lowrank_jax.models (llama_tiny)."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models import (
    Llama,
    get_preset,
    loss_from_state,
    stack_layers,
    unstack_layers,
)
from lowrank_jax.tree_util import path_string

TINY = get_preset("llama_tiny")
BATCH = {"tokens": jax.random.randint(jax.random.key(3), (4, 17), 0, 256, dtype=jnp.int32),
         "mask": jnp.ones((4, 16), jnp.float32)}


def _loss_and_grads(cfg, params_from=None):
    """``(loss, grads as a pure dict)`` of ``cfg``'s model, params stacked from ``params_from``."""
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    if params_from is not None:
        pure = stack_layers(params_from) if cfg.scan_layers else params_from
        nnx.replace_by_pure_dict(params, pure)
    fn = jax.jit(jax.value_and_grad(loss_from_state, argnums=1, has_aux=True), static_argnums=0)
    (loss, _), grads = fn(graphdef, params, BATCH)
    return float(loss), nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def unrolled():
    params = nnx.to_pure_dict(nnx.state(Llama(TINY, rngs=nnx.Rngs(0)), nnx.Param))
    return params, _loss_and_grads(TINY)


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    fa = {path_string(p): v for p, v in jax.tree_util.tree_flatten_with_path(a)[0]}
    fb = {path_string(p): v for p, v in jax.tree_util.tree_flatten_with_path(b)[0]}
    assert sorted(fa) == sorted(fb)
    for k, value in fa.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(fb[k]), rtol=rtol, atol=atol,
                                   err_msg=k)


@pytest.mark.parametrize("remat", ["none", pytest.param("block", marks=pytest.mark.slow),
                                   pytest.param("dots_saveable", marks=pytest.mark.slow)])
def test_scanned_model_equals_unrolled(unrolled, remat):
    """Stacking the unrolled weights gives the same loss and (unstacked) gradients."""
    params, (loss, grads) = unrolled
    cfg = TINY.replace(scan_layers=True, remat=remat)
    s_loss, s_grads = _loss_and_grads(cfg, params)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    _assert_trees_close(unstack_layers(s_grads), grads)


@pytest.mark.slow
def test_remat_unrolled_equals_plain(unrolled):
    params, (loss, grads) = unrolled
    r_loss, r_grads = _loss_and_grads(TINY.replace(remat="block"), params)
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    _assert_trees_close(r_grads, grads)


def test_scanned_paths_shapes_and_axes():
    cfg = TINY.replace(scan_layers=True)
    model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert q.shape == (cfg.num_layers, cfg.hidden_size, cfg.hidden_size)
    assert q.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    flat = unstack_layers(params)
    q1 = flat["layers"][1]["attn"]["q_proj"]["kernel"]
    assert q1.shape == (cfg.hidden_size, cfg.hidden_size)
    assert q1.get_metadata()["out_sharding"] == ("embed", "heads")
    names = {path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(flat)[0]}
    unrolled = nnx.state(nnx.eval_shape(lambda: Llama(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    assert names == {path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(unrolled)[0]}
    back = stack_layers(flat)
    assert back["layers"]["attn"]["q_proj"]["kernel"].get_metadata()["out_sharding"] == \
        ("layers", "embed", "heads")


def test_stack_unstack_round_trip_values():
    params = nnx.to_pure_dict(nnx.state(Llama(TINY, rngs=nnx.Rngs(1)), nnx.Param))
    stacked = stack_layers(params)
    w = stacked["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_array_equal(w[1], params["layers"][1]["mlp"]["down_proj"]["kernel"])
    _assert_trees_close(unstack_layers(stacked), params, rtol=0, atol=0)


def test_scan_rejects_lora_dropout():
    with pytest.raises(ValueError, match="scan_layers=True does not support LoRA dropout"):
        get_preset("llama_tiny", linear="lora", lora_dropout=0.1, scan_layers=True)


def test_models_package_has_no_import_cycle():
    """The intra-package import graph of lowrank_jax/models is acyclic (layers is a leaf)."""
    root = Path(__file__).resolve().parents[1] / "lowrank_jax" / "models"
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("lowrank_jax.models."):
                deps.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = deps
    assert graph["layers"] == set()

    def visit(name, stack):
        assert name not in stack, f"import cycle: {' -> '.join(stack + [name])}"
        for dep in graph.get(name, ()):
            visit(dep, stack + [name])

    for name in graph:
        visit(name, [])
