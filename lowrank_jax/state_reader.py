"""The public reader of low-rank optimizer state: projector bases, overlaps, refresh flags.

Every low-rank state of this package (:class:`lowrank_jax.ScaleByLowRankState`,
Flora's :class:`~lowrank_jax.compressed_momentum.CompressedMomentumState`,
FRUGAL's :class:`~lowrank_jax.block_subspace.BlockSubspaceState`) carries a
``layout``: a static pytree node (no arrays, no bytes) that knows the projector
object, the name of each projected parameter and the length of each reduced
side. The functions here find those states anywhere inside an optimizer state
(chains, ``optax.partition``, ``MultiSteps``, ``inject_hyperparams``,
``apply_if_finite``) and read them through each projector's ``basis``:

* :func:`projector_bases`: ``{param name: (B, ...)}``, one float32 ``(d, r)``
  basis per reduced side (two for ``proj_type="full"``);
* :func:`projector_overlaps`: ``{param name: float32}``, ``||B_old^T B_new||_F^2 / r``
  between the last two projectors (``-1`` before the second refresh);
* :func:`refreshed_leaves`: ``{param name: bool}``, whether the last update
  refreshed that parameter's projector.

Names are :func:`lowrank_jax.tree_util.path_string` of the parameter
(``'layers/0/attn/q_proj/kernel'``); with several low-rank states in one
optimizer they are prefixed by ``'<index>:'``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.tree_util import path_string

__all__ = ["ProjectorLayout", "find_states", "projector_bases", "projector_overlaps",
           "refreshed_leaves"]


def param_name(path: tuple) -> str:
    """The name of a parameter from its key path (a trailing NNX ``/value`` dropped)."""
    return path_string(path).removesuffix("/value")


@dataclasses.dataclass(frozen=True, eq=False)
class ProjectorLayout:
    """Static description of a low-rank state's projected leaves (a leafless pytree node).

    Attributes:
      projector: the projector object whose ``basis`` reads the projector states
        (``None`` for FRUGAL's blocks, whose "basis" is the identity or nothing).
      names: the projected parameters' names, in tree order.
      reduced: per leaf, the reduced axes of its matrix form.
      dims: per leaf, the length ``d`` of each reduced axis.
      shapes: per leaf, its stored shape (checked against the gradients).
      treedef: the structure of the parameter tree the state was built for.
      contexts: per leaf, an extra argument of ``basis`` for projectors that take one
        (:mod:`lowrank_jax.stateful_lowrank`); ``None`` for the three-argument protocol.
    """

    projector: Any
    names: tuple[str, ...]
    reduced: tuple[tuple[int, ...], ...]
    dims: tuple[tuple[int, ...], ...]
    shapes: tuple[tuple[int, ...], ...]
    treedef: Any
    contexts: tuple | None = None

    def _key(self) -> tuple:
        return (self.names, self.reduced, self.dims, self.shapes, self.treedef, self.contexts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProjectorLayout):
            return NotImplemented
        same_projector = self.projector is other.projector or _safe_eq(self.projector,
                                                                       other.projector)
        return same_projector and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.names, self.reduced, self.dims))

    def check_updates(self, updates: Any, who: str) -> list:
        """The leaves of ``updates``; a ``ValueError`` naming the leaf if they do not fit."""
        treedef = jax.tree.structure(updates)
        if treedef != self.treedef:
            raise ValueError(f"{who}: the updates' tree does not match the tree the state was "
                             f"initialised with ({treedef.num_leaves} vs "
                             f"{self.treedef.num_leaves} leaves); call init on the same tree.")
        leaves = treedef.flatten_up_to(updates)
        for name, shape, g in zip(self.names, self.shapes, leaves):
            if tuple(g.shape) != tuple(shape):
                raise ValueError(f"{who}: gradient of leaf {name!r} has shape {tuple(g.shape)} "
                                 f"but the state was initialised for {tuple(shape)}.")
        return leaves

    def leaves(self, tree: Any) -> list:
        """The per-leaf entries of a state field shaped like the parameters."""
        return self.treedef.flatten_up_to(tree)

    def bases(self, projector_field: Any) -> dict[str, tuple[jax.Array, ...]]:
        """``{name: (B, ...)}`` read through the projector's ``basis`` (float32)."""
        out = {}
        contexts = self.contexts or (None,) * len(self.names)
        for name, pstate, dims, ctx in zip(self.names, self.leaves(projector_field), self.dims,
                                           contexts):
            states = pstate if len(dims) == 2 else (pstate,)
            extra = () if self.contexts is None else (ctx,)
            out[name] = tuple(
                jnp.asarray(self.projector.basis(s, d, jnp.float32, *extra), jnp.float32)
                for s, d in zip(states, dims))
        return out

    def named(self, field: Any) -> dict[str, jax.Array]:
        """``{name: value}`` of a per-leaf field (overlap, refreshed)."""
        return dict(zip(self.names, self.leaves(field)))


def _safe_eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. projectors holding arrays
        return False


jax.tree_util.register_static(ProjectorLayout)


def _has_layout(x: Any) -> bool:
    return isinstance(getattr(x, "layout", None), ProjectorLayout) and hasattr(x, "_fields")


def find_states(opt_state: Any) -> list[Any]:
    """Every low-rank state (a NamedTuple with a :class:`ProjectorLayout`), in tree order."""
    return [x for x in jax.tree.leaves(opt_state, is_leaf=_has_layout) if _has_layout(x)]


def _collect(opt_state: Any, read) -> dict:
    states = find_states(opt_state)
    out = {}
    for i, st in enumerate(states):
        for name, value in read(st).items():
            out[f"{i}:{name}" if len(states) > 1 else name] = value
    return out


def projector_bases(opt_state: Any) -> dict[str, tuple[jax.Array, ...]]:
    """``{param name: (B, ...)}``: the current basis ``(d, r)`` float32 of each reduced side.

    >>> import jax.numpy as jnp, lowrank_jax as lj
    >>> params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = lj.galore_adamw(1e-2, rank=2)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> {k: [b.shape for b in v] for k, v in lj.projector_bases(state).items()}
    {'attn/q': [(8, 2)]}
    """
    return _collect(opt_state, lambda st: st.layout.bases(st.projector))


def projector_overlaps(opt_state: Any) -> dict[str, jax.Array]:
    """``{param name: overlap}`` between the last two projectors (float32; -1 before the second).

    >>> import jax.numpy as jnp, lowrank_jax as lj
    >>> params = {"attn": {"q": jnp.ones((16, 8))}}
    >>> tx = lj.galore_adamw(1e-2, rank=2)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> float(lj.projector_overlaps(state)["attn/q"])
    -1.0
    """
    return _collect(opt_state, lambda st: st.layout.named(st.overlap))


def refreshed_leaves(opt_state: Any) -> dict[str, jax.Array]:
    """``{param name: bool}``: whether the last update refreshed that projector.

    >>> import jax.numpy as jnp, lowrank_jax as lj
    >>> params = {"attn": {"q": jnp.ones((16, 8))}}
    >>> tx = lj.galore_adamw(1e-2, rank=2, update_proj_gap=5)
    >>> _, state = tx.update(params, tx.init(params), params)
    >>> bool(lj.refreshed_leaves(state)["attn/q"])
    True
    """
    return _collect(opt_state, lambda st: st.layout.named(st.refreshed))
