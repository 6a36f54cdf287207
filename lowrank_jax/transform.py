"""``scale_by_lowrank``: run any optax transformation on low-rank projected gradients.

For every 2-D leaf ``G`` the wrapper keeps a projector (refreshed every
``update_every`` steps, under ``lax.cond`` so other steps pay nothing), projects
``R = P(G)`` to the small shape, runs the inner transformation on the tree of
small gradients with its state kept at the small shape, and maps the inner
output ``N`` back: ``U = scale * Back(N)`` (+ a residual term for Fira).

Reference: GaLore (Zhao et al. 2024, jiaweizzhao/GaLore
``galore_torch/adamw.py`` and ``galore_projector.py``); Fira (Chen et al. 2024,
xichen-fy/Fira ``optimizer_torch/fira_adamw.py``).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax import residuals as residuals_lib
from lowrank_jax.geometry import LAYOUTS, PROJ_TYPES, LeafGeometry, leaf_geometry
from lowrank_jax.projectors import compute_unbatched, get_projector
from lowrank_jax.tree_util import map_unzip, path_string

__all__ = ["MOMENTS", "REFRESH_RULES", "RESIDUALS", "CompressedMomentumState",
           "ScaleByLowRankState", "scale_by_compressed_momentum", "scale_by_lowrank"]

MOMENTS = ("keep", "reset", "transport")
REFRESH_RULES = ("galore", "first_and_multiples")
RESIDUALS = (None, "fira", "apollo", "signsgd", "sgd")
APOLLO_SCALINGS = ("channel", "tensor")


class ScaleByLowRankState(NamedTuple):
    """State of :func:`scale_by_lowrank`.

    Attributes:
      count: int32 number of updates done.
      key: uint32 ``(2,)`` raw PRNG key data (refresh ``t`` of leaf ``i`` uses
        ``fold_in(fold_in(key, t), i)``, so no key is consumed between refreshes).
      projector: per-leaf projector state (for ``proj_type='full'`` a pair
        ``(left, right)``): an orthonormal basis ``(d, r)`` for ``svd``/``sara``/
        ``random``, ``DCTState(indices)`` for ``dct``.
      ready: per-leaf bool, whether a projector has been computed successfully.
      overlap: per-leaf float32, ``||B_old^T B_new||_F^2 / r`` at the last
        refresh (``-1`` until the second refresh): the subspace-change telemetry.
      inner_state: the inner transformation's state, on the small shapes.
      residual: per-leaf residual-rule state (``()`` when none).
    """

    count: jax.Array
    key: jax.Array
    projector: Any
    ready: Any
    overlap: Any
    inner_state: optax.OptState
    residual: Any


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(choices)}.")


def _check_static_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, jax.Array) or hasattr(value, "aval"):
        raise ValueError(
            f"{name} must be a Python int, got an array; with optax.inject_hyperparams pass "
            f"static_args=('rank', 'update_proj_gap') so it stays static.")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


# ----------------------------------------------------------------------------
# per-leaf projection algebra (stored orientation; ``basis`` is ``(d, r)``)


def _oriented(g: jax.Array, axis: int) -> jax.Array:
    """The ``(k, d)`` view of ``g`` whose last axis is the reduced ``axis``."""
    return g if axis == 1 else g.T


def _project(g, bases, geom: LeafGeometry):
    if geom.reduced == (1,):
        return g @ bases[0]
    if geom.reduced == (0,):
        # P^T materialised (a small (r, d) copy) so this is a plain row-major matmul:
        # XLA:CPU otherwise folds the transpose into a dot that takes its slower path
        # (measured: 9% off galore_adamw's update in benchmarks/optimizer_step.py)
        return jax.lax.optimization_barrier(bases[0].T) @ g
    left, right = bases
    return left.T @ g @ right


def _back(n, bases, geom: LeafGeometry):
    if geom.reduced == (1,):
        return n @ bases[0].T
    if geom.reduced == (0,):
        return bases[0] @ n
    left, right = bases
    return left @ n @ right.T


def _rotation(old_bases, new_bases, geom: LeafGeometry):
    """Map small coordinates from the old basis to the new one (first moment)."""
    if geom.reduced == (1,):
        return lambda m: m @ (old_bases[0].T @ new_bases[0])
    if geom.reduced == (0,):
        return lambda m: (new_bases[0].T @ old_bases[0]) @ m
    (lo, ro), (ln, rn) = old_bases, new_bases
    return lambda m: (ln.T @ lo) @ m @ (ro.T @ rn)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def scale_by_lowrank(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    projector: str | Any = "svd",
    update_every: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    moments: str = "keep",
    residual: str | None = None,
    seed: int = 0,
    layout: str = "flax",
    refresh_rule: str = "galore",
    fira_gamma: float = 1.01,
    apollo_scaling: str = "channel",
    apollo_scale_front: bool = False,
    density: float | None = None,
    stagger: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Project each 2-D gradient to rank ``rank``, run ``inner`` there, map back.

    Every leaf of the tree this transformation sees must be a 2-D matrix (route
    other leaves elsewhere with ``optax.partition``, as the aliases do).

    Args:
      inner: an optax transformation that does not need ``params`` (e.g.
        :func:`scale_by_reference_adam`, ``optax.scale_by_adam``,
        ``optax.scale_by_factored_rms``); its state lives at the small shapes.
      rank: target rank ``r``; a leaf with ``min(shape) < r`` uses ``min(shape)``
        (the reference's SVD slice does the same) and a warning names it.
      projector: ``"svd"`` (GaLore), ``"sara"``, ``"random"`` (orthonormal,
        GoLore), ``"gaussian"`` (APOLLO/Flora), ``"dct"``, ``"rsvd"`` (randomized
        SVD), ``"columns"`` (FRUGAL's random coordinates), or a projector object.
      update_every: refresh period ``T``.
      scale: factor on the back-projected update (GaLore's ``scale``, Fira's alpha).
      proj_type: ``"std"`` (reduce the smaller dimension: the reference),
        ``"reverse_std"`` (what ``optax.contrib.galore`` does), ``"left"`` (reduce
        ``out``), ``"right"`` (reduce ``in``), ``"full"`` (both).
      moments: on refresh, ``"keep"`` the inner state (reference), ``"reset"`` it
        to ``inner.init`` (FRUGAL; the step count restarts too) or
        ``"transport"`` the first moment ``mu`` into the new basis
        (``mu <- mu B_old^T B_new``, GoLore; other state kept).
      residual: ``None`` (GaLore: the complement of the subspace gets nothing),
        ``"fira"`` (scaled residual with the norm-growth limiter), ``"apollo"``
        (APOLLO: no back-projection; the output is the raw gradient times the
        ratio ``||N|| / ||R||``, channel- or tensor-wise, limited as Fira's),
        ``"signsgd"`` (FRUGAL: adds the state-free ``sign(G - P P^T G)``) or
        ``"sgd"`` (FRUGAL: adds ``G - P P^T G``).
      seed: seed of the random projectors.
      layout: ``"flax"`` for kernels ``(in, out)``, ``"torch"`` for ``(out, in)``.
      refresh_rule: ``"galore"`` refreshes at 1-based steps ``1, T+1, 2T+1, ...``;
        ``"first_and_multiples"`` at ``1, T, 2T, ...`` (the DCT reference).
      fira_gamma: Fira's (and APOLLO's) norm-growth limit.
      apollo_scaling: ``"channel"`` (one factor per index of the non-projected
        axis) or ``"tensor"`` (one factor per matrix), for ``residual="apollo"``.
      apollo_scale_front: APOLLO's ``scale_front``: ``sqrt(scale)`` multiplies the
        update before the norm-growth limiter (else after it).
      density: if given, each leaf's rank is ``max(1, int(density * d))`` with ``d``
        the reduced dimension (FRUGAL's ``density``), capped by ``rank``.
      stagger: spread the refreshes of the ``n`` leaves over the period: leaf ``i``
        (tree order) gets the offset ``o_i = (i * T) // n`` and, after the first
        refresh at step 1, refreshes when ``refresh_rule`` says so for step
        ``t - o_i`` and ``t > T`` (so no step pays for every SVD). Leaves with the
        same offset share one conditional. ``False`` (default): all leaves together.

    Returns:
      An optax ``GradientTransformationExtraArgs`` whose state is a
      :class:`ScaleByLowRankState`.

    >>> import jax.numpy as jnp, optax
    >>> from lowrank_jax.inner import scale_by_reference_adam
    >>> tx = scale_by_lowrank(scale_by_reference_adam(), rank=2)
    >>> params = {"w": jnp.ones((8, 4))}
    >>> state = tx.init(params)
    >>> state.inner_state.mu["w"].shape   # kernel (in=8, out=4): reduce out
    (8, 2)
    """
    rank = _check_static_int("rank", rank)
    update_every = _check_static_int("update_every", update_every)
    _check_choice("proj_type", proj_type, PROJ_TYPES)
    _check_choice("moments", moments, MOMENTS)
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("refresh_rule", refresh_rule, REFRESH_RULES)
    _check_choice("residual", residual, RESIDUALS)
    _check_choice("apollo_scaling", apollo_scaling, APOLLO_SCALINGS)
    if residual in ("fira", "apollo") and proj_type == "full":
        raise ValueError(f"residual={residual!r} needs a one-sided proj_type ('std', "
                         "'reverse_std', 'left' or 'right'); its norms run along the projected "
                         "axis.")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}.")
    if stagger and moments == "reset":
        raise ValueError("stagger=True cannot be combined with moments='reset' (the inner "
                         "state's step count is shared by all leaves); use moments='keep'.")
    proj = get_projector(projector)
    inner = optax.with_extra_args_support(inner)

    def geometry(shape) -> LeafGeometry:
        geom = leaf_geometry(tuple(shape), rank, proj_type, layout)
        if density is None:
            return geom
        leaf_rank = min([geom.rank] + [max(1, int(density * geom.shape[ax]))
                                       for ax in geom.reduced])
        return LeafGeometry(geom.shape, geom.reduced, leaf_rank)

    def init_leaf(path, p):
        if p.ndim != 2:
            raise ValueError(
                f"scale_by_lowrank: leaf {path_string(path)!r} has shape {tuple(p.shape)}; only "
                "2-D matrices can be projected. Exclude it from the projected set (labels=...).")
        geom = geometry(p.shape)
        if geom.rank < rank and density is None:
            warnings.warn(
                f"rank={rank} exceeds min{tuple(p.shape)} for {path_string(path)!r}; "
                f"using rank {geom.rank} for this leaf.", stacklevel=3)
        states = tuple(proj.init(p.shape[ax], geom.rank, p.dtype) for ax in geom.reduced)
        small = jnp.zeros(geom.small_shape, p.dtype)
        res = residuals_lib.init_state(residual)
        return (states if len(states) == 2 else states[0], jnp.asarray(False),
                jnp.asarray(-1.0, jnp.float32), small, res)

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        per_leaf = [init_leaf(path, p) for path, p in flat]
        unz = [treedef.unflatten([x[i] for x in per_leaf]) for i in range(5)]
        projector_state, ready, overlap, small, res = unz
        inner_state = inner.init(small)
        try:
            jax.eval_shape(lambda g, s: inner.update(g, s, None), small, inner_state)
        except Exception as err:
            raise ValueError(
                "scale_by_lowrank: the inner transformation cannot run without params "
                f"({type(err).__name__}: {err}). It runs on projected gradients, which have no "
                "matching parameters: use a transformation that does not need params (e.g. "
                "scale_by_reference_adam) and put weight decay after the wrapper.") from err
        if moments == "transport":
            try:
                optax.tree_utils.tree_get(inner_state, "mu")
            except (KeyError, ValueError) as err:
                raise ValueError("moments='transport' needs an inner state with a 'mu' field "
                                 "(Adam-like); use moments='keep' or 'reset'.") from err
        key = jax.random.key_data(jax.random.key(seed))
        return ScaleByLowRankState(jnp.zeros([], jnp.int32), key, projector_state, ready,
                                   overlap, inner_state, res)

    def refresh_due(count):
        if refresh_rule == "galore":
            return count % update_every == 0
        step = count + 1
        return (step == 1) | (step % update_every == 0)

    def leaf_offsets(n_leaves: int) -> list[int]:
        return [(i * update_every) // n_leaves if stagger else 0 for i in range(n_leaves)]

    def offset_due(count, offset: int):
        if offset == 0:
            return refresh_due(count)
        return (count >= update_every) & refresh_due(count - offset)

    def bases_of(pstate, geom: LeafGeometry, dtype):
        states = pstate if len(geom.reduced) == 2 else (pstate,)
        return tuple(proj.basis(s, geom.shape[ax], dtype)
                     for s, ax in zip(states, geom.reduced))

    def update_fn(updates, state, params=None, **extra_args):
        del params
        count = state.count
        due = refresh_due(count)
        base_key = jax.random.wrap_key_data(state.key)
        step_key = jax.random.fold_in(base_key, count)
        leaf_index = jax.tree.unflatten(jax.tree.structure(updates),
                                        list(range(len(jax.tree.leaves(updates)))))

        offsets = leaf_offsets(len(jax.tree.leaves(updates)))

        def refresh_leaf(g, pstate, ready, overlap, index):
            """New projector state where this leaf is due (or never computed) and finite."""
            due = offset_due(count, offsets[index])
            geom = geometry(g.shape)
            key = jax.random.fold_in(step_key, index)
            states = pstate if len(geom.reduced) == 2 else (pstate,)
            new = tuple(
                compute_unbatched(proj, jax.random.fold_in(key, j), _oriented(g, ax), geom.rank,
                                  s, count)
                for j, (s, ax) in enumerate(zip(states, geom.reduced)))
            new = new if len(new) == 2 else new[0]
            ok = (due | ~ready) & _all_finite(g) & _all_finite(new)
            old_b = bases_of(pstate, geom, jnp.float32)
            new_b = bases_of(new, geom, jnp.float32)
            ov = sum(jnp.sum((o.T @ n) ** 2) for o, n in zip(old_b, new_b))
            ov = ov / (geom.rank * len(new_b))
            ov = jnp.where(ready, ov, -1.0).astype(jnp.float32)
            return (jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, pstate), ok | ready,
                    jnp.where(ok, ov, overlap), ok & ready)

        def staggered_refresh(refresh_leaf):
            """One conditional per offset group: a step refreshes only the due leaves."""
            treedef = jax.tree.structure(updates)
            cols = [treedef.flatten_up_to(t) for t in
                    (updates, state.projector, state.ready, state.overlap)]
            out: list[Any] = [None] * len(offsets)
            for off in sorted(set(offsets)):
                idx = [i for i, o in enumerate(offsets) if o == off]
                kept = [(cols[1][i], cols[2][i], cols[3][i], jnp.zeros_like(cols[2][i]))
                        for i in idx]
                fresh = lambda idx=idx: [refresh_leaf(*(c[i] for c in cols), i) for i in idx]
                not_ready = ~jnp.all(jnp.stack([cols[2][i] for i in idx]))
                group = jax.lax.cond(offset_due(count, off) | not_ready, fresh,
                                     lambda kept=kept: kept)
                for i, res in zip(idx, group):
                    out[i] = res
            return tuple(treedef.unflatten([o[k] for o in out]) for k in range(4))

        def refresh_all():
            return map_unzip(refresh_leaf, updates, state.projector, state.ready, state.overlap,
                             leaf_index, n_out=4)

        def keep_all():
            return (state.projector, state.ready, state.overlap,
                    jax.tree.map(lambda r: jnp.zeros_like(r), state.ready))

        # one conditional for all leaves: steps between refreshes run no SVD and
        # pay for a single branch, not one per matrix
        ready_leaves = jax.tree.leaves(state.ready)
        anything_due = due | ~jnp.all(jnp.stack(ready_leaves)) if ready_leaves else due
        if stagger and ready_leaves:
            new_proj, new_ready, new_overlap, rotated = staggered_refresh(refresh_leaf)
        else:
            new_proj, new_ready, new_overlap, rotated = jax.lax.cond(
                anything_due, refresh_all, keep_all)

        # each leaf's basis is materialised once per step (for DCT it is built
        # from indices) and shared by the projection and the back-projection
        bases = jax.tree.map(lambda g, p: bases_of(p, geometry(g.shape), g.dtype),
                             updates, new_proj)
        small = jax.tree.map(lambda g, b: _project(g, b, geometry(g.shape)), updates, bases)

        inner_state = state.inner_state
        if moments == "reset":
            fresh = inner.init(jax.tree.map(jnp.zeros_like, small))
            inner_state = jax.tree.map(lambda a, b: jnp.where(due, a, b), fresh, inner_state)
        elif moments == "transport":
            mu = optax.tree_utils.tree_get(inner_state, "mu")

            def transport(g, m, old, new, did):
                geom = geometry(g.shape)
                rot = _rotation(bases_of(old, geom, jnp.float32), bases_of(new, geom, jnp.float32),
                                geom)
                return jnp.where(did, rot(m.astype(jnp.float32)).astype(m.dtype), m)

            mu = jax.tree.map(transport, updates, mu, state.projector, new_proj, rotated)
            inner_state = optax.tree_utils.tree_set(inner_state, mu=mu)

        small_out, inner_state = inner.update(small, inner_state, None, **extra_args)

        def finish(g, r, n, bases, res_state):
            geom = geometry(g.shape)
            if residual == "apollo":
                out, res_state = residuals_lib.apollo(
                    g, r, n, geom.reduced[0], res_state, scaling=apollo_scaling, scale=scale,
                    scale_front=apollo_scale_front, gamma=fira_gamma)
                return out.astype(g.dtype), res_state
            out = scale * _back(n.astype(g.dtype), bases, geom)
            if residual in ("signsgd", "sgd"):
                free = g - _back(r, bases, geom)
                out = out + (jnp.sign(free) if residual == "signsgd" else free)
            if residual == "fira":
                extra, res_state = residuals_lib.fira(
                    g, r, n, scale * _back(r, bases, geom), geom.reduced[0], res_state,
                    gamma=fira_gamma)
                out = out + extra
            return out.astype(g.dtype), res_state

        out, res = map_unzip(finish, updates, small, small_out, bases, state.residual, n_out=2)
        new_state = ScaleByLowRankState(
            optax.safe_increment(count), state.key, new_proj, new_ready, new_overlap,
            inner_state, res)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class CompressedMomentumState(NamedTuple):
    """State of :func:`scale_by_compressed_momentum`.

    Attributes:
      count: int32 number of updates done.
      key: uint32 ``(2,)`` raw PRNG key data.
      projector: per-leaf projector state (the ``(d, r)`` matrix for ``gaussian``).
      momentum: per-leaf compressed first moment ``C`` (the small shape).
    """

    count: jax.Array
    key: jax.Array
    projector: Any
    momentum: Any


