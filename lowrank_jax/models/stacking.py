"""Convert between the scanned and the unrolled layout of the decoder's blocks.

A ``scan_layers`` model keeps its blocks as one subtree ``layers/...`` whose
arrays have a leading ``(num_layers,)`` axis; an unrolled model keeps
``layers/<i>/...`` with one subtree per block.  These functions map any tree
keyed like the model's state (an ``nnx.State``, its pure dict, gradients, or an
optimizer state's parameter-shaped subtree) between the two::

    unstack_layers({"layers": {"w": (n, a, b)}, "embed": ...})
        == {"layers": {0: {"w": (a, b)}, ..., n-1: {...}}, "embed": ...}

``nnx.Variable`` leaves keep their type and metadata; their logical axis names
lose (unstack) or gain (stack) the leading ``"layers"`` name.  ``PartitionSpec``
leaves (a tree of parameter specs) lose or gain their leading entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

__all__ = ["LAYERS", "is_stacked", "stack_layers", "unstack_layers"]

#: the key of the blocks in the model's state.
LAYERS = "layers"


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (nnx.Variable, PartitionSpec))


def _rebuild(tree: Mapping, layers: Any) -> Any:
    """``tree`` with its ``layers`` entry replaced, in ``tree``'s container type."""
    if isinstance(tree, nnx.State):
        items = dict(tree.raw_mapping)
        items[LAYERS] = dict(layers.raw_mapping) if isinstance(layers, nnx.State) else layers
        return nnx.State(items)
    items = dict(tree)
    items[LAYERS] = layers
    return items


def _axes(var: nnx.Variable) -> tuple | None:
    axes = var.get_metadata().get("out_sharding")
    return None if axes is None else tuple(axes)


def is_stacked(tree: Mapping) -> bool:
    """Whether ``tree['layers']`` is in the scanned layout (no integer block keys).

    >>> is_stacked({"layers": {0: {"w": 1}}}), is_stacked({"layers": {"w": 1}})
    (False, True)
    """
    layers = tree.get(LAYERS)
    if not isinstance(layers, Mapping) or not len(layers):
        return False
    return not all(isinstance(k, int) or str(k).isdigit() for k in layers)


def unstack_layers(tree: Mapping, num_layers: int | None = None) -> Any:
    """``layers/<leaf> (n, ...)`` -> ``layers/<i>/<leaf> (...)`` for ``i < n``.

    Args:
      tree: a mapping with a ``"layers"`` subtree of stacked arrays (or
        ``ShapeDtypeStruct``); a tree already unrolled is returned as it is.
      num_layers: ``n`` (default: the leading size of the first stacked leaf).

    Returns:
      the same container type with integer block keys ``0..n-1``.

    >>> import numpy as np
    >>> out = unstack_layers({"layers": {"w": np.zeros((3, 2))}, "b": 1})
    >>> sorted(out["layers"]), out["layers"][2]["w"].shape, out["b"]
    ([0, 1, 2], (2,), 1)
    """
    if not is_stacked(tree):
        return tree
    sub = tree[LAYERS]
    if num_layers is None:
        num_layers = int(jax.tree.leaves(sub)[0].shape[0])  # a spec tree needs num_layers

    def take(i: int) -> Any:
        def one(x: Any) -> Any:
            if _is_variable(x):
                axes = _axes(x)
                meta = {} if axes is None else {"out_sharding": axes[1:]}
                return x.replace(one(x.get_value()), **meta)
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
            if isinstance(x, PartitionSpec):
                return PartitionSpec(*tuple(x)[1:])
            return x[i]

        return jax.tree.map(one, sub, is_leaf=_is_leaf)

    blocks = {i: take(i) for i in range(num_layers)}
    blocks = {i: dict(b.raw_mapping) if isinstance(b, nnx.State) else b for i, b in blocks.items()}
    return _rebuild(tree, blocks)


def stack_layers(tree: Mapping) -> Any:
    """``layers/<i>/<leaf> (...)`` -> ``layers/<leaf> (n, ...)`` (inverse of :func:`unstack_layers`).

    A tree already stacked is returned as it is.

    >>> import numpy as np
    >>> out = stack_layers({"layers": {0: {"w": np.zeros(2)}, 1: {"w": np.ones(2)}}})
    >>> out["layers"]["w"].shape
    (2, 2)
    """
    layers = tree.get(LAYERS)
    if not isinstance(layers, Mapping) or is_stacked(tree):
        return tree
    keys = sorted(layers.keys(), key=int)
    blocks = [layers[k] for k in keys]
    blocks = [dict(b.raw_mapping) if isinstance(b, nnx.State) else b for b in blocks]

    def stack(*xs: Any) -> Any:
        first = xs[0]
        if _is_variable(first):
            axes = _axes(first)
            meta = {} if axes is None else {"out_sharding": ("layers",) + axes}
            return first.replace(stack(*(x.get_value() for x in xs)), **meta)
        if isinstance(first, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(xs),) + tuple(first.shape), first.dtype)
        if isinstance(first, PartitionSpec):
            return PartitionSpec(None, *tuple(first))
        return jnp.stack(xs)

    stacked = jax.tree.map(stack, *blocks, is_leaf=_is_leaf)
    return _rebuild(tree, stacked)
