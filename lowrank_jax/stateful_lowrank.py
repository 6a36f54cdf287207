"""``scale_by_stateful_lowrank``: low-rank projection with projectors that own their schedule.

:func:`lowrank_jax.scale_by_lowrank` refreshes every projector on one global
schedule and gives a projector only the gradient. Two methods need more:

* COAP (:mod:`lowrank_jax.coap`) moves its projector by a gradient step that
  reads the inner optimizer's first moment;
* Q-GaLore (:mod:`lowrank_jax.qgalore`) lets every matrix stretch its own
  refresh period (lazy subspace updates), so each leaf has its own schedule.

This wrapper is the same projection algebra (geometry, orientation, inner
optimizer at the small shapes, ``U = scale * Back(N)``) with a per-leaf refresh
decided by the projector itself. A *stateful projector* provides::

    init(d, rank, dtype, ctx) -> state           # before the first refresh
    due(state, count) -> bool                     # refresh at 0-based step `count`?
    compute(key, x, rank, previous, count, ctx) -> state
    basis(state, d, dtype, ctx) -> (d, rank)
    nbytes(d, rank, dtype) -> int                 # exact bytes of the state

with ``x`` the ``(k, d)`` view of the gradient whose last axis is reduced and
``ctx`` a :class:`LeafContext` (whether ``d`` is the weight's input axis, whether
the leaf already has a projector, and the inner first moment at ``(k, r)`` when
the projector sets ``needs_moment = True``).

The state is a :class:`lowrank_jax.transform.ScaleByLowRankState`, so the
readers of projector state and overlap telemetry work unchanged (``residual``
holds ``()`` per leaf).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.geometry import LAYOUTS, LeafGeometry, leaf_geometry
from lowrank_jax.quantized import QuantizedTensor, dequantize
from lowrank_jax.state_reader import ProjectorLayout, param_name
from lowrank_jax.transform import ScaleByLowRankState
from lowrank_jax.tree_util import path_string

__all__ = ["LeafContext", "oriented", "project", "project_back", "scale_by_stateful_lowrank"]

ONE_SIDED = ("std", "reverse_std", "left", "right")


class LeafContext(NamedTuple):
    """What a stateful projector may know about its leaf besides the gradient.

    Attributes:
      reduces_input: ``d`` is the weight's input axis (torch ``in``; GaLore's
        "right" projector). Static Python bool.
      initialized: bool scalar, the leaf already has a projector.
      moment: the inner optimizer's first moment in the ``(k, r)`` orientation of
        ``x @ basis`` (float32), or ``None`` when the projector does not ask.
    """

    reduces_input: bool
    initialized: Any = None
    moment: Any = None


def oriented(g: jax.Array, axis: int) -> jax.Array:
    """The ``(k, d)`` view of a 2-D ``g`` whose last axis is the reduced ``axis``."""
    return g if axis == 1 else g.T


def project(g: jax.Array, basis: jax.Array, axis: int) -> jax.Array:
    """``g`` reduced along ``axis`` by ``basis`` ``(d, r)``: ``g B`` or ``B^T g``."""
    return g @ basis if axis == 1 else basis.T @ g


def project_back(n: jax.Array, basis: jax.Array, axis: int) -> jax.Array:
    """Inverse map of :func:`project` for the small ``n``: ``n B^T`` or ``B n``."""
    return n @ basis.T if axis == 1 else basis @ n


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _first_moments(inner_state, updates, shapes) -> list:
    """Per leaf (flatten order) the inner first moment ``mu`` as float32 at its small shape."""
    mu = optax.tree_utils.tree_get(inner_state, "mu")
    if mu is None:
        raise ValueError("this projector needs the inner optimizer's first moment 'mu' "
                         "(an Adam-like inner, e.g. scale_by_reference_adam).")
    leaves = jax.tree.structure(updates).flatten_up_to(mu)
    out = []
    for m, shape in zip(leaves, shapes):
        if isinstance(m, QuantizedTensor):
            m = dequantize(m, shape, jnp.float32, signed=True)
        out.append(jnp.asarray(m, jnp.float32))
    return out


def scale_by_stateful_lowrank(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    projector: Any,
    scale: float = 1.0,
    proj_type: str = "std",
    layout: str = "flax",
    seed: int = 0,
    rank_ratio: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Project each 2-D gradient with a stateful projector, run ``inner`` there, map back.

    For a leaf ``G`` (``(a, b)``) reduced along axis ``ax`` to rank ``r``: when the
    projector says so (or the leaf has no projector yet) its state is recomputed
    from the ``(k, d)`` view ``x`` of ``G`` (a non-finite gradient or result keeps
    the previous state); then ``R = P(G)`` (``(k, r)`` or ``(r, k)``), ``N =
    inner(R)`` and the output is ``scale * Back(N)``.

    Args:
      inner: an optax transformation that needs no params (its state lives at the
        small shapes).
      rank: target rank (clamped to ``min(shape)`` per leaf).
      projector: a stateful projector (see the module docstring).
      scale: factor on the back-projected update.
      proj_type: one-sided rule of :mod:`lowrank_jax.geometry` (``"std"``, ...).
      layout: ``"flax"`` kernels ``(in, out)`` or ``"torch"`` weights ``(out, in)``.
      seed: seed of the projector's random draws.
      rank_ratio: if given, a leaf's rank is ``max(min(shape) // rank_ratio, 1)``
        (COAP's ``rank_ratio_matrix``), which overrides ``rank``.

    Returns:
      An optax ``GradientTransformationExtraArgs`` whose state is a
      :class:`lowrank_jax.transform.ScaleByLowRankState`.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}.")
    if proj_type not in ONE_SIDED:
        raise ValueError(f"proj_type={proj_type!r} is not supported here; use one of "
                         f"{list(ONE_SIDED)}.")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; use one of {list(LAYOUTS)}.")
    if rank_ratio is not None and not rank_ratio > 0:
        raise ValueError(f"rank_ratio must be > 0, got {rank_ratio!r}.")
    for method in ("init", "due", "compute", "basis", "nbytes"):
        if not callable(getattr(projector, method, None)):
            raise TypeError(f"projector={projector!r} has no {method}() method; see "
                            "lowrank_jax.stateful_lowrank for the protocol.")
    needs_moment = bool(getattr(projector, "needs_moment", False))
    inner = optax.with_extra_args_support(inner)
    in_axis = 1 if layout == "torch" else 0

    def geometry(shape) -> LeafGeometry:
        geom = leaf_geometry(tuple(shape), rank, proj_type, layout)
        if rank_ratio is None:
            return geom
        return LeafGeometry(geom.shape, geom.reduced, max(int(min(shape) // rank_ratio), 1))

    def context(geom: LeafGeometry, initialized=None, moment=None) -> LeafContext:
        return LeafContext(geom.reduced[0] == in_axis, initialized, moment)

    def init_fn(params):
        def leaf(path, p):
            if p.ndim != 2:
                raise ValueError(f"leaf {path_string(path)!r} has shape {tuple(p.shape)}; only "
                                 "2-D matrices can be projected. Exclude it (labels=...).")
            geom = geometry(p.shape)
            ax = geom.reduced[0]
            state = projector.init(p.shape[ax], geom.rank, p.dtype, context(geom))
            return (state, jnp.asarray(False), jnp.asarray(-1.0, jnp.float32),
                    jnp.zeros(geom.small_shape, p.dtype), ())

        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        per_leaf = [leaf(path, p) for path, p in flat]
        pstate, ready, overlap, small, res = (treedef.unflatten([x[i] for x in per_leaf])
                                              for i in range(5))
        inner_state = inner.init(small)
        if needs_moment:
            _first_moments(inner_state, small, [geometry(p.shape).small_shape
                                                for _, p in flat])
        key = jax.random.key_data(jax.random.key(seed))
        geoms = [geometry(p.shape) for _, p in flat]
        info = ProjectorLayout(
            projector, tuple(param_name(path) for path, _ in flat),
            tuple(g.reduced for g in geoms), tuple((g.shape[g.reduced[0]],) for g in geoms),
            tuple(tuple(p.shape) for _, p in flat), treedef,
            contexts=tuple(context(g) for g in geoms))
        flags = treedef.unflatten([jnp.asarray(False)] * len(flat))
        return ScaleByLowRankState(jnp.zeros([], jnp.int32), key, pstate, ready, overlap,
                                   flags, inner_state, res, info)

    def update_fn(updates, state, params=None, **extra_args):
        del params
        count = state.count
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        leaves, treedef = jax.tree.flatten(updates)
        geoms = [geometry(g.shape) for g in leaves]
        moments = (_first_moments(state.inner_state, updates, [g.small_shape for g in geoms])
                   if needs_moment else [None] * len(leaves))
        cols = [treedef.flatten_up_to(t) for t in (state.projector, state.ready, state.overlap)]

        def refresh_leaf(i, g, pstate, ready, overlap):
            geom = geoms[i]
            ax = geom.reduced[0]
            d = g.shape[ax]
            moment = moments[i]
            if moment is not None and ax == 0:
                moment = moment.T                      # small (r, k) -> (k, r)

            def refresh():
                ctx = context(geom, ready, moment)
                key = jax.random.fold_in(step_key, i)
                # one matrix at a time under vmap (several seeds), as compute_unbatched does;
                # everything batched is an argument, nothing is closed over
                solve = jax.custom_batching.sequential_vmap(
                    lambda k, x, prev, c, init, mom: projector.compute(
                        k, x, geom.rank, prev, c,
                        context(geom, init, mom if needs_moment else None)))
                new = solve(key, oriented(g, ax), pstate, count, ready,
                            jnp.zeros(()) if moment is None else moment)
                ok = _all_finite(g) & _all_finite(new)
                old_b = projector.basis(pstate, d, jnp.float32, ctx)
                new_b = projector.basis(new, d, jnp.float32, ctx)
                ov = jnp.sum((old_b.T @ new_b) ** 2) / geom.rank
                ov = jnp.where(ready, ov, -1.0).astype(jnp.float32)
                kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, pstate)
                return kept, ok | ready, jnp.where(ok, ov, overlap), ok

            due = projector.due(pstate, count) | ~ready
            return jax.lax.cond(due, refresh,
                                lambda: (pstate, ready, overlap, jnp.asarray(False)))

        refreshed = [refresh_leaf(i, g, *(c[i] for c in cols)) for i, g in enumerate(leaves)]
        new_proj, new_ready, new_overlap, new_flags = (
            treedef.unflatten([r[j] for r in refreshed]) for j in range(4))
        bases = [projector.basis(p, g.shape[geom.reduced[0]], g.dtype, context(geom))
                 for g, p, geom in zip(leaves, treedef.flatten_up_to(new_proj), geoms)]
        small = treedef.unflatten([project(g, b, geom.reduced[0])
                                   for g, b, geom in zip(leaves, bases, geoms)])
        small_out, inner_state = inner.update(small, state.inner_state, None, **extra_args)
        out = [(scale * project_back(n.astype(g.dtype), b, geom.reduced[0])).astype(g.dtype)
               for g, n, b, geom in zip(leaves, treedef.flatten_up_to(small_out), bases, geoms)]
        new_state = ScaleByLowRankState(optax.safe_increment(count), state.key, new_proj,
                                        new_ready, new_overlap, new_flags, inner_state,
                                        state.residual, state.layout)
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

