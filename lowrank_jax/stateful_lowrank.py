"""``scale_by_stateful_lowrank``: the core wrapper for projectors that own their schedule.

An extension of the projector protocol of :mod:`lowrank_jax.projectors`, and the one
place in the package for projectors that cannot live under
:func:`lowrank_jax.scale_by_lowrank`'s single global refresh schedule:

* COAP (:mod:`lowrank_jax.coap`) moves its projector by a gradient step that
  reads the inner optimizer's first moment;
* Q-GaLore (:mod:`lowrank_jax.qgalore`) lets every matrix stretch its own
  refresh period (lazy subspace updates), so each leaf has its own schedule.

Everything else is the core's: the steps of :mod:`lowrank_jax.steps` (geometry,
orientation, the sanitised gradient a decomposition sees, the non-finite policy,
projection and back-projection), the inner optax transformation at the small
shapes, a residual rule of :mod:`lowrank_jax.residuals` (default GaLore's
``scale * Back(N)``) and the state :class:`lowrank_jax.ScaleByLowRankState`, so
:func:`lowrank_jax.projector_bases`, :func:`~lowrank_jax.projector_overlaps` and
:func:`~lowrank_jax.refreshed_leaves` read it unchanged. A *stateful projector*
adds ``due`` and a per-leaf context to the core protocol::

    init(d, rank, dtype, ctx) -> state           # before the first refresh
    due(state, count) -> bool                     # refresh at 0-based step `count`?
    compute(key, x, rank, previous, count, ctx) -> state
    basis(state, d, dtype, ctx) -> (d, rank)
    nbytes(d, rank, dtype) -> int                 # exact bytes of the state

with ``x`` the ``(k, d)`` view of the (sanitised) gradient whose last axis is
reduced and ``ctx`` a :class:`LeafContext` (whether ``d`` is the weight's input
axis, whether the leaf already has a projector, and the inner first moment at
``(k, r)`` when the projector sets ``needs_moment = True``). Each leaf's refresh
is its own ``lax.cond`` (the schedules differ per leaf).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import steps
from lowrank_jax.geometry import LAYOUTS, LeafGeometry, leaf_geometry
from lowrank_jax.quantized import QuantizedTensor, dequantize
from lowrank_jax.residuals import ResidualInputs, get_residual
from lowrank_jax.state_reader import ProjectorLayout, param_name
from lowrank_jax.transform import ScaleByLowRankState
from lowrank_jax.tree_util import path_string

__all__ = ["STATEFUL_PROTOCOL", "LeafContext", "scale_by_stateful_lowrank"]

ONE_SIDED = ("std", "reverse_std", "left", "right")
#: the methods a stateful projector provides
STATEFUL_PROTOCOL = ("init", "due", "compute", "basis", "nbytes")


class LeafContext(NamedTuple):
    """What a stateful projector may know about its leaf besides the gradient.

    Attributes:
      reduces_input: ``d`` is the weight's input axis (torch ``in``; GaLore's
        "right" projector). Static Python bool.
      initialized: bool scalar, the leaf already has a projector.
      moment: the inner optimizer's first moment in the ``(k, r)`` orientation of
        ``x @ basis`` (float32), or ``None`` when the projector does not ask.
      rank: the leaf's rank ``r`` (static Python int).
    """

    reduces_input: bool
    initialized: Any = None
    moment: Any = None
    rank: int | None = None


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


def _check_projector(projector: Any) -> None:
    for method in STATEFUL_PROTOCOL:
        if not callable(getattr(projector, method, None)):
            raise TypeError(f"projector={projector!r} has no {method}() method; see "
                            "lowrank_jax.stateful_lowrank for the protocol.")


def scale_by_stateful_lowrank(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    projector: Any,
    scale: float | None = None,
    residual: str | Any | None = None,
    proj_type: str = "std",
    layout: str = "flax",
    seed: int = 0,
    rank_ratio: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Project each 2-D gradient with a stateful projector, run ``inner`` there, map back.

    For a leaf ``G`` (``(a, b)``) reduced along axis ``ax`` to rank ``r``: when the
    projector says so (or the leaf has no projector yet) its state is recomputed
    from the ``(k, d)`` view ``x`` of the sanitised ``G`` (a non-finite gradient or
    result keeps the previous state, as :func:`lowrank_jax.steps.refresh_leaf`); then
    ``R = P(G)`` (``(k, r)`` or ``(r, k)``), ``N = inner(R)`` and the residual rule
    makes the update from ``(G, R, N)`` (default ``scale * Back(N)``).

    Args:
      inner: an optax transformation that needs no params (its state lives at the
        small shapes).
      rank: target rank (clamped to ``min(shape)`` per leaf).
      projector: a stateful projector (see the module docstring).
      scale: the default residual rule's factor (GaLore's ``scale``, 0.25 when ``None``).
      residual: a residual rule (:mod:`lowrank_jax.residuals`: ``None`` for GaLore's
        back-projection, ``"fira"``, ``"apollo"``, ... or a rule object).
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
    _check_projector(projector)
    rule = get_residual(residual, scale)
    needs_moment = bool(getattr(projector, "needs_moment", False))
    inner = optax.with_extra_args_support(inner)
    in_axis = 1 if layout == "torch" else 0

    def geometry(shape) -> LeafGeometry:
        geom = leaf_geometry(tuple(shape), rank, proj_type, layout)
        if rank_ratio is None:
            return geom
        return LeafGeometry(geom.shape, geom.reduced, max(int(min(shape) // rank_ratio), 1))

    def context(geom: LeafGeometry, initialized=None, moment=None) -> LeafContext:
        return LeafContext(geom.reduced[0] == in_axis, initialized, moment, geom.rank)

    def basis(pstate, geom: LeafGeometry, dtype) -> jax.Array:
        return projector.basis(pstate, geom.shape[geom.reduced[0]], dtype, context(geom))

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        geoms = []
        for path, p in flat:
            if p.ndim != 2:
                raise ValueError(f"leaf {path_string(path)!r} has shape {tuple(p.shape)}; only "
                                 "2-D matrices can be projected. Exclude it (labels=...).")
            geoms.append(geometry(p.shape))
        pstates = [projector.init(p.shape[g.reduced[0]], g.rank, p.dtype, context(g))
                   for (_, p), g in zip(flat, geoms)]
        small = treedef.unflatten([jnp.zeros(g.small_shape, p.dtype)
                                   for (_, p), g in zip(flat, geoms)])
        inner_state = inner.init(small)
        if needs_moment:
            _first_moments(inner_state, small, [g.small_shape for g in geoms])
        n = len(flat)
        info = ProjectorLayout(
            projector, tuple(param_name(path) for path, _ in flat),
            tuple(g.reduced for g in geoms), tuple((g.shape[g.reduced[0]],) for g in geoms),
            tuple(tuple(p.shape) for _, p in flat), treedef,
            contexts=tuple(context(g) for g in geoms))
        return ScaleByLowRankState.initial(pstates, treedef, seed, inner_state,
                                           [rule.init() for _ in range(n)], info)

    def refresh_leaf(key, g, geom, pstate, ready, overlap, count, moment
                     ) -> steps.RefreshResult:
        """The leaf's new projector when it is due (its own ``lax.cond``)."""
        ax = geom.reduced[0]
        if moment is not None and ax == 0:
            moment = moment.T                      # small (r, k) -> (k, r)

        def refresh():
            # one matrix at a time under vmap (several seeds), as steps.compute_projector
            # does; everything batched is an argument, nothing is closed over
            solve = jax.custom_batching.sequential_vmap(
                lambda k, x, prev, c, init, mom: projector.compute(
                    k, x, geom.rank, prev, c,
                    context(geom, init, mom if needs_moment else None)))
            new = solve(key, steps.oriented(steps.sanitize(g), ax), pstate, count, ready,
                        jnp.zeros(()) if moment is None else moment)
            ok = steps.all_finite(g) & steps.all_finite(new)
            old_b, new_b = basis(pstate, geom, jnp.float32), basis(new, geom, jnp.float32)
            ov = jnp.where(ready, jnp.sum((old_b.T @ new_b) ** 2) / geom.rank, -1.0)
            kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, pstate)
            return steps.RefreshResult(kept, ok | ready,
                                       jnp.where(ok, ov.astype(jnp.float32), overlap), ok)

        def keep():
            return steps.RefreshResult(pstate, ready, overlap, jnp.asarray(False))

        return jax.lax.cond(projector.due(pstate, count) | ~ready, refresh, keep)

    def update_fn(updates, state, params=None, **extra_args):
        del params
        info: ProjectorLayout = state.layout
        grads = info.check_updates(updates, "scale_by_stateful_lowrank")
        treedef = info.treedef
        count = state.count
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        geoms = [geometry(g.shape) for g in grads]
        moments = (_first_moments(state.inner_state, updates, [g.small_shape for g in geoms])
                   if needs_moment else [None] * len(grads))
        cols = [treedef.flatten_up_to(t) for t in (state.projector, state.ready, state.overlap)]
        results = [refresh_leaf(jax.random.fold_in(step_key, i), g, geom, *(c[i] for c in cols),
                                count, moments[i])
                   for i, (g, geom) in enumerate(zip(grads, geoms))]
        bases = [(basis(r.projector, geom, g.dtype),) for r, geom, g in
                 zip(results, geoms, grads)]
        small = [steps.project(g, b, geom) for g, b, geom in zip(grads, bases, geoms)]
        small_out, inner_state = inner.update(treedef.unflatten(small), state.inner_state, None,
                                              **extra_args)
        outs, res_states = [], []
        for g, r, n, b, geom, rs in zip(grads, small, treedef.flatten_up_to(small_out), bases,
                                        geoms, treedef.flatten_up_to(state.residual)):
            x = ResidualInputs(g, r, n, lambda s, b=b, geom=geom: steps.back_project(s, b, geom),
                               geom.reduced[0])
            out, rs = rule.apply(x, rs)
            outs.append(out.astype(g.dtype))
            res_states.append(rs)
        return treedef.unflatten(outs), state.advanced(results, treedef, inner_state,
                                                       res_states)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