def scale_by_compressed_momentum(
    b1: float = 0.9,
    *,
    rank: int,
    projector: str | Any = "gaussian",
    update_every: int = 1000,
    proj_type: str = "std",
    seed: int = 0,
    layout: str = "flax",
) -> optax.GradientTransformation:
    """Flora's first moment: an EMA kept at rank ``r`` behind a random projection.

    Per 2-D leaf ``u`` (e.g. an Adafactor-normalised update) with down-projection
    ``down(x) = x B`` (right side; ``B^T x`` on the left) and ``up(c) = c B^T``
    (``B c``), ``B`` of shape ``(d, r)`` (``N(0, 1)/sqrt(r)`` for ``"gaussian"``)::

        every T steps (1-based t = 1, T+1, ...): new B; C <- down_new(up_old(C))
        C <- b1 C + (1 - b1) down(u)
        output up(C)

    (Flora, Hao et al. 2024, BorealisAI/flora-opt; ``T`` is its ``kappa``).

    Args:
      b1: momentum decay.
      rank: rank ``r`` (clamped to ``min(shape)`` per leaf).
      projector: ``"gaussian"`` (Flora) or any projector (name or object).
      update_every: resampling period ``kappa``.
      proj_type, layout: which side is compressed (see :func:`scale_by_lowrank`).
      seed: seed of the random projections.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_compressed_momentum(rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 4))})
    >>> state.momentum["w"].shape
    (8, 2)
    """
    rank = _check_static_int("rank", rank)
    update_every = _check_static_int("update_every", update_every)
    _check_choice("proj_type", proj_type, PROJ_TYPES)
    _check_choice("layout", layout, LAYOUTS)
    if proj_type == "full":
        raise ValueError("scale_by_compressed_momentum needs a one-sided proj_type.")
    proj = get_projector(projector)

    def geometry(shape) -> LeafGeometry:
        return leaf_geometry(tuple(shape), rank, proj_type, layout)

    def init_fn(params):
        def leaf(path, p):
            if p.ndim != 2:
                raise ValueError(f"scale_by_compressed_momentum: leaf {path_string(path)!r} "
                                 f"has shape {tuple(p.shape)}; only 2-D matrices.")
            geom = geometry(p.shape)
            ax = geom.reduced[0]
            return (proj.init(p.shape[ax], geom.rank, p.dtype),
                    jnp.zeros(geom.small_shape, p.dtype))

        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        per_leaf = [leaf(path, p) for path, p in flat]
        pstate = treedef.unflatten([x[0] for x in per_leaf])
        mom = treedef.unflatten([x[1] for x in per_leaf])
        key = jax.random.key_data(jax.random.key(seed))
        return CompressedMomentumState(jnp.zeros([], jnp.int32), key, pstate, mom)

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        due = count % update_every == 0
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        leaf_ids = iter(range(10**9))

        def leaf(u, pstate, c):
            geom = geometry(u.shape)
            ax = geom.reduced[0]
            d = u.shape[ax]
            key = jax.random.fold_in(step_key, next(leaf_ids))

            def refresh():
                new = compute_unbatched(proj, key, _oriented(u, ax), geom.rank, pstate, count)
                old_b = (proj.basis(pstate, d, jnp.float32),)
                new_b = (proj.basis(new, d, jnp.float32),)
                moved = _rotation(old_b, new_b, geom)(c.astype(jnp.float32)).astype(c.dtype)
                return new, jnp.where(count > 0, moved, c)

            pstate, c = jax.lax.cond(due, refresh, lambda: (pstate, c))
            basis = (proj.basis(pstate, d, jnp.float32),)
            u32 = u.astype(jnp.float32)
            c32 = b1 * c.astype(jnp.float32) + (1 - b1) * _project(u32, basis, geom)
            return _back(c32, basis, geom).astype(u.dtype), pstate, c32.astype(c.dtype)

        out, pstate, mom = map_unzip(leaf, updates, state.projector, state.momentum, n_out=3)
        return out, CompressedMomentumState(optax.safe_increment(count), state.key, pstate, mom)

    return optax.GradientTransformation(init_fn, update_fn)
