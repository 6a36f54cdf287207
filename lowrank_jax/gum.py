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

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib._muon import orthogonalize_via_newton_schulz

from lowrank_jax import steps
from lowrank_jax.geometry import leaf_geometry
from lowrank_jax.state_reader import ProjectorLayout, param_name
from lowrank_jax.torch_adam import scale_by_torch_adam
from lowrank_jax.transform import check_static_int
from lowrank_jax.tree_util import path_string

__all__ = ["MUON_NS_COEFFS", "GUMProjector", "GUMState", "gum_muon", "newton_schulz",
           "scale_by_gum"]

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


@dataclasses.dataclass(frozen=True)
class GUMProjector:
    """GaLore's SVD projector at the gradient's precision (projector protocol of
    :mod:`lowrank_jax.projectors`): the top-``rank`` right singular vectors of the
    ``(k, d)`` view, computed in float32 or, for a float64 gradient, float64. The
    state is the basis ``(d, r)`` itself.

    >>> import jax, jax.numpy as jnp
    >>> p = GUMProjector()
    >>> b = p.compute(jax.random.key(0), jnp.diag(jnp.array([1.0, 3.0])), 1,
    ...               p.init(2, 1, jnp.float32), 0)
    >>> jnp.abs(b).tolist()
    [[0.0], [1.0]]
    """

    name: str = "gum_svd"

    def init(self, d: int, rank: int, dtype: Any) -> jax.Array:
        return jnp.zeros((d, rank), _wide(dtype))

    def compute(self, key, x, rank, previous, count):
        del key, count
        _, _, vh = jnp.linalg.svd(x.astype(_wide(x.dtype)), full_matrices=False)
        return vh[:rank].T.astype(previous.dtype)

    def basis(self, state, d, dtype):
        del d
        return state.astype(dtype)

    def nbytes(self, d, rank, dtype):
        return d * rank * np.dtype(_wide(dtype)).itemsize


class GUMState(NamedTuple):
    """State of :func:`scale_by_gum`.

    Attributes:
      count: int32 steps done.
      key: uint32 ``(2,)`` raw PRNG key data (draws of period ``j`` use ``fold_in(key, j)``).
      projector: per leaf the basis ``(d, r)`` of the current period.
      ready: per leaf bool, a projector has been computed.
      overlap: per leaf float32 ``||B_old^T B_new||_F^2 / r`` at the last refresh (-1 before
        the second).
      refreshed: per leaf bool, the last update refreshed the projector.
      full: per leaf bool, full-rank in the current period.
      momentum: per leaf the low-rank momentum (projected shape).
      slots: per (shape, dtype) group a ``(slots, a, b)`` array of full-rank momenta.
      layout: static description of the projected leaves (for the state readers).
    """

    count: jax.Array
    key: jax.Array
    projector: Any
    ready: Any
    overlap: Any
    refreshed: Any
    full: Any
    momentum: Any
    slots: tuple
    layout: ProjectorLayout


