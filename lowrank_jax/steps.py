"""The pure per-leaf steps of a low-rank update: refresh, project, back-project.

:func:`lowrank_jax.scale_by_lowrank` composes, for every selected leaf ``G``::

    refresh        new projector state where due (and the gradient is finite)
    project        R = P(G)                 (small shape)
    inner          N = inner(R)             (the optax transformation, on all leaves)
    back-project   x -> Back(x)             (handed to the residual rule)
    residual       update = rule(G, R, N)   (lowrank_jax.residuals)

Flora's compressed momentum (:mod:`lowrank_jax.compressed_momentum`) reuses the
same refresh, projection and moment-rotation steps. Everything here works on
one leaf in its *matrix* form (:class:`LeafPlan`: a 2-D leaf as stored, or an
N-D leaf reshaped by its dimension numbers) and in the stored orientation: a
basis ``B`` of a reduced axis has shape ``(d, r)``, the projection of a right
(axis 1) side is ``G @ B`` and of a left (axis 0) side ``B^T @ G``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.geometry import LeafGeometry

__all__ = [
    "DimensionNumbers",
    "LeafPlan",
    "RefreshResult",
    "all_finite",
    "back_project",
    "bases_of",
    "compute_projector",
    "oriented",
    "project",
    "refresh_leaf",
    "rotation",
    "sanitize",
]


class DimensionNumbers(NamedTuple):
    """Which axes of an N-D leaf form the matrix that is projected.

    The leaf is viewed as the matrix ``(prod reduction axes, prod output axes)``,
    i.e. a Flax-layout kernel ``(in, out)``; every axis must be in one of the two
    groups. Same fields as ``optax.contrib.GaLoreDimensionNumbers`` (an instance of
    that class is accepted too).

    >>> DimensionNumbers(reduction_axis=0, output_axis=(1, 2))   # (embed, heads, head_dim)
    DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    """

    reduction_axis: int | tuple[int, ...] = 0
    output_axis: int | tuple[int, ...] = 1


def _axes(value: Any, ndim: int) -> tuple[int, ...]:
    vals = (value,) if isinstance(value, int) else tuple(value)
    return tuple(int(v) % ndim for v in vals)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """How one leaf is seen as a matrix, and how that matrix is projected.

    Attributes:
      path: the leaf's name (``'layers/0/attn/q_proj/kernel'``).
      shape: the leaf's stored shape.
      perm: axis order ``reduction + output`` for an N-D leaf (``None``: 2-D as stored).
      geom: the projection geometry of the matrix form.
    """

    path: str
    shape: tuple[int, ...]
    perm: tuple[int, ...] | None
    geom: LeafGeometry

    @staticmethod
    def matrix_view(path: str, shape: tuple[int, ...], dims: Any
                    ) -> tuple[tuple[int, int], tuple[int, ...] | None]:
        """``(matrix shape, perm)`` of a leaf; raises a named ``ValueError`` if impossible."""
        if dims is None:
            if len(shape) != 2:
                raise ValueError(
                    f"leaf {path!r} has shape {tuple(shape)}; only 2-D matrices can be projected "
                    "as stored. Give dimension_numbers=DimensionNumbers(reduction_axis=..., "
                    "output_axis=...) for it, or exclude it from the projected set (labels=...).")
            return (int(shape[0]), int(shape[1])), None
        ndim = len(shape)
        red, out = _axes(dims.reduction_axis, ndim), _axes(dims.output_axis, ndim)
        if set(red) & set(out) or sorted(red + out) != list(range(ndim)):
            raise ValueError(
                f"dimension_numbers {tuple(dims)} for leaf {path!r} of shape {tuple(shape)} must "
                "split its axes into two disjoint groups that cover every axis.")
        rows = math.prod(shape[a] for a in red)
        cols = math.prod(shape[a] for a in out)
        return (rows, cols), red + out

    def to_matrix(self, x: jax.Array) -> jax.Array:
        """The leaf's matrix form ``(a, b)``."""
        if self.perm is None:
            return x
        return jnp.transpose(x, self.perm).reshape(self.geom.shape)

    def from_matrix(self, m: jax.Array) -> jax.Array:
        """Back to the leaf's stored shape."""
        if self.perm is None:
            return m
        permuted = m.reshape(tuple(self.shape[a] for a in self.perm))
        return jnp.transpose(permuted, np.argsort(self.perm))


def oriented(g: jax.Array, axis: int) -> jax.Array:
    """The ``(k, d)`` view of ``g`` whose last axis is the reduced ``axis``."""
    return g if axis == 1 else g.T


