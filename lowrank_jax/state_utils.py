"""Helpers to measure and read optimizer state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.transform import ScaleByLowRankState


def state_nbytes(tree: Any) -> int:
    """Exact bytes of every array (or ``jax.ShapeDtypeStruct``) leaf of ``tree``.

    >>> import jax.numpy as jnp
    >>> state_nbytes({"a": jnp.zeros((3, 4)), "b": jnp.zeros(2, jnp.int32)})
    56
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            raise TypeError(f"state_nbytes: a leaf of type {type(leaf).__name__} ({leaf!r:.40}) "
                            "is not an array; pass a pytree of arrays or jax.ShapeDtypeStruct.")
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            itemsize = jax.random.key_data(jax.random.key(0)).nbytes
        else:
            itemsize = np.dtype(dtype).itemsize
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total


def subspace_overlap(u: jax.Array, v: jax.Array) -> jax.Array:
    """SARA's subspace overlap ``||U^T V||_F^2 / r`` for orthonormal bases ``(d, r)``.

    1 for the same subspace, about ``r / d`` for independent random ones.

    >>> import jax.numpy as jnp
    >>> float(subspace_overlap(jnp.eye(4)[:, :2], jnp.eye(4)[:, :2]))
    1.0
    """
    u32, v32 = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
    return jnp.sum((u32.T @ v32) ** 2) / u32.shape[-1]


def find_lowrank_states(opt_state: Any) -> list[ScaleByLowRankState]:
    """Every :class:`ScaleByLowRankState` inside an optimizer state, in tree order.

    Its ``projector`` field is the current projector state of each projected leaf
    (shaped like the params, ``optax.MaskedNode`` elsewhere) and ``overlap`` the
    subspace overlap measured at the last refresh. Prefer the public readers
    :func:`lowrank_jax.projector_bases`, :func:`~lowrank_jax.projector_overlaps` and
    :func:`~lowrank_jax.refreshed_leaves`, which cover every low-rank alias.
    """
    found: list[ScaleByLowRankState] = []
    is_state = lambda x: isinstance(x, ScaleByLowRankState)
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_state):
        if is_state(leaf):
            found.append(leaf)
    return found
