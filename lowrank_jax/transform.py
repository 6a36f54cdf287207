"""``scale_by_lowrank``: run any optax transformation on low-rank projected gradients.

For every selected leaf ``G`` (a 2-D matrix, or an N-D leaf seen as one through
its dimension numbers) the wrapper keeps a projector, refreshed every
``update_every`` steps under one ``lax.cond`` (other steps pay nothing), projects
``R = P(G)``, runs the inner transformation on the tree of small gradients (its
state lives at the small shapes) and hands ``(G, R, N)`` to a residual rule
that makes the full-size update (``scale * Back(N)`` for GaLore). The steps are
the pure functions of :mod:`lowrank_jax.steps`; the rules are
:mod:`lowrank_jax.residuals`; the projectors :mod:`lowrank_jax.projectors`.

Reference: GaLore (Zhao et al. 2024, jiaweizzhao/GaLore
``galore_torch/adamw.py`` and ``galore_projector.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import steps
from lowrank_jax.geometry import LAYOUTS, PROJ_TYPES, LeafGeometry, leaf_geometry
from lowrank_jax.projectors import get_projector
from lowrank_jax.residuals import ResidualInputs, get_residual
from lowrank_jax.state_reader import ProjectorLayout, param_name
from lowrank_jax.steps import DimensionNumbers, LeafPlan

__all__ = ["DENSITY_ROUNDINGS", "MOMENTS", "REFRESH_RULES", "DimensionNumbers",
           "ScaleByLowRankState", "scale_by_lowrank"]

MOMENTS = ("keep", "reset", "transport", "transport_unstored")
REFRESH_RULES = ("galore", "first_and_multiples")
DENSITY_ROUNDINGS = ("round", "floor")


class ScaleByLowRankState(NamedTuple):
    """State of :func:`scale_by_lowrank`.

    Attributes:
      count: int32 number of updates done.
      key: uint32 ``(2,)`` raw PRNG key data (refresh ``t`` of leaf ``i`` uses
        ``fold_in(fold_in(key, t), i)``, so no key is consumed between refreshes).
      projector: per-leaf projector state (for ``proj_type='full'`` a pair
        ``(left, right)``): the basis ``(d, r)`` for ``svd``/``sara``/``random``/
        ``gaussian``/``rsvd``, indices for ``dct``/``columns``, the PCA state for
        ``online_pca``. Read bases with :func:`lowrank_jax.projector_bases`.
      ready: per-leaf bool, whether a projector has been computed successfully.
      overlap: per-leaf float32, ``||B_old^T B_new||_F^2 / r`` at the last
        refresh (``-1`` until the second refresh).
      refreshed: per-leaf bool, whether the last update refreshed the projector.
      inner_state: the inner transformation's state, on the small shapes.
      residual: per-leaf residual-rule state (``()`` when the rule has none).
      layout: static description of the projected leaves (no arrays).
    """

    count: jax.Array
    key: jax.Array
    projector: Any
    ready: Any
    overlap: Any
    refreshed: Any
    inner_state: optax.OptState
    residual: Any
    layout: ProjectorLayout

    @classmethod
    def initial(cls, pstates: list, treedef: Any, seed: int, inner_state: optax.OptState,
                residual: list, layout: ProjectorLayout) -> ScaleByLowRankState:
        """The state before the first update: count 0, the key of ``seed``, the per-leaf
        projector states ``pstates`` (flattened by ``treedef``), no projector ready or
        refreshed, overlaps ``-1``, the inner state and per-leaf residual states."""
        n = len(pstates)
        return cls(jnp.zeros([], jnp.int32), jax.random.key_data(jax.random.key(seed)),
                   treedef.unflatten(pstates), treedef.unflatten([jnp.asarray(False)] * n),
                   treedef.unflatten([jnp.asarray(-1.0, jnp.float32)] * n),
                   treedef.unflatten([jnp.asarray(False)] * n), inner_state,
                   treedef.unflatten(residual), layout)

    def advanced(self, results: list, treedef: Any, inner_state: optax.OptState,
                 residual: list) -> ScaleByLowRankState:
        """The state after one update: the count incremented, the per-leaf refresh
        ``results`` (:class:`lowrank_jax.steps.RefreshResult`, flattened by ``treedef``),
        the new inner state and per-leaf residual states; key and layout kept."""
        def leaves(field: str) -> Any:
            return treedef.unflatten([getattr(r, field) for r in results])

        return self._replace(count=optax.safe_increment(self.count),
                             projector=leaves("projector"), ready=leaves("ready"),
                             overlap=leaves("overlap"), refreshed=leaves("refreshed"),
                             inner_state=inner_state, residual=treedef.unflatten(residual))


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """A named ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(choices)}.")


