"""FRUGAL's blockwise subspace: whole matrices take turns getting Adam, the rest signSGD.

The leaves this transformation sees are the *blocks* (FRUGAL: the attention/MLP
weight matrices, in the parameter tree's flatten order). At every refresh
(0-based step ``count = 0, T, 2T, ...``) ``k = round(density * n)`` of the ``n``
blocks become *active* (Python ``round``, as the reference):

* ``"descending"`` (the reference's pre-training setting): refresh ``j`` activates
  ``start_j, start_j - 1, ..., start_j - k + 1`` (mod ``n``) with
  ``start_j = (n - 1 - j k) mod n``, i.e. the window walks backwards through the list;
* ``"ascending"``: ``j k, ..., j k + k - 1`` (mod ``n``);
* ``"random"``: the first ``k`` of a uniform permutation drawn with
  ``fold_in(key, j)`` (a random stream, not the reference's torch one).

Active blocks get torch-style Adam (``m_hat / (sqrt(v_hat) + eps)``) whose moments
**and step count restart at every refresh**; inactive blocks get the state-free
step ``sign(G)`` (``"signsgd"``), ``G`` (``"sgd"``) or nothing (``"none"``).

State memory. JAX shapes are static, so the state cannot be "the active blocks'
moments" directly. It is a set of *slots*: blocks are grouped by (number of
elements, dtype); a group gets as many slots as the largest number of its members
that any refresh activates (computed exactly from the schedule for the
deterministic orders; ``min(k, group size)`` for ``"random"``), each slot a flat
``(numel,)`` buffer for ``m`` and one for ``v``. An active block uses the slot
given by its rank among the group's active members. For LLaMA with the
reference's density 0.25 and a window of whole layers this equals the
reference's peak Adam state (the moments of the ``k`` active matrices); in
general it is at most that peak plus one slot per group.

Reference: FRUGAL (Zmushko et al. 2024, fzmushko/FRUGAL
``frugal/proj_optimizer_templates.py``, ``BlockOptimizer``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.inner import _one_minus_power
from lowrank_jax.state_reader import ProjectorLayout, param_name

__all__ = ["BLOCK_ORDERS", "STATE_FREE_RULES", "BlockSubspaceState", "active_schedule",
           "scale_by_block_subspace"]

BLOCK_ORDERS = ("descending", "ascending", "random")
STATE_FREE_RULES = ("signsgd", "sgd", "none")


class BlockSubspaceState(NamedTuple):
    """State of :func:`scale_by_block_subspace`.

    Attributes:
      count: int32 number of updates done.
      key: uint32 ``(2,)`` raw PRNG key data (``"random"`` order only).
      mu: tuple, one ``(slots, numel)`` first-moment buffer per block group.
      nu: tuple, the matching second-moment buffers.
      projector: per-block bool, whether the block is active (its "basis" is the
        identity while active, nothing otherwise: :class:`BlockBasis`).
      overlap: per-block float32: 1 if the block stayed active over the last refresh,
        0 otherwise, -1 before the second refresh.
      refreshed: per-block bool, whether the last update was a refresh.
      layout: static description of the blocks (no arrays).
    """

    count: jax.Array
    key: jax.Array
    mu: tuple
    nu: tuple
    projector: Any
    overlap: Any
    refreshed: Any
    layout: ProjectorLayout


@dataclasses.dataclass(frozen=True)
class BlockBasis:
    """The "projector" of a FRUGAL block: the ``(d, d)`` identity while active, zeros otherwise.

    Only ``basis`` is used (by :func:`lowrank_jax.projector_bases`); ``d`` is the block's
    first dimension.
    """

    name: str = "blocks"

    def basis(self, state: jax.Array, d: int, dtype: Any) -> jax.Array:
        return jnp.eye(d, dtype=dtype) * jnp.asarray(state, dtype)


def _num_active(n: int, density: float) -> int:
    return round(n * density)


def active_schedule(n: int, k: int, order: str) -> np.ndarray:
    """``(P, n)`` bool table: which blocks refresh ``j`` activates, for ``j mod P``.

    ``P = n / gcd(n, k)`` is the period of the deterministic orders (1 when
    ``k = 0``). Not defined for ``"random"``.

    >>> active_schedule(4, 1, "descending").astype(int).tolist()
    [[0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    """
    if order not in ("descending", "ascending"):
        raise ValueError(f"active_schedule: order={order!r} has no fixed schedule.")
    period = 1 if k == 0 else n // math.gcd(n, k)
    table = np.zeros((period, n), bool)
    for j in range(period):
        if order == "ascending":
            idx = [(j * k + i) % n for i in range(k)]
        else:
            idx = [((n - 1 - j * k) - i) % n for i in range(k)]
        table[j, idx] = True
    return table


def scale_by_block_subspace(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    density: float = 0.25,
    update_every: int = 200,
    state_free: str = "signsgd",
    block_order: str = "descending",
    seed: int = 0,
) -> optax.GradientTransformation:
    """FRUGAL blockwise: Adam on ``round(density * n)`` whole blocks at a time, signSGD elsewhere.

    Args:
      b1, b2, eps: Adam's constants (torch placement of ``eps``).
      density: fraction of the blocks (leaves) active at a time.
      update_every: refresh period ``T`` (0-based steps ``0, T, 2T, ...``).
      state_free: ``"signsgd"``, ``"sgd"`` or ``"none"`` for inactive blocks.
      block_order: ``"descending"`` (reference pre-training), ``"ascending"``, ``"random"``.
      seed: seed of the ``"random"`` order.

    Returns:
      An optax ``GradientTransformation`` with a :class:`BlockSubspaceState`; the
      update has the sign of the gradient (chain a negative learning rate after it).

    >>> import jax.numpy as jnp
    >>> tx = scale_by_block_subspace(density=0.5, update_every=2)
    >>> g = {"a": jnp.ones((2, 3)), "b": -jnp.ones((3,))}
    >>> u, s = tx.update(g, tx.init(g))   # refresh 0 activates the last block, "b"
    >>> [round(float(x), 3) for x in (u["a"][0, 0], u["b"][0])]
    [1.0, -1.0]
    >>> [m.shape for m in s.mu]
    [(1, 6), (1, 3)]
    """
    if block_order not in BLOCK_ORDERS:
        raise ValueError(f"block_order={block_order!r} is not supported; use one of "
                         f"{list(BLOCK_ORDERS)}.")
    if state_free not in STATE_FREE_RULES:
        raise ValueError(f"state_free={state_free!r} is not supported; use one of "
                         f"{list(STATE_FREE_RULES)}.")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}.")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"update_every must be an int >= 1, got {update_every!r}.")

    def layout(leaves):
        """Static plan: groups (numel, dtype) -> member indices, slots per group, table."""
        n = len(leaves)
        k = _num_active(n, density)
        keys = [(int(np.prod(x.shape, dtype=np.int64)), jnp.dtype(x.dtype)) for x in leaves]
        groups: dict = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        table = None if block_order == "random" else active_schedule(n, k, block_order)
        slots = {}
        for key, members in groups.items():
            if table is None:
                slots[key] = min(k, len(members))
            else:
                slots[key] = int(table[:, members].sum(axis=1).max()) if n else 0
        return k, list(groups.items()), slots, table

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [p for _, p in flat]
        _, groups, slots, _ = layout(leaves)
        mu = tuple(jnp.zeros((slots[key], key[0]), key[1]) for key, _ in groups)
        nu = tuple(jnp.zeros((slots[key], key[0]), key[1]) for key, _ in groups)
        key = jax.random.key_data(jax.random.key(seed))
        n = len(leaves)
        names = tuple(param_name(path) for path, _ in flat)
        info = ProjectorLayout(BlockBasis(), names, ((0,),) * n,
                               tuple((int(p.shape[0]) if p.ndim else 1,) for p in leaves),
                               tuple(tuple(p.shape) for p in leaves), treedef)
        flags = lambda v: treedef.unflatten([jnp.asarray(v)] * n)
        return BlockSubspaceState(jnp.zeros([], jnp.int32), key, mu, nu, flags(False),
                                  treedef.unflatten([jnp.asarray(-1.0, jnp.float32)] * n),
                                  flags(False), info)

    def update_fn(updates, state, params=None):
        del params
        leaves = state.layout.check_updates(updates, "scale_by_block_subspace")
        treedef = state.layout.treedef
        n = len(leaves)
        k, groups, slots, table = layout(leaves)
        count = state.count
        refresh = count // update_every
        due = count % update_every == 0
        if table is not None:
            mask = jnp.asarray(table)[refresh % table.shape[0]]
        else:
            rkey = jax.random.fold_in(jax.random.wrap_key_data(state.key), refresh)
            chosen = jax.random.permutation(rkey, n)[:k]
            mask = jnp.zeros((n,), bool).at[chosen].set(True)
        t = (count % update_every + 1).astype(jnp.float32)      # Adam step since the reset
        bc1, bc2 = _one_minus_power(b1, t), _one_minus_power(b2, t)

        out = [None] * n
        new_mu, new_nu = [], []
        for gi, (key, members) in enumerate(groups):
            mu = jnp.where(due, jnp.zeros_like(state.mu[gi]), state.mu[gi])
            nu = jnp.where(due, jnp.zeros_like(state.nu[gi]), state.nu[gi])
            ranks = jnp.cumsum(mask[jnp.asarray(members)]) - 1       # slot of each active member
            for pos, i in enumerate(members):
                g = leaves[i]
                if state_free == "signsgd":
                    free = jnp.sign(g)
                elif state_free == "sgd":
                    free = g
                else:
                    free = jnp.zeros_like(g)
                if slots[key] == 0:
                    out[i] = free
                    continue
                act = mask[i]
                slot = jnp.clip(ranks[pos], 0, slots[key] - 1)
                g32 = g.astype(jnp.float32).reshape(-1)
                m = b1 * mu[slot].astype(jnp.float32) + (1 - b1) * g32
                v = b2 * nu[slot].astype(jnp.float32) + (1 - b2) * g32 * g32
                adam = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
                out[i] = jnp.where(act, adam.reshape(g.shape).astype(g.dtype), free)
                mu = mu.at[slot].set(jnp.where(act, m.astype(mu.dtype), mu[slot]))
                nu = nu.at[slot].set(jnp.where(act, v.astype(nu.dtype), nu[slot]))
            new_mu.append(mu)
            new_nu.append(nu)
        was = jnp.stack(treedef.flatten_up_to(state.projector)) if n else jnp.zeros((0,), bool)
        active = jnp.where(due, mask, was)
        old_ov = jnp.stack(treedef.flatten_up_to(state.overlap)) if n else jnp.zeros((0,))
        ov = jnp.where(due & (count > 0), (was & mask).astype(jnp.float32), old_ov)
        new_state = BlockSubspaceState(
            optax.safe_increment(count), state.key, tuple(new_mu), tuple(new_nu),
            treedef.unflatten(list(active)), treedef.unflatten(list(ov)),
            treedef.unflatten([due] * n), state.layout)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
