"""Flora's compressed first moment: an EMA kept at rank ``r`` behind a random projection.

Flora (Hao et al. 2024, BorealisAI/flora-opt ``flora_opt/optimizers/torch/flora.py``,
``flora_step_``; pip ``flora-opt`` 0.0.3) keeps the first moment of a matrix as
``C`` of shape ``(max, r)`` behind a projection ``B`` (``(d, r)``, ``N(0, 1)/sqrt(r)``
for ``"gaussian"``, side by the ``std`` rule). At 1-based step ``t`` with the
(Adafactor-normalised) update ``u``::

    out = (1 - b1) u + b1 up(C)              # the current step is not compressed
    if t % kappa == 0:                       # resample after the output
        new B;  C <- down_new(up_old(C))
    C <- b1 C + (1 - b1) down(u)

with ``down(x) = x B`` (right side) or ``B^T x`` (left) and ``up(c) = c B^T`` or
``B c``. The first ``B`` is drawn at step 1. The refresh, projection and moment
rotation are :mod:`lowrank_jax.steps` (so a non-finite ``u`` never replaces the
projector), and the state has the same reader fields as
:class:`lowrank_jax.ScaleByLowRankState`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import steps
from lowrank_jax.geometry import LAYOUTS, PROJ_TYPES, leaf_geometry
from lowrank_jax.projectors import get_projector
from lowrank_jax.state_reader import ProjectorLayout, param_name
from lowrank_jax.steps import LeafPlan
from lowrank_jax.transform import check_choice, check_static_int

__all__ = ["CompressedMomentumState", "scale_by_compressed_momentum"]


class CompressedMomentumState(NamedTuple):
    """State of :func:`scale_by_compressed_momentum`.

    Attributes:
      count: int32 number of updates done.
      key: uint32 ``(2,)`` raw PRNG key data.
      projector: per-leaf projector state (the ``(d, r)`` matrix for ``gaussian``).
      ready, overlap, refreshed: as in :class:`lowrank_jax.ScaleByLowRankState`.
      momentum: per-leaf compressed first moment ``C`` (the small shape).
      layout: static description of the leaves (no arrays).
    """

    count: jax.Array
    key: jax.Array
    projector: Any
    ready: Any
    overlap: Any
    refreshed: Any
    momentum: Any
    layout: ProjectorLayout


def scale_by_compressed_momentum(
    b1: float = 0.9,
    *,
    rank: int,
    projector: str | Any = "gaussian",
    update_every: int = 1000,
    proj_type: str = "std",
    seed: int = 0,
    layout: str = "flax",
    projector_dtype: Any = jnp.float32,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """Flora's first moment (see the module docstring); ``update_every`` is Flora's ``kappa``.

    Args:
      b1: momentum decay.
      rank: rank ``r`` (clamped to ``min(shape)`` per leaf).
      projector: ``"gaussian"`` (Flora) or any projector (name or object).
      update_every: resampling period ``kappa`` (1-based steps ``kappa, 2 kappa, ...``).
      proj_type, layout, dimension_numbers, projector_dtype: see
        :func:`lowrank_jax.scale_by_lowrank` (one-sided ``proj_type`` only).
      seed: seed of the random projections.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_compressed_momentum(rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 4))})
    >>> state.momentum["w"].shape
    (8, 2)
    """
    rank = check_static_int("rank", rank)
    update_every = check_static_int("update_every", update_every)
    check_choice("proj_type", proj_type, PROJ_TYPES)
    check_choice("layout", layout, LAYOUTS)
    if proj_type == "full":
        raise ValueError("scale_by_compressed_momentum needs a one-sided proj_type.")
    proj = get_projector(projector)

    def plan_of(name, shape) -> LeafPlan:
        dims = None
        if dimension_numbers is not None:
            dims = (dimension_numbers(name, shape) if callable(dimension_numbers)
                    else None if len(shape) == 2 else dimension_numbers)
        mshape, perm = LeafPlan.matrix_view(name, shape, dims)
        geom = leaf_geometry(mshape, rank, proj_type, layout if perm is None else "flax")
        return LeafPlan(name, shape, perm, geom)

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        try:
            plans = [plan_of(param_name(path), tuple(p.shape)) for path, p in flat]
        except ValueError as err:
            raise ValueError(f"scale_by_compressed_momentum: {err}") from None
        pst, mom = [], []
        for (_, p), pl in zip(flat, plans):
            ax = pl.geom.reduced[0]
            dtype = p.dtype if projector_dtype is None else projector_dtype
            pst.append(proj.init(pl.geom.shape[ax], pl.geom.rank, dtype))
            mom.append(jnp.zeros(pl.geom.small_shape, p.dtype))
        n = len(plans)
        info = ProjectorLayout(proj, tuple(pl.path for pl in plans),
                               tuple(pl.geom.reduced for pl in plans),
                               tuple((pl.geom.shape[pl.geom.reduced[0]],) for pl in plans),
                               tuple(pl.shape for pl in plans), treedef)
        key = jax.random.key_data(jax.random.key(seed))
        flags = lambda v: treedef.unflatten([jnp.asarray(v)] * n)
        return CompressedMomentumState(
            jnp.zeros([], jnp.int32), key, treedef.unflatten(pst), flags(False),
            treedef.unflatten([jnp.asarray(-1.0, jnp.float32)] * n), flags(False),
            treedef.unflatten(mom), info)

    def update_fn(updates, state, params=None):
        del params
        info: ProjectorLayout = state.layout
        grads = info.check_updates(updates, "scale_by_compressed_momentum")
        treedef = info.treedef
        plans = [plan_of(name, shape) for name, shape in zip(info.names, info.shapes)]
        count = state.count
        due = (count + 1) % update_every == 0
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        mats = [pl.to_matrix(u).astype(jnp.float32) for pl, u in zip(plans, grads)]
        pst = treedef.flatten_up_to(state.projector)
        ready = treedef.flatten_up_to(state.ready)
        overlap = treedef.flatten_up_to(state.overlap)
        mom = [c.astype(jnp.float32) for c in treedef.flatten_up_to(state.momentum)]

        old_bases = [steps.bases_of(proj, p, pl.geom, jnp.float32) for p, pl in zip(pst, plans)]
        outs = [(1 - b1) * m + b1 * steps.back_project(c, b, pl.geom)
                for m, c, b, pl in zip(mats, mom, old_bases, plans)]

        def fresh():
            return [steps.refresh_leaf(proj, jax.random.fold_in(step_key, i), mats[i], pst[i],
                                       ready[i], overlap[i], plans[i].geom, count, due)
                    for i in range(len(mats))]

        def kept():
            return [steps.RefreshResult(pst[i], ready[i], overlap[i], jnp.asarray(False))
                    for i in range(len(mats))]

        not_ready = ~jnp.all(jnp.stack(ready)) if ready else jnp.asarray(False)
        results = jax.lax.cond(due | not_ready, fresh, kept) if mats else []

        new_mom = []
        for m, c, old_b, res, was, pl in zip(mats, mom, old_bases, results, ready, plans):
            new_b = steps.bases_of(proj, res.projector, pl.geom, jnp.float32)
            moved = steps.rotation(old_b, new_b, pl.geom)(c)
            c = jnp.where(res.refreshed & was, moved, c)
            new_mom.append(b1 * c + (1 - b1) * steps.project(m, new_b, pl.geom))
        momentum = [c.astype(old.dtype) for c, old in
                    zip(new_mom, treedef.flatten_up_to(state.momentum))]
        out = [pl.from_matrix(o).astype(u.dtype) for pl, o, u in zip(plans, outs, grads)]
        new_state = CompressedMomentumState(
            optax.safe_increment(count), state.key,
            treedef.unflatten([r.projector for r in results]),
            treedef.unflatten([r.ready for r in results]),
            treedef.unflatten([r.overlap for r in results]),
            treedef.unflatten([r.refreshed for r in results]),
            treedef.unflatten(momentum), info)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