def check_static_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is a Python int ``>= minimum``; a named ``ValueError`` otherwise."""
    if isinstance(value, jax.Array) or hasattr(value, "aval"):
        raise ValueError(
            f"{name} must be a Python int, got an array; with optax.inject_hyperparams pass "
            f"static_args=({name!r}, ...) so it stays static.")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def check_density(density: Any) -> float | None:
    """``density`` as a float in ``(0, 1]`` (or ``None``); a named ``ValueError`` otherwise."""
    if density is None:
        return None
    if isinstance(density, jax.Array) or hasattr(density, "aval"):
        raise ValueError("density must be a Python float (it sets array shapes); with "
                         "optax.inject_hyperparams pass static_args=('density', ...).")
    if (isinstance(density, bool) or not isinstance(density, (int, float))
            or not math.isfinite(density) or not 0.0 < density <= 1.0):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}.")
    return float(density)


def scale_by_lowrank(
    inner: optax.GradientTransformation,
    *,
    rank: int | None = None,
    projector: str | Any = "svd",
    update_every: int = 200,
    scale: float | None = None,
    proj_type: str | Callable[[tuple[int, int]], str] = "std",
    moments: str = "keep",
    residual: str | Any | None = None,
    seed: int = 0,
    layout: str = "flax",
    refresh_rule: str = "galore",
    density: float | None = None,
    density_rounding: str = "round",
    stagger: bool = False,
    projector_dtype: Any = jnp.float32,
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Project each selected gradient to rank ``rank``, run ``inner`` there, map back.

    Every leaf this transformation sees is projected (route other leaves elsewhere
    with ``optax.partition``, as the aliases do).

    Args:
      inner: an optax transformation that does not need ``params`` (e.g.
        :func:`scale_by_reference_adam`, ``optax.scale_by_adam``); its state lives at
        the small shapes.
      rank: target rank ``r``; a leaf with ``min(shape) < r`` uses ``min(shape)`` (the
        reference's SVD slice does the same) and one warning names all such leaves.
      projector: ``"svd"`` (GaLore), ``"sara"``, ``"random"`` (orthonormal, GoLore),
        ``"gaussian"`` (APOLLO/Flora), ``"dct"``, ``"rsvd"``, ``"columns"`` (FRUGAL's
        coordinates), ``"online_pca"``, or a projector object
        (:mod:`lowrank_jax.projectors`).
      update_every: refresh period ``T``.
      scale: the factor of the default residual rules (GaLore's ``scale``, 0.25 when
        ``None``); leave ``None`` when ``residual`` is a rule object (it owns its scale).
      proj_type: ``"std"`` (reduce the smaller dimension: the reference),
        ``"reverse_std"`` (what ``optax.contrib.galore`` does), ``"left"`` (reduce
        ``out``), ``"right"`` (reduce ``in``), ``"full"`` (both), or a function of a
        leaf's ``(out, in)`` shape returning one of those.
      moments: on refresh, ``"keep"`` the inner state (reference), ``"reset"`` it to
        ``inner.init`` (FRUGAL; the step count restarts too), ``"transport"`` the
        first moment into the new basis (``mu <- mu B_old^T B_new``; GoLore as
        described) or ``"transport_unstored"`` (GoLore's code: the refresh step uses
        the moved first moment, the stored one stays as it was before that step).
      residual: ``None`` (GaLore: ``scale * Back(N)``), ``"fira"``, ``"apollo"``,
        ``"signsgd"``, ``"sgd"``, or a rule object (:mod:`lowrank_jax.residuals`).
      seed: seed of the random projectors.
      layout: ``"flax"`` for kernels ``(in, out)``, ``"torch"`` for ``(out, in)``.
      refresh_rule: ``"galore"`` refreshes at 1-based steps ``1, T+1, 2T+1, ...``;
        ``"first_and_multiples"`` at ``1, T, 2T, ...`` (the DCT reference).
      density: instead of ``rank``: each leaf's rank is ``density * d`` rounded
        (``density_rounding``: ``"round"`` as FRUGAL's GaLore projector, ``"floor"`` as
        its coordinate projector), ``d`` the reduced dimension; no cap.
      stagger: spread the refreshes of the ``n`` leaves over the period: leaf ``i``
        (tree order) gets the offset ``o_i = (i * T) // n`` and, after the first
        refresh at step 1, refreshes when ``refresh_rule`` says so for step ``t - o_i``
        and ``t > T``. Leaves with the same offset share one conditional.
      projector_dtype: dtype of stored projector matrices (float32; ``None``: the
        parameter's dtype, as the GaLore reference keeps it).
      dimension_numbers: how an N-D leaf is seen as a matrix: a
        :class:`~lowrank_jax.steps.DimensionNumbers` (used for every leaf that is not
        2-D) or a function ``(name, shape) -> DimensionNumbers | None``. Its matrix
        ``(reduction, output)`` is a Flax-layout kernel whatever ``layout`` says.

    Returns:
      An optax ``GradientTransformationExtraArgs`` whose state is a
      :class:`ScaleByLowRankState`.

    >>> import jax.numpy as jnp
    >>> from lowrank_jax.inner import scale_by_reference_adam
    >>> tx = scale_by_lowrank(scale_by_reference_adam(), rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 4))})
    >>> state.inner_state.mu["w"].shape   # kernel (in=8, out=4): reduce out
    (8, 2)
    """
    density = check_density(density)
    if rank is None and density is None:
        raise ValueError("give rank=... (an int >= 1) or density=... (in (0, 1]).")
    if rank is not None and density is not None:
        raise ValueError(f"give rank or density, not both (rank={rank!r}, density={density!r}).")
    rank = None if rank is None else check_static_int("rank", rank)
    update_every = check_static_int("update_every", update_every)
    if not callable(proj_type):
        check_choice("proj_type", proj_type, PROJ_TYPES)
    check_choice("moments", moments, MOMENTS)
    check_choice("layout", layout, LAYOUTS)
    check_choice("refresh_rule", refresh_rule, REFRESH_RULES)
    check_choice("density_rounding", density_rounding, DENSITY_ROUNDINGS)
    rule = get_residual(residual, scale)
    if getattr(rule, "one_sided", False) and proj_type == "full":
        raise ValueError(f"residual={getattr(rule, 'name', rule)!r} needs a one-sided proj_type "
                         "('std', 'reverse_std', 'left' or 'right'); its norms run along the "
                         "projected axis.")
    if stagger and moments == "reset":
        raise ValueError("stagger=True cannot be combined with moments='reset' (the inner "
                         "state's step count is shared by all leaves); use moments='keep'.")
    proj = get_projector(projector)
    inner = optax.with_extra_args_support(inner)

    def dims_of(name: str, shape: tuple[int, ...]) -> Any:
        if dimension_numbers is None:
            return None
        if callable(dimension_numbers):
            return dimension_numbers(name, shape)
        return None if len(shape) == 2 else dimension_numbers

    def leaf_rank(geom: LeafGeometry, name: str) -> int:
        if density is None:
            return geom.rank
        sizes = [geom.shape[ax] for ax in geom.reduced]
        rounded = [round(density * d) if density_rounding == "round"
                   else math.floor(density * d) for d in sizes]
        if min(rounded) < 1:
            raise ValueError(f"density={density} gives rank 0 for leaf {name!r} (reduced "
                             f"dimension {min(sizes)}); use a larger density.")
        return min(rounded)

    def plan_of(name: str, shape: tuple[int, ...]) -> LeafPlan:
        mshape, perm = LeafPlan.matrix_view(name, tuple(shape), dims_of(name, tuple(shape)))
        leaf_layout = layout if perm is None else "flax"
        torch_shape = mshape if leaf_layout == "torch" else mshape[::-1]
        pt = proj_type(torch_shape) if callable(proj_type) else proj_type
        check_choice(f"proj_type (leaf {name!r})", pt, PROJ_TYPES)
        geom = leaf_geometry(mshape, rank if rank is not None else max(mshape), pt, leaf_layout)
        geom = LeafGeometry(geom.shape, geom.reduced, leaf_rank(geom, name))
        return LeafPlan(name, tuple(shape), perm, geom)

    def init_fn(params):
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        plans, clamped = [], []
        for path, p in flat:
            name = param_name(path)
            if not jnp.issubdtype(p.dtype, jnp.inexact):
                raise ValueError(f"scale_by_lowrank: leaf {name!r} has dtype {p.dtype}; only "
                                 "floating-point parameters can be optimised.")
            try:
                plans.append(plan_of(name, tuple(p.shape)))
            except ValueError as err:
                raise ValueError(f"scale_by_lowrank: {err}") from None
            if rank is not None and plans[-1].geom.rank < rank:
                clamped.append(f"{name!r} {tuple(p.shape)}")
        if clamped:
            warnings.warn(f"rank={rank} exceeds min(shape) of {len(clamped)} leaves "
                          f"({', '.join(clamped)}); each uses its smaller dimension instead.",
                          stacklevel=3)
        pdtype = lambda p: p.dtype if projector_dtype is None else projector_dtype
        pstates, smalls = [], []
        for (_, p), plan in zip(flat, plans):
            geom = plan.geom
            states = tuple(proj.init(geom.shape[ax], geom.rank, pdtype(p)) for ax in geom.reduced)
            pstates.append(states if len(states) == 2 else states[0])
            smalls.append(jnp.zeros(geom.small_shape, p.dtype))
        small = treedef.unflatten(smalls)
        inner_state = inner.init(small)
        try:
            jax.eval_shape(lambda g, s: inner.update(g, s, None), small, inner_state)
        except Exception as err:
            raise ValueError(
                "scale_by_lowrank: the inner transformation cannot run without params "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). It runs "
                "on projected gradients, which have no matching parameters: use a transformation "
                "that does not need params (e.g. scale_by_reference_adam) and put weight decay "
                "after the wrapper.") from err
        if moments in ("transport", "transport_unstored"):
            try:
                optax.tree_utils.tree_get(inner_state, "mu")
            except (KeyError, ValueError) as err:
                raise ValueError(f"moments={moments!r} needs an inner state with a 'mu' field "
                                 "(Adam-like); use moments='keep' or 'reset'.") from err
        n = len(plans)
        info = ProjectorLayout(
            proj, tuple(pl.path for pl in plans), tuple(pl.geom.reduced for pl in plans),
            tuple(tuple(pl.geom.shape[ax] for ax in pl.geom.reduced) for pl in plans),
            tuple(pl.shape for pl in plans), treedef)
        return ScaleByLowRankState.initial(pstates, treedef, seed, inner_state,
                                           [rule.init() for _ in range(n)], info)

    def refresh_due(count):
        if refresh_rule == "galore":
            return count % update_every == 0
        step = count + 1
        return (step == 1) | (step % update_every == 0)

    def offset_due(count, offset: int):
        if offset == 0:
            return refresh_due(count)
        return (count >= update_every) & refresh_due(count - offset)

    def refresh(count, step_key, mats, plans, pst, ready, overlap) -> list[steps.RefreshResult]:
        """One conditional (or one per stagger offset) around every leaf's refresh."""
        n = len(mats)
        offsets = [(i * update_every) // n if stagger else 0 for i in range(n)]

        def fresh(idx):
            return [steps.refresh_leaf(proj, jax.random.fold_in(step_key, i), mats[i], pst[i],
                                       ready[i], overlap[i], plans[i].geom, count,
                                       offset_due(count, offsets[i])) for i in idx]

        def kept(idx):
            return [steps.RefreshResult(pst[i], ready[i], overlap[i], jnp.asarray(False))
                    for i in idx]

        out: list[Any] = [None] * n
        for off in sorted(set(offsets)):
            idx = [i for i, o in enumerate(offsets) if o == off]
            not_ready = ~jnp.all(jnp.stack([ready[i] for i in idx]))
            group = jax.lax.cond(offset_due(count, off) | not_ready,
                                 lambda idx=idx: fresh(idx), lambda idx=idx: kept(idx))
            for i, res in zip(idx, group):
                out[i] = res
        return out

    def update_fn(updates, state, params=None, **extra_args):
        del params
        info: ProjectorLayout = state.layout
        grads = info.check_updates(updates, "scale_by_lowrank")
        treedef = info.treedef
        plans = [plan_of(name, shape) for name, shape in zip(info.names, info.shapes)]
        count = state.count
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), count)
        mats = [pl.to_matrix(g) for pl, g in zip(plans, grads)]
        pst = treedef.flatten_up_to(state.projector)
        results = refresh(count, step_key, mats, plans, pst, treedef.flatten_up_to(state.ready),
                          treedef.flatten_up_to(state.overlap)) if mats else []

        # each leaf's basis is materialised once per step (for DCT it is built from
        # indices) and shared by the projection and the back-projection
        bases = [steps.bases_of(proj, res.projector, pl.geom, m.dtype)
                 for res, pl, m in zip(results, plans, mats)]
        small = [steps.project(m, b, pl.geom) for m, b, pl in zip(mats, bases, plans)]

        inner_state = state.inner_state
        if moments == "reset":
            fresh = inner.init(treedef.unflatten([jnp.zeros_like(s) for s in small]))
            due = refresh_due(count)
            inner_state = jax.tree.map(lambda a, b: jnp.where(due, a, b), fresh, inner_state)
        elif moments in ("transport", "transport_unstored"):
            stored_mu = treedef.flatten_up_to(optax.tree_utils.tree_get(inner_state, "mu"))

            def transport(m, old, res, pl, was_ready):
                rot = steps.rotation(steps.bases_of(proj, old, pl.geom, jnp.float32),
                                     steps.bases_of(proj, res.projector, pl.geom, jnp.float32),
                                     pl.geom)
                moved = rot(m.astype(jnp.float32)).astype(m.dtype)
                return jnp.where(res.refreshed & was_ready, moved, m)

            was = treedef.flatten_up_to(state.ready)
            mu = [transport(*a) for a in zip(stored_mu, pst, results, plans, was)]
            inner_state = optax.tree_utils.tree_set(inner_state, mu=treedef.unflatten(mu))

        small_out, inner_state = inner.update(treedef.unflatten(small), inner_state, None,
                                              **extra_args)
        if moments == "transport_unstored":
            # the moved moment served this step only: keep the stored one where moved
            new_mu = treedef.flatten_up_to(optax.tree_utils.tree_get(inner_state, "mu"))
            mu = [jnp.where(res.refreshed & w, old, new)
                  for old, new, res, w in zip(stored_mu, new_mu, results, was)]
            inner_state = optax.tree_utils.tree_set(inner_state, mu=treedef.unflatten(mu))
        small_out = treedef.flatten_up_to(small_out)

        outs, res_states = [], []
        for g, m, r, n, b, pl, rs in zip(grads, mats, small, small_out, bases, plans,
                                         treedef.flatten_up_to(state.residual)):
            geom = pl.geom
            x = ResidualInputs(m, r, n, lambda s, b=b, geom=geom: steps.back_project(s, b, geom),
                               geom.reduced[0] if len(geom.reduced) == 1 else None)
            out, rs = rule.apply(x, rs)
            outs.append(pl.from_matrix(out).astype(g.dtype))
            res_states.append(rs)
        return treedef.unflatten(outs), state.advanced(results, treedef, inner_state,
                                                       res_states)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def __getattr__(name: str) -> Any:
    # Flora's transformation lives in its own module; kept importable from here.
    if name in ("scale_by_compressed_momentum", "CompressedMomentumState"):
        from lowrank_jax import compressed_momentum
        return getattr(compressed_momentum, name)
    raise AttributeError(name)
