"""Small pytree helpers shared by the transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def map_unzip(fn: Callable[..., tuple], tree: Any, *rest: Any, n_out: int) -> tuple[Any, ...]:
    """Map ``fn`` over the leaves of ``tree`` (and matching subtrees of ``rest``).

    ``fn`` returns a tuple of ``n_out`` values per leaf; the result is ``n_out``
    trees with ``tree``'s structure. ``rest`` trees may hold whole subtrees
    (e.g. a state NamedTuple) where ``tree`` has a leaf.
    """
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    results = [fn(*args) for args in zip(leaves, *others)]
    if not results:
        return tuple(treedef.unflatten([]) for _ in range(n_out))
    return tuple(treedef.unflatten([r[i] for r in results]) for i in range(n_out))


def path_string(path: tuple) -> str:
    """``'layers/0/attn/q_proj/kernel'`` from a ``jax.tree_util`` key path."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)
