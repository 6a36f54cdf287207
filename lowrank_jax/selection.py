"""Which leaves are projected: GaLore's rule on module names, or the user's labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from lowrank_jax.tree_util import path_string

LOWRANK = "lowrank"
DENSE = "dense"
DEFAULT_TARGETS = ("attn", "attention", "mlp")


def default_lowrank_labels(params: Any, targets: Sequence[str] = DEFAULT_TARGETS) -> Any:
    """Label every 2-D leaf whose path contains one of ``targets`` as ``"lowrank"``.

    This is GaLore's selection (``torchrun_main.py``: ``nn.Linear`` modules whose
    name contains ``attn`` or ``mlp``); everything else is ``"dense"``.

    >>> import jax.numpy as jnp
    >>> default_lowrank_labels({"attn": {"q": jnp.zeros((4, 4))}, "norm": jnp.zeros(4)})
    {'attn': {'q': 'lowrank'}, 'norm': 'dense'}
    """
    lowered = tuple(t.lower() for t in targets)

    def label(path, leaf):
        name = path_string(path).lower()
        hit = len(getattr(leaf, "shape", ())) == 2 and any(t in name for t in lowered)
        return LOWRANK if hit else DENSE

    return jax.tree_util.tree_map_with_path(label, params)


def resolve_labels(labels: Any | Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """Turn ``labels`` (None, a pytree or a callable; bools or label strings) into a function."""

    def to_label(x):
        if isinstance(x, str):
            if x not in (LOWRANK, DENSE):
                raise ValueError(f"labels: unknown label {x!r}; use True/False or "
                                 f"{LOWRANK!r}/{DENSE!r}.")
            return x
        return LOWRANK if bool(x) else DENSE

    def fn(params):
        tree = default_lowrank_labels(params) if labels is None else (
            labels(params) if callable(labels) else labels)
        return jax.tree.map(to_label, tree)

    return fn