def sanitize(x: jax.Array) -> jax.Array:
    """``x`` with every non-finite entry replaced by 0.

    Decompositions must never see ``inf``: ``jnp.linalg.svd`` of a float32 matrix
    holding ``+-inf`` does not return on CPU. A refresh whose gradient was not
    finite is discarded anyway (:func:`refresh_leaf`).
    """
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def compute_projector(projector: Any, key: jax.Array, x: jax.Array, rank: int, previous: Any,
                      count: jax.Array) -> Any:
    """``projector.compute`` on the sanitised ``x``, one matrix at a time when ``jax.vmap``-ed.

    Under ``vmap`` (several seeds trained as one program) the decompositions would
    otherwise become batched LAPACK calls inside ``lax.cond``, which XLA:CPU was seen
    to deadlock on and which need not round like the unbatched call;
    :func:`jax.custom_batching.sequential_vmap` turns the batch into a loop of the
    unbatched computation. Without ``vmap`` this is ``projector.compute``.
    """
    fn = jax.custom_batching.sequential_vmap(
        lambda k, g, prev, c: projector.compute(k, g, rank, prev, c))
    return fn(key, sanitize(x), previous, count)


def bases_of(projector: Any, pstate: Any, geom: LeafGeometry, dtype: Any) -> tuple:
    """The ``(d, r)`` basis of each reduced side (one, or two for ``proj_type='full'``)."""
    states = pstate if len(geom.reduced) == 2 else (pstate,)
    return tuple(projector.basis(s, geom.shape[ax], dtype) for s, ax in zip(states, geom.reduced))


def project(g: jax.Array, bases: tuple, geom: LeafGeometry) -> jax.Array:
    """``R = P(G)``: ``G B`` (axis 1), ``B^T G`` (axis 0) or ``B_0^T G B_1`` (both)."""
    if geom.reduced == (1,):
        return g @ bases[0]
    if geom.reduced == (0,):
        # P^T materialised (a small (r, d) copy) so this is a plain row-major matmul:
        # XLA:CPU otherwise folds the transpose into a dot that takes its slower path
        # (measured: 9% off galore_adamw's update in benchmarks/optimizer_step.py)
        return jax.lax.optimization_barrier(bases[0].T) @ g
    left, right = bases
    return left.T @ g @ right


def back_project(n: jax.Array, bases: tuple, geom: LeafGeometry) -> jax.Array:
    """``Back(N)``: ``N B^T`` (axis 1), ``B N`` (axis 0) or ``B_0 N B_1^T`` (both); no scale."""
    if geom.reduced == (1,):
        return n @ bases[0].T
    if geom.reduced == (0,):
        return bases[0] @ n
    left, right = bases
    return left @ n @ right.T


def rotation(old_bases: tuple, new_bases: tuple, geom: LeafGeometry):
    """``m -> P_new(Back_old(m))``: small coordinates from the old basis into the new one."""
    if geom.reduced == (1,):
        return lambda m: m @ (old_bases[0].T @ new_bases[0])
    if geom.reduced == (0,):
        return lambda m: (new_bases[0].T @ old_bases[0]) @ m
    (lo, ro), (ln, rn) = old_bases, new_bases
    return lambda m: (ln.T @ lo) @ m @ (ro.T @ rn)


def all_finite(tree: Any) -> jax.Array:
    """Whether every inexact array of ``tree`` is finite (a bool scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class RefreshResult(NamedTuple):
    """Outcome of :func:`refresh_leaf` for one leaf."""

    projector: Any        # the projector state to use from now on
    ready: jax.Array      # bool: a projector has been computed successfully
    overlap: jax.Array    # float32: ||B_old^T B_new||_F^2 / r at the last refresh (-1 before)
    refreshed: jax.Array  # bool: this call replaced the projector


def refresh_leaf(projector: Any, key: jax.Array, g: jax.Array, pstate: Any, ready: jax.Array,
                 overlap: jax.Array, geom: LeafGeometry, count: jax.Array, due: jax.Array
                 ) -> RefreshResult:
    """A new projector state where ``due`` (or none was computed yet) and ``g`` is finite.

    The decomposition sees the sanitised gradient (:func:`sanitize`) and its result is
    kept only if both the gradient and the result are finite: a non-finite gradient
    never replaces (or poisons) the projector, and a leaf without one retries at the
    next step.

    Args:
      projector: the projector object.
      key: the PRNG key of this leaf and refresh.
      g: the leaf's gradient in matrix form ``(a, b)``.
      pstate, ready, overlap: the leaf's current projector state, flag and overlap.
      geom: the leaf's geometry.
      count: 0-based optimizer step.
      due: whether the schedule asks for a refresh now.
    """
    states = pstate if len(geom.reduced) == 2 else (pstate,)
    new = tuple(
        compute_projector(projector, jax.random.fold_in(key, j), oriented(g, ax), geom.rank, s,
                          count)
        for j, (s, ax) in enumerate(zip(states, geom.reduced)))
    new = new if len(new) == 2 else new[0]
    ok = (due | ~ready) & all_finite(g) & all_finite(new)
    old_b = bases_of(projector, pstate, geom, jnp.float32)
    new_b = bases_of(projector, new, geom, jnp.float32)
    ov = sum(jnp.sum((o.T @ n) ** 2) for o, n in zip(old_b, new_b)) / (geom.rank * len(new_b))
    ov = jnp.where(ready, ov, -1.0).astype(jnp.float32)
    return RefreshResult(jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, pstate),
                         ok | ready, jnp.where(ok, ov, overlap), ok)