def scale_by_gum(
    *, rank: int = 128, update_proj_gap: int = 200, num_full: int = 1, beta: float = 0.95,
    ns_steps: int = 5, proj_type: str = "std", layout: str = "flax", seed: int = 0,
) -> optax.GradientTransformation:
    """GUM's direction for a tree of 2-D matrices (see the module docstring).

    Args:
      rank: projection rank (clamped to ``min(shape)``).
      update_proj_gap: ``K``, steps between projector refreshes and draws.
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
    for name, value in (("rank", rank), ("update_proj_gap", update_proj_gap),
                        ("num_full", num_full), ("ns_steps", ns_steps)):
        check_static_int(name, value)
    if proj_type == "full":
        raise ValueError("scale_by_gum needs a one-sided proj_type ('std', ...).")
    period = update_proj_gap
    projector = GUMProjector()

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
        n = len(leaves)
        basis = [projector.init(p.shape[g.reduced[0]], g.rank, p.dtype)
                 for p, g in zip(leaves, geoms)]
        mom = [jnp.zeros(g.small_shape, p.dtype) for p, g in zip(leaves, geoms)]
        info = ProjectorLayout(
            projector, tuple(param_name(path) for path, _ in flat),
            tuple(g.reduced for g in geoms), tuple((g.shape[g.reduced[0]],) for g in geoms),
            tuple(tuple(p.shape) for p in leaves), treedef)
        flags = lambda: treedef.unflatten([jnp.asarray(False)] * n)
        return GUMState(jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(seed)),
                        treedef.unflatten(basis), flags(),
                        treedef.unflatten([jnp.asarray(-1.0, jnp.float32)] * n), flags(),
                        flags(), treedef.unflatten(mom), slots, info)

    def update_fn(updates, state, params=None):
        del params
        info: ProjectorLayout = state.layout
        leaves = info.check_updates(updates, "scale_by_gum")
        treedef = info.treedef
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
        geoms = [geometry(g.shape) for g in leaves]
        cols = [treedef.flatten_up_to(t) for t in (state.projector, state.ready, state.overlap)]
        refresh_key = jax.random.fold_in(period_key, n)   # no draw shares it

        def fresh():
            return [steps.refresh_leaf(projector, jax.random.fold_in(refresh_key, i), g,
                                       *(c[i] for c in cols), geom, count, start)
                    for i, (g, geom) in enumerate(zip(leaves, geoms))]

        def kept():
            return [steps.RefreshResult(*(c[i] for c in cols), jnp.asarray(False))
                    for i in range(n)]

        not_ready = ~jnp.all(jnp.stack(cols[1]))
        results = jax.lax.cond(start | not_ready, fresh, kept)
        moms = treedef.flatten_up_to(state.momentum)
        slots = [jnp.where(start, jnp.zeros_like(s), s) for s in state.slots]
        outs, new_moms = [], []
        for i, (g, geom, res) in enumerate(zip(leaves, geoms, results)):
            g32 = g.astype(_wide(g.dtype))
            basis = (res.projector,)
            mom = jnp.where(start, jnp.zeros_like(moms[i]), moms[i]).astype(g32.dtype)
            small = steps.project(g32, basis, geom)
            k = index[i]

            def low(basis=basis, mom=mom, small=small, geom=geom, k=k):
                m = beta * mom + small / (1.0 - q)
                return steps.back_project(newton_schulz(m, ns_steps), basis, geom), m, slots[k]

            def high(basis=basis, mom=mom, small=small, g32=g32, geom=geom, k=k,
                     s=slot_of[i]):
                resid = g32 - steps.back_project(small, basis, geom)
                m = beta * slots[k][s].astype(g32.dtype) + resid / q
                return newton_schulz(m, ns_steps), mom, slots[k].at[s].set(m.astype(
                    slots[k].dtype))

            out, mom, slots[k] = jax.lax.cond(full[i], high, low)
            outs.append(out.astype(g.dtype))
            new_moms.append(mom.astype(moms[i].dtype))
        new_state = GUMState(
            optax.safe_increment(count), state.key,
            treedef.unflatten([r.projector for r in results]),
            treedef.unflatten([r.ready for r in results]),
            treedef.unflatten([r.overlap for r in results]),
            treedef.unflatten([r.refreshed for r in results]),
            treedef.unflatten([full[i] for i in range(n)]),
            treedef.unflatten(new_moms), tuple(slots), info)
        return treedef.unflatten(outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def gum_muon(
    learning_rate: Any, rank: int = 128, update_proj_gap: int = 200, num_full: int = 1,
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

    lowrank = scale_by_gum(rank=rank, update_proj_gap=update_proj_gap, num_full=num_full,
                           beta=beta, ns_steps=ns_steps, proj_type=proj_type, layout=layout,
                           seed=seed)
    return _assemble(learning_rate, lowrank, scale_by_torch_adam(b1, b2, eps), labels=labels,
                     weight_decay=weight_decay, decay_after_update=False)

