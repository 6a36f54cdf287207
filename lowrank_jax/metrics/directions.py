"""Perturbation directions for loss-landscape probes (pytrees in, pytrees out).

Every function returns a pytree with exactly the structure of ``params`` (an
``nnx.State`` or a nested dict of arrays), so a direction can be added leafwise:
``jax.tree.map(lambda p, d: p + alpha * d, params, direction)``.

* :func:`gaussian_direction` -- one ``N(0, 1)`` array per leaf, no
  normalisation; this is what the "Beyond Perplexity" code uses.
* :func:`filter_normalized_direction` -- Li et al. (2018) filter normalisation.
* :func:`rank1_svd_direction` / :func:`rank1_svd_directions` -- the paper's "top-k
  PCA" directions: the k-th rank-1 SVD term of every 2-D weight (it is *not* a PCA
  of anything), one SVD per matrix for all k (:func:`svd_factors`).
* :func:`trajectory_pca_directions` -- Li et al.'s PCA of a training trajectory.

Stacked directions (leading axis = direction), as :func:`lowrank_jax.metrics.landscape_1d`
takes them, come from :func:`random_directions` or :func:`stack_directions`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.tree_util import path_string

PyTree = Any
OneD = ("zero", "keep", "copy")


def gaussian_direction(key: jax.Array, params: PyTree) -> PyTree:
    """One ``N(0, 1)`` array per leaf of ``params`` (same shapes and dtypes).

    The reference's random direction: no normalisation, 1-D leaves included.

    >>> import jax, jax.numpy as jnp
    >>> d = gaussian_direction(jax.random.key(0), {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    >>> d["w"].shape, d["b"].shape
    ((3, 2), (2,))
    """
    leaves, treedef = jax.tree.flatten(params)
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)     # one draw: cheap to compile
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes):
        out.append(flat[offset:offset + size].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        offset += size
    return treedef.unflatten(out)


def filter_normalized_direction(key: jax.Array, params: PyTree, one_d: str = "zero",
                                eps: float = 1e-10) -> PyTree:
    """Li et al. filter-normalised Gaussian direction.

    A "filter" is an output unit, i.e. the LAST axis of a Flax kernel ``(in, out)``
    (for a leaf of shape ``(..., out)`` all leading axes are the filter's entries).
    For every leaf with ``ndim >= 2`` the random direction's slice ``d[..., j]`` is
    rescaled to have the Frobenius norm of ``W[..., j]``. Leaves with ``ndim <= 1``:

    * ``one_d="zero"`` (default; Li et al.'s ``ignore='biasbn'``): zero;
    * ``"keep"``: the unnormalised ``N(0, 1)`` draw;
    * ``"copy"``: the weight itself (Li et al. without ``ignore``).

    The embedding table ``(vocab, hidden)`` is treated like any 2-D leaf, i.e.
    normalised per hidden unit.

    >>> import jax, jax.numpy as jnp
    >>> w = jnp.arange(6.0).reshape(3, 2)
    >>> d = filter_normalized_direction(jax.random.key(0), {"k": w, "b": jnp.ones(2)})
    >>> bool(jnp.allclose(jnp.linalg.norm(d["k"], axis=0), jnp.linalg.norm(w, axis=0)))
    True
    >>> d["b"].tolist()
    [0.0, 0.0]
    """
    if one_d not in OneD:
        raise ValueError(f"one_d must be one of {OneD}, got {one_d!r}")
    raw = gaussian_direction(key, params)

    def normalise(d, w):
        w = jnp.asarray(w)
        if w.ndim <= 1:
            if one_d == "zero":
                return jnp.zeros_like(d)
            return d if one_d == "keep" else w.astype(d.dtype)
        axes = tuple(range(w.ndim - 1))
        w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes, keepdims=True))
        d_norm = jnp.sqrt(jnp.sum(jnp.square(d.astype(jnp.float32)), axis=axes, keepdims=True))
        return (d * (w_norm / (d_norm + eps))).astype(d.dtype)

    return jax.tree.map(normalise, raw, params)


def _select_matrix(path: Any, w: Any, select: Callable[[str, jax.Array], bool] | None) -> bool:
    return jnp.ndim(w) == 2 and (select is None or select(path_string(path), w))


def svd_factors(params: PyTree, select: Callable[[str, jax.Array], bool] | None = None
                ) -> PyTree:
    """One thin float32 SVD ``(u, s, vt)`` per selected 2-D leaf, ``None`` elsewhere.

    ``u``: ``(m, p)``, ``s``: ``(p,)`` descending, ``vt``: ``(p, n)`` with
    ``p = min(m, n)``. Pass the result to :func:`rank1_svd_directions` to build
    directions for several sets of ``k`` without factorising again.

    >>> f = svd_factors({"w": jnp.diag(jnp.array([1.0, 3.0])), "b": jnp.ones(2)})
    >>> f["b"] is None, f["w"][1].tolist()
    (True, [3.0, 1.0])
    """
    def factor(path, w):
        if not _select_matrix(path, w, select):
            return None
        return tuple(jnp.linalg.svd(jnp.asarray(w, jnp.float32), full_matrices=False))

    return jax.tree_util.tree_map_with_path(factor, params)


def rank1_svd_directions(params: PyTree, ks: Sequence[int],
                         select: Callable[[str, jax.Array], bool] | None = None,
                         factors: PyTree | None = None) -> PyTree:
    """The paper's "top-k PCA" directions for every ``k`` in ``ks``, stacked on a leading axis.

    Direction ``k`` (1-based) holds ``sigma_j u_j v_j^T`` with ``j = min(k, min(m, n))``
    for every selected 2-D leaf (the reference clamps ``k`` to the last component:
    ``comp_idx = max(0, min(k - 1, S.numel() - 1))``,
    NamrataRShivagunde/low-rank-geometry ``loss-landscape/scripts/single_checkpoint_scripts/
    3b_landscape_2d_pca_topk_components_variants.py`` l.115-118, ``--svd_weight_mode sigma``)
    and zero on every other leaf (``--bias_direction_mode zero``). ``select(path, leaf)``
    picks the matrices (default: every 2-D leaf, as the reference's ``named_parameters()``
    loop, embeddings and head included).

    One SVD per matrix serves all ``k`` (or none: pass ``factors`` from
    :func:`svd_factors`). The result takes ``len(ks)`` times the memory of ``params``;
    build it in chunks of ``ks`` for large models.

    Args:
      params: pytree of arrays (``nnx.State`` or nested dict).
      ks: 1-based component indices, each ``>= 1``.
      select: optional ``(path, leaf) -> bool`` filter of the 2-D leaves.
      factors: optional output of ``svd_factors(params, select)``.

    Returns:
      A pytree like ``params`` whose leaves are ``(len(ks), *leaf.shape)`` (leaf dtype),
      as :func:`lowrank_jax.metrics.landscape_1d` takes directions.

    >>> w = jnp.diag(jnp.array([3.0, 2.0]))
    >>> d = rank1_svd_directions({"w": w, "b": jnp.ones(2)}, [1, 2, 7])
    >>> d["w"][2].round(4).tolist(), d["b"].shape
    ([[0.0, 0.0], [0.0, 2.0]], (3, 2))
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks are 1-based component indices (>= 1), got {ks}")
    if factors is None:
        factors = svd_factors(params, select)
    flat_params, treedef = jax.tree.flatten(params)
    flat_factors = treedef.flatten_up_to(factors)
    out = []
    for w, f in zip(flat_params, flat_factors):
        dtype = jnp.result_type(w)
        if f is None:
            out.append(jnp.zeros((len(ks), *jnp.shape(w)), dtype))
            continue
        u, s, vt = f
        idx = np.minimum(np.asarray(ks) - 1, s.shape[0] - 1)
        terms = jnp.einsum("mk,k,kn->kmn", u[:, idx], s[idx], vt[idx])
        out.append(terms.astype(dtype))
    return treedef.unflatten(out)


def rank1_svd_direction(params: PyTree, k: int,
                        select: Callable[[str, jax.Array], bool] | None = None) -> PyTree:
    """One "top-k PCA" direction: ``sigma_k u_k v_k^T`` of every selected 2-D leaf.

    ``k`` is 1-based (``k=1`` is the leading singular triple) and is clamped to the
    last component of a matrix with ``min(m, n) < k``, as the reference does (see
    :func:`rank1_svd_directions`). Leaves that are not 2-D or that ``select(path, leaf)``
    rejects are zero. Summing the directions over ``k = 1..min(m, n)`` gives back
    each matrix.

    >>> import jax.numpy as jnp
    >>> w = jnp.diag(jnp.array([3.0, 2.0]))
    >>> rank1_svd_direction({"w": w, "b": jnp.ones(2)}, 2)["w"].round(4).tolist()
    [[0.0, 0.0], [0.0, 2.0]]
    """
    if k < 1:
        raise ValueError(f"k is 1-based, got {k}")
    return jax.tree.map(lambda x: x[0], rank1_svd_directions(params, [k], select))


def trajectory_pca_directions(checkpoints: Sequence[PyTree], n: int = 2, center: bool = True
                              ) -> tuple[list[PyTree], np.ndarray]:
    """Li et al. trajectory PCA: principal directions of ``theta_i - theta_final``.

    Each checkpoint (same structure as the last one, which is the final point)
    is flattened; the rows ``theta_i - theta_final`` are, as in sklearn's PCA
    that Li et al. call, mean-centred when ``center`` and decomposed by SVD
    (through the ``(T, T)`` Gram matrix, so memory is ``O(T * P)``).

    Returns ``(directions, explained_variance_ratio)``: ``n`` unit-norm direction
    pytrees shaped like a checkpoint and a float64 array ``(n,)``.

    Example::

        dirs, ratio = trajectory_pca_directions([ckpt_100, ckpt_200, ckpt_300], n=2)
    """
    if len(checkpoints) < 2:
        raise ValueError("trajectory_pca_directions needs at least two checkpoints")
    final = checkpoints[-1]
    leaves_f, treedef = jax.tree.flatten(final)
    shapes = [np.shape(x) for x in leaves_f]
    flat_f = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves_f])
    rows = []
    for ckpt in checkpoints[:-1]:
        leaves = treedef.flatten_up_to(ckpt)
        rows.append(np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves]) - flat_f)
    x = np.stack(rows)                                   # (T, P)
    if center:
        x = x - x.mean(axis=0, keepdims=True)
    gram = x @ x.T                                       # (T, T)
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    total = evals.sum()
    if n > len(evals):
        raise ValueError(f"asked for {n} components from {len(evals)} trajectory points")
    directions = []
    for i in range(n):
        v = x.T @ evecs[:, i]
        v = v / max(np.linalg.norm(v), 1e-30)
        parts, offset = [], 0
        for shape, ref in zip(shapes, leaves_f):
            size = int(np.prod(shape, dtype=np.int64))
            parts.append(jnp.asarray(v[offset:offset + size].reshape(shape), jnp.result_type(ref)))
            offset += size
        directions.append(treedef.unflatten(parts))
    ratio = evals[:n] / total if total > 0 else np.zeros(n)
    return directions, ratio


