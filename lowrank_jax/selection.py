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


def matrix_labels(min_dim: int | None = None, max_dim: int | None = None,
                  max_aspect: float | None = None) -> Callable[[Any], Any]:
    """A label function by shape: 2-D leaves with ``min_dim <= min(shape)``, ``max(shape) <=
    max_dim`` and ``max / min <= max_aspect`` are ``"lowrank"`` (bounds that are ``None`` are
    not checked).

    Flora's reference factorises exactly the matrices with ``min(shape) >= rank`` and
    ``max / min <= 4`` (``flora.py`` ``_get_options``); the DCT reference projects 2-D
    parameters with both sides below ``max_shape = 32000`` (``dct_adamw.py``
    ``init_state``).

    >>> import jax.numpy as jnp
    >>> fn = matrix_labels(min_dim=4, max_aspect=4)
    >>> fn({"a": jnp.zeros((8, 8)), "emb": jnp.zeros((64, 8)), "b": jnp.zeros(8)})
    {'a': 'lowrank', 'b': 'dense', 'emb': 'dense'}
    """

    def fn(params):
        def label(leaf):
            shape = tuple(getattr(leaf, "shape", ()))
            if len(shape) != 2 or min(shape) == 0:
                return DENSE
            lo, hi = min(shape), max(shape)
            ok = ((min_dim is None or lo >= min_dim) and (max_dim is None or hi <= max_dim)
                  and (max_aspect is None or hi / lo <= max_aspect))
            return LOWRANK if ok else DENSE

        return jax.tree.map(label, params)

    return fn
