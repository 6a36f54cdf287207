"""GUM: GaLore made unbiased by layerwise sampling, with Muon (Pan et al. 2025).

"Unbiased Gradient Low-Rank Projection" (arXiv 2510.17802). Training is cut into
periods of ``K`` steps. At the start of a period every projected matrix ``G`` gets
GaLore's projector ``P`` (top-``r`` singular vectors, ``std`` side) from that step's
gradient, and ``gamma`` of the ``N`` matrices, drawn uniformly without replacement, are
*full-rank* for the period (``q = gamma / N``); the momenta restart. Within the period::

    low-rank:  R <- beta R + P^T G / (1 - q)          W <- W - lr P NS(R)
    full-rank: R <- beta R + (G - P P^T G) / q        W <- W - lr NS(R)

(``P^T G`` and ``P NS(R)`` in the orientation of the reduced axis), where ``NS`` is
Muon's Newton-Schulz orthogonalisation (``optax.contrib``'s
``orthogonalize_via_newton_schulz``, quintic coefficients ``(3.4445, -4.7750, 2.0315)``,
5 steps, Frobenius pre-scaling). In expectation over the draw the update direction is
Muon's on the full gradient.

State memory. Shapes are static, so a full-rank momentum cannot exist only for the
drawn matrices. Matrices are grouped by (shape, dtype); a group holds
``min(gamma, size)`` full-size momentum *slots*, used in tree order by its drawn
members. Every matrix keeps its projector and a low-rank momentum.

No implementation by the authors could be found (see ``docs/methods/gum.md``); this
module follows the paper's update rule as published.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib._muon import orthogonalize_via_newton_schulz

from lowrank_jax.geometry import leaf_geometry
from lowrank_jax.stateful_lowrank import oriented, project, project_back
from lowrank_jax.torch_adam import scale_by_torch_adam
from lowrank_jax.tree_util import path_string

__all__ = ["MUON_NS_COEFFS", "GUMState", "gum_muon", "newton_schulz", "scale_by_gum"]

MUON_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _wide(dtype) -> jnp.dtype:
    """The compute dtype: float32, or wider when the input is (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)


def newton_schulz(x: jax.Array, steps: int = 5, coeffs: tuple = MUON_NS_COEFFS,
                  eps: float = 1e-8) -> jax.Array:
    """Muon's orthogonalisation of a 2-D ``x`` (optax's implementation), in float32
    (or the input's wider dtype)."""
    x = x.astype(_wide(x.dtype))
    return orthogonalize_via_newton_schulz(x, jnp.asarray(coeffs, x.dtype), steps, eps=eps)


class GUMState(NamedTuple):
    """State of :func:`scale_by_gum`.

    Attributes:
      count: int32 steps done.
      key: uint32 ``(2,)`` raw PRNG key data (draws of period ``j`` use ``fold_in(key, j)``).
      projector: per leaf the basis ``(d, r)`` of the current period.
      full: per leaf bool, full-rank in the current period.
      momentum: per leaf the low-rank momentum (projected shape).
      slots: per (shape, dtype) group a ``(slots, a, b)`` array of full-rank momenta.
    """

    count: jax.Array
    key: jax.Array
    projector: Any
    full: Any
    momentum: Any
    slots: tuple