def stack_directions(directions: Sequence[PyTree]) -> PyTree:
    """Stack direction pytrees along a new leading axis (``(n_dirs, *leaf.shape)``)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *directions)


def random_directions(key: jax.Array, params: PyTree, n: int, kind: str = "gaussian",
                      **kwargs: Any) -> PyTree:
    """``n`` stacked random directions (leading axis ``n``).

    ``kind`` is ``"gaussian"`` (:func:`gaussian_direction`, the reference) or
    ``"filter"`` (:func:`filter_normalized_direction`, ``kwargs`` passed on).

    >>> import jax, jax.numpy as jnp
    >>> random_directions(jax.random.key(0), {"w": jnp.ones((3, 2))}, 5)["w"].shape
    (5, 3, 2)
    """
    if kind not in ("gaussian", "filter"):
        raise ValueError(f"kind must be 'gaussian' or 'filter', got {kind!r}")
    options = tuple(sorted(kwargs.items())) if kind == "filter" else ()
    return _random_directions(jax.random.split(key, n), params, kind, options)


@partial(jax.jit, static_argnames=("kind", "options"))
def _random_directions(keys: jax.Array, params: PyTree, kind: str,
                       options: tuple[tuple[str, Any], ...]) -> PyTree:
    """Module-level jit so repeated calls with the same shapes reuse one compiled program."""
    if kind == "gaussian":
        fn = gaussian_direction
    else:
        fn = lambda k, p: filter_normalized_direction(k, p, **dict(options))
    return jax.vmap(fn, in_axes=(0, None))(keys, params)
