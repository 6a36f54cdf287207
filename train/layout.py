"""Train-state layouts, and the conversion of a checkpoint saved in another one.

A run's train state has one of four layouts, set by ``model.scan_layers`` and
``per_layer_update``:

==============  ===========================  ====================================
layout          params / model state         optimizer state
==============  ===========================  ====================================
standard        ``layers/<i>/...``           ``tx.init`` of the params
scanned         ``layers/...`` stacked        ``tx.init`` of the unrolled params
per-layer       ``layers/<i>/...``           :class:`train.per_layer.LayerwiseState`
per-layer scan  ``layers/...`` stacked        ``LayerwiseState``, blocks stacked
==============  ===========================  ====================================

:func:`restore_alternatives` gives, for a run, the abstract states of the other
three layouts and a function converting each into the run's own layout
(through the standard one), so a checkpoint written before a layout change
still restores (:meth:`train.checkpoint.CheckpointStore.restore_latest`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.models import stack_layers, unstack_layers
from train.config import TrainConfig
from train.per_layer import full_to_layerwise, layerwise_to_full

__all__ = ["restore_alternatives", "to_layout"]

Layout = tuple[bool, bool]  # (scan_layers, per_layer_update)


def _layout(cfg: TrainConfig) -> Layout:
    return bool(cfg.model.scan_layers), bool(cfg.per_layer_update)


def _with_layout(cfg: TrainConfig, layout: Layout) -> TrainConfig:
    scan, per_layer = layout
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=scan),
                               per_layer_update=per_layer)


def _standard(state: Any, layout: Layout, tx: Any, view: Callable, n_layers: int) -> Any:
    """``state`` (in ``layout``) in the standard layout."""
    scan, per_layer = layout
    params = unstack_layers(state.params, n_layers) if scan else state.params
    model_state = unstack_layers(state.model_state, n_layers) if scan else state.model_state
    opt_state = state.opt_state
    if per_layer:
        template = jax.eval_shape(tx.init, view(params))
        opt_state = layerwise_to_full(opt_state, tx, view(state.params), template)
    return state._replace(params=params, model_state=model_state, opt_state=opt_state)


def _from_standard(state: Any, layout: Layout, tx: Any, view: Callable) -> Any:
    """A standard-layout ``state`` in ``layout``."""
    scan, per_layer = layout
    params = stack_layers(state.params) if scan else state.params
    model_state = stack_layers(state.model_state) if scan else state.model_state
    opt_state = state.opt_state
    if per_layer:
        opt_state = full_to_layerwise(opt_state, tx, view(params))
    return state._replace(params=params, model_state=model_state, opt_state=opt_state)


def to_layout(state: Any, source: TrainConfig, target: TrainConfig, tx: Any) -> Any:
    """Convert a train state of ``source``'s layout into ``target``'s.

    Args:
      state: the train state (arrays), laid out as ``source`` lays it out.
      source, target: configs that differ at most in ``model.scan_layers`` and
        ``per_layer_update``.
      tx: the underlying optimizer (:func:`train.step.build_optimizer`).
    """
    from train.config import model_config
    from train.step import optimizer_view

    mcfg = model_config(source)
    view = optimizer_view(source, mcfg)
    standard = _standard(state, _layout(source), tx, view, mcfg.num_layers)
    return _from_standard(standard, _layout(target), tx, view)


def restore_alternatives(cfg: TrainConfig, sharding: Any
                         ) -> Iterator[tuple[Any, Callable[[Any], Any]]]:
    """``(abstract state, convert)`` of each other layout a checkpoint of ``cfg`` may have.

    ``convert`` maps a state restored in that layout to ``cfg``'s layout, placed
    with ``sharding`` (the run's state shardings). Trainers of the other layouts
    are built lazily, one per item.
    """
    from train.schedule import make_schedule
    from train.step import build_optimizer, build_trainer

    tx = build_optimizer(cfg.optimizer, make_schedule(cfg), cfg.seed)
    own = _layout(cfg)
    for layout in ((False, False), (True, False), (False, True), (True, True)):
        if layout == own:
            continue
        other = _with_layout(cfg, layout)
        abstract = build_trainer(other).abstract_state

        def convert(state: Any, other: TrainConfig = other) -> Any:
            # fresh buffers: a converted state may share one array in two places
            # (e.g. a step count), and the train step donates every leaf
            state = jax.tree.map(jnp.copy, to_layout(state, other, cfg, tx))
            return jax.device_put(state, sharding)

        yield abstract, convert