def _all_finite(x) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def scale_by_gum(
    *, rank: int = 128, period: int = 200, num_full: int = 1, beta: float = 0.95,
    ns_steps: int = 5, proj_type: str = "std", layout: str = "flax", seed: int = 0,
) -> optax.GradientTransformation:
    """GUM's direction for a tree of 2-D matrices (see the module docstring).

    Args:
      rank: projection rank (clamped to ``min(shape)``).
      period: ``K``, steps between projector refreshes and draws.
      num_full: ``gamma``, matrices updated at full rank per period (``1 <= gamma < N``).
      beta: momentum coefficient.
      ns_steps: Newton-Schulz iterations.
      proj_type, layout: one-sided geometry as :func:`lowrank_jax.scale_by_lowrank`.
      seed: seed of the draws.

    Returns:
      An optax ``GradientTransformation`` whose state is a :class:`GUMState`; its
      output is ``NS(...)`` (chain a negative learning rate after it).

    >>> import jax.numpy as jnp
    >>> tx = scale_by_gum(rank=2, num_full=1)
    >>> params = {"a": jnp.ones((8, 4)), "b": jnp.ones((6, 4))}
    >>> state = tx.init(params)
    >>> state.momentum["a"].shape, [s.shape for s in state.slots]
    ((8, 2), [(1, 8, 4), (1, 6, 4)])
    """
    for name, value in (("rank", rank), ("period", period), ("num_full", num_full),
                        ("ns_steps", ns_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if proj_type == "full":
        raise ValueError("scale_by_gum needs a one-sided proj_type ('std', ...).")

    def geometry(shape):
        return leaf_geometry(tuple(shape), rank, proj_type, layout)

    def groups_of(leaves):
        """Group index per leaf and the groups' (shape, dtype), in first-seen order."""
        keys, index = [], []
        for p in leaves:
            k = (tuple(p.shape), jnp.dtype(p.dtype))
            if k not in keys:
                keys.append(k)
            index.append(keys.index(k))
        return index, keys

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        leaves = [p for _, p in flat]
        for path, p in flat:
            if p.ndim != 2:
                raise ValueError(f"scale_by_gum: leaf {path_string(path)!r} has shape "
                                 f"{tuple(p.shape)}; only 2-D matrices.")
        if not num_full < len(leaves):
            raise ValueError(f"num_full={num_full} must be smaller than the number of "
                             f"projected matrices ({len(leaves)}).")
        index, keys = groups_of(leaves)
        sizes = [index.count(i) for i in range(len(keys))]
        slots = tuple(jnp.zeros((min(num_full, n),) + shape, dtype)
                      for (shape, dtype), n in zip(keys, sizes))
        geoms = [geometry(p.shape) for p in leaves]
        basis = [jnp.zeros((p.shape[g.reduced[0]], g.rank), _wide(p.dtype))
                 for p, g in zip(leaves, geoms)]
        mom = [jnp.zeros(g.small_shape, p.dtype) for p, g in zip(leaves, geoms)]
        full = [jnp.asarray(False)] * len(leaves)
        return GUMState(jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(seed)),
                        treedef.unflatten(basis), treedef.unflatten(full),
                        treedef.unflatten(mom), slots)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        n = len(leaves)
        q = num_full / n
        index, _ = groups_of(leaves)
        count = state.count
        start = count % period == 0
        period_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count // period)
        drawn = jax.random.permutation(period_key, n)[:num_full]
        fresh_full = jnp.zeros((n,), bool).at[drawn].set(True)
        full = jnp.where(start, fresh_full, jnp.stack(treedef.flatten_up_to(state.full)))
        # slot of a full-rank leaf: its rank among its group's full-rank leaves
        slot_of = []
        for i in range(n):
            same = [j for j in range(i) if index[j] == index[i]]
            slot_of.append(jnp.sum(full[jnp.asarray(same, jnp.int32)]) if same
                           else jnp.asarray(0))
        bases = treedef.flatten_up_to(state.projector)
        moms = treedef.flatten_up_to(state.momentum)
        slots = [jnp.where(start, jnp.zeros_like(s), s) for s in state.slots]
        outs, new_bases, new_moms = [], [], []
        for i, g in enumerate(leaves):
            geom = geometry(g.shape)
            ax = geom.reduced[0]
            g32 = g.astype(_wide(g.dtype))

            def refresh(g32=g32, ax=ax, rank=geom.rank, old=bases[i]):
                _, _, vh = jnp.linalg.svd(oriented(g32, ax), full_matrices=False)
                new = vh[:rank].T
                return jnp.where(_all_finite(g32) & _all_finite(new), new, old)

            basis = jax.lax.cond(start, refresh, lambda old=bases[i]: old)
            mom = jnp.where(start, jnp.zeros_like(moms[i]), moms[i]).astype(g32.dtype)
            small = project(g32, basis, ax)
            k = index[i]

            def low(basis=basis, mom=mom, small=small, ax=ax, k=k):
                m = beta * mom + small / (1.0 - q)
                return project_back(newton_schulz(m, ns_steps), basis, ax), m, slots[k]

            def high(basis=basis, mom=mom, small=small, g32=g32, ax=ax, k=k, s=slot_of[i]):
                resid = g32 - project_back(small, basis, ax)
                m = beta * slots[k][s].astype(g32.dtype) + resid / q
                return newton_schulz(m, ns_steps), mom, slots[k].at[s].set(m.astype(
                    slots[k].dtype))

            out, mom, slots[k] = jax.lax.cond(full[i], high, low)
            outs.append(out.astype(g.dtype))
            new_bases.append(basis)
            new_moms.append(mom.astype(moms[i].dtype))
        new_state = GUMState(optax.safe_increment(count), state.key,
                             treedef.unflatten(new_bases),
                             treedef.unflatten([full[i] for i in range(n)]),
                             treedef.unflatten(new_moms), tuple(slots))
        return treedef.unflatten(outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def gum_muon(
    learning_rate: Any, rank: int = 128, period: int = 200, num_full: int = 1,
    beta: float = 0.95, ns_steps: int = 5, b1: float = 0.9, b2: float = 0.999,
    eps: float = 1e-8, weight_decay: float = 0.0, labels: Any = None,
    proj_type: str = "std", layout: str = "flax", seed: int = 0,
) -> optax.GradientTransformation:
    """GUM (GaLore Unbiased with Muon) on the selected matrices, AdamW on the rest.

    Selected matrices (GaLore's name rule by default): :func:`scale_by_gum`; other
    leaves: torch's Adam (:func:`lowrank_jax.torch_adam.scale_by_torch_adam`); both
    times ``-learning_rate``, decoupled weight decay before the step.

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8)), "k": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = gum_muon(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["attn"]["q"].shape
    (16, 8)
    """
    from lowrank_jax.alias import _assemble

    lowrank = scale_by_gum(rank=rank, period=period, num_full=num_full, beta=beta,
                           ns_steps=ns_steps, proj_type=proj_type, layout=layout, seed=seed)
    return _assemble(learning_rate, lowrank, scale_by_torch_adam(b1, b2, eps), labels=labels,
                     weight_decay=weight_decay, decay_after_update=False)

