"""Singular-value statistics of weight matrices and of weight deltas.

Per matrix (``s`` = singular values, descending): effective rank ``exp(H(p))``
with ``p = s / sum(s)``; stable rank ``sum s^2 / s_1^2``; spectral gap
``(s_1 - s_2) / s_1``; the count of ``s > 0.1``; ``s_1``. :func:`matrix_spectra`
applies them to the attention/MLP matrices and averages over matrices; on
``weight_delta(previous, current)`` it gives the dW spectra.

As the reference (NamrataRShivagunde/low-rank-geometry,
``loss-landscape/scripts/single_checkpoint_scripts/5_ranks.py``
``_metrics_from_singular_values``, l.71-125), the statistics are taken over the
singular values above :data:`RANK_TOL` (1e-12): a spectrum with none (an all-zero
matrix, e.g. a dW of a frozen weight) has every statistic 0, the count included.
:func:`rank_metrics` / :func:`matrix_rank_metrics` add the rest of the reference's
table: rank, rank ratio, effective rank / min dim, ``s_2 / s_1`` and the count ratio;
:func:`update_norms` the ``||dW||_F`` and ``||dW||_F / ||W_prev||_F`` of
``5_ranks_updates.py``; :func:`layer_means` its per-layer summaries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.selection import DEFAULT_TARGETS
from lowrank_jax.tree_util import path_string

PyTree = Any
METRICS = ("effective_rank", "stable_rank", "spectral_gap", "count_above", "top_singular")
#: The reference's per-matrix table (5_ranks.py ``metric_keys``), in our names.
RANK_METRICS = ("rank", "rank_ratio", "effective_rank", "effective_rank_ratio", "stable_rank",
                "spectral_gap", "singular_value_ratio", "count_above", "count_above_ratio")
#: Singular values at or below this are not counted (the reference's ``eps``/``rank_tol``).
RANK_TOL = 1e-12


def _sorted(s: Any) -> jax.Array:
    return -jnp.sort(-jnp.abs(jnp.asarray(s, jnp.float32)), axis=-1)


def _kept(s: Any, tol: float = RANK_TOL) -> jax.Array:
    """``|s|`` with the values ``<= tol`` set to 0, sorted descending."""
    s = _sorted(s)
    return jnp.where(s > tol, s, 0.0)


def effective_rank(s: Any) -> jax.Array:
    """``exp(-sum p log p)`` with ``p = s / sum(s)`` over ``s > 1e-12``; 0 when there is none.

    ``s``: ``(..., k)``.

    >>> float(effective_rank(jnp.ones(5))), float(effective_rank(jnp.array([2.0, 0, 0])))
    (5.0, 1.0)
    >>> float(effective_rank(jnp.zeros(3)))
    0.0
    """
    s = _kept(s)
    total = jnp.sum(s, axis=-1, keepdims=True)
    p = s / jnp.maximum(total, 1e-30)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.where(total[..., 0] > 0, jnp.exp(-jnp.sum(plogp, axis=-1)), 0.0)


def stable_rank(s: Any) -> jax.Array:
    """``sum s^2 / max(s)^2`` over ``s > 1e-12``; 0 when there is none.

    >>> float(stable_rank(jnp.array([2.0, 1.0])))
    1.25
    """
    s = _kept(s)
    return jnp.sum(s ** 2, axis=-1) / jnp.maximum(s[..., 0] ** 2, 1e-30) \
        * (s[..., 0] > 0)


def spectral_gap(s: Any) -> jax.Array:
    """``(s_1 - s_2) / s_1`` on the sorted spectrum over ``s > 1e-12`` (0 when there is none).

    A spectrum with one kept value has gap 1 (``s_2`` counts as 0, as in the reference).

    >>> float(spectral_gap(jnp.array([1.0, 4.0])))
    0.75
    """
    s = _kept(s)
    second = s[..., 1] if s.shape[-1] > 1 else jnp.zeros_like(s[..., 0])
    return (s[..., 0] - second) / jnp.maximum(s[..., 0], 1e-30)


def singular_value_ratio(s: Any) -> jax.Array:
    """``s_2 / s_1`` over ``s > 1e-12`` (0 when there is none, or only one).

    >>> float(singular_value_ratio(jnp.array([1.0, 4.0])))
    0.25
    """
    s = _kept(s)
    second = s[..., 1] if s.shape[-1] > 1 else jnp.zeros_like(s[..., 0])
    return second / jnp.maximum(s[..., 0], 1e-30)


def matrix_rank(s: Any, tol: float = RANK_TOL) -> jax.Array:
    """Number of singular values above ``tol`` (int32; the reference's ``rank``).

    >>> int(matrix_rank(jnp.array([3.0, 1e-13, 0.0])))
    1
    """
    return jnp.sum(jnp.abs(jnp.asarray(s, jnp.float32)) > tol, axis=-1).astype(jnp.int32)


def count_above(s: Any, threshold: float = 0.1) -> jax.Array:
    """Number of singular values strictly above ``threshold`` (int32).

    >>> int(count_above(jnp.array([0.5, 0.1, 0.05])))
    1
    """
    return jnp.sum(jnp.abs(jnp.asarray(s)) > threshold, axis=-1).astype(jnp.int32)


def top_singular(s: Any) -> jax.Array:
    """The largest singular value ``s_1``."""
    return jnp.max(jnp.abs(jnp.asarray(s, jnp.float32)), axis=-1)


def spectrum_metrics(s: Any, threshold: float = 0.1) -> dict[str, jax.Array]:
    """All five metrics of one spectrum ``(k,)`` (or a batch ``(..., k)``) as a dict."""
    return {"effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
            "spectral_gap": spectral_gap(s), "count_above": count_above(s, threshold),
            "top_singular": top_singular(s)}


def rank_metrics(s: Any, shape: Sequence[int], threshold: float = 0.1,
                 tol: float = RANK_TOL) -> dict[str, float]:
    """The reference's nine statistics of one spectrum of a matrix of ``shape`` ``(m, n)``.

    ``min_dim = max(1, min(m, n))``; ``rank`` counts ``s > tol``; the ratios divide
    ``rank``, ``effective_rank`` and ``count_above`` by ``min_dim``
    (5_ranks.py ``_metrics_from_singular_values``: ``rank_ratio``,
    ``effective_rank_score``, ``singular_gt_threshold_ratio``). Keys: :data:`RANK_METRICS`.

    >>> m = rank_metrics(jnp.array([2.0, 1.0, 0.0]), (3, 4))
    >>> m["rank"], round(m["rank_ratio"], 4), m["singular_value_ratio"]
    (2.0, 0.6667, 0.5)
    """
    s = jnp.asarray(s, jnp.float32)
    min_dim = float(max(1, min(int(d) for d in shape)))
    kept = _kept(s, tol)
    any_kept = bool(jnp.any(kept > 0))
    count = float(count_above(s, threshold))
    out = {
        "rank": float(matrix_rank(s, tol)),
        "effective_rank": float(effective_rank(kept)) if any_kept else 0.0,
        "stable_rank": float(stable_rank(kept)),
        "spectral_gap": float(spectral_gap(kept)),
        "singular_value_ratio": float(singular_value_ratio(kept)),
        "count_above": count,
    }
    out["rank_ratio"] = out["rank"] / min_dim
    out["effective_rank_ratio"] = out["effective_rank"] / min_dim
    out["count_above_ratio"] = count / min_dim
    return {k: out[k] for k in RANK_METRICS}


def default_matrix_select(path: str, leaf: Any, targets: Sequence[str] = DEFAULT_TARGETS) -> bool:
    """2-D leaves whose path contains ``attn``/``attention``/``mlp`` (GaLore's rule)."""
    name = path.lower()
    return jnp.ndim(leaf) == 2 and any(t in name for t in targets)


def _clean(path: str) -> str:
    return path.removesuffix("/value")


@jax.jit
def _matrix_metrics(w: jax.Array, threshold: float) -> dict[str, jax.Array]:
    """:func:`spectrum_metrics` of the singular values of ``w (m, n)``, one compiled program."""
    return spectrum_metrics(jnp.linalg.svd(w, compute_uv=False), threshold)


def matrix_spectra(params: PyTree, select: Callable[[str, Any], bool] | None = None,
                   threshold: float = 0.1) -> dict[str, dict[str, float]]:
    """Spectral metrics of every selected matrix and their average over matrices.

    ``select(path, leaf)`` picks the matrices (default :func:`default_matrix_select`,
    the seven projection kernels of each block); paths look like
    ``"layers/0/attn/q_proj/kernel"``. Returns
    ``{"per_matrix": {path: {metric: float}}, "mean": {metric: float}}`` with the
    metrics of :data:`METRICS`.

    >>> out = matrix_spectra({"attn": {"q": jnp.diag(jnp.array([2.0, 1.0]))}})
    >>> out["per_matrix"]["attn/q"]["stable_rank"], out["mean"]["count_above"]
    (1.25, 2.0)
    """
    select = default_matrix_select if select is None else select
    per: dict[str, dict[str, float]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = _clean(path_string(path))
        if not select(name, leaf):
            continue
        values = jax.device_get(_matrix_metrics(jnp.asarray(leaf, jnp.float32), threshold))
        per[name] = {k: float(v) for k, v in values.items()}
    mean = {m: (sum(d[m] for d in per.values()) / len(per) if per else float("nan"))
            for m in METRICS}
    return {"per_matrix": per, "mean": mean}


def weight_delta(params_a: PyTree, params_b: PyTree) -> PyTree:
    """``params_b - params_a`` leafwise (dW between consecutive checkpoints ``a -> b``)."""
    return jax.tree.map(lambda a, b: jnp.asarray(b, jnp.float32) - jnp.asarray(a, jnp.float32),
                        params_a, params_b)


def delta_spectra(params_a: PyTree, params_b: PyTree,
                  select: Callable[[str, Any], bool] | None = None,
                  threshold: float = 0.1) -> dict[str, dict[str, float]]:
    """:func:`matrix_spectra` of :func:`weight_delta` ``(params_a, params_b)``."""
    return matrix_spectra(weight_delta(params_a, params_b), select, threshold)


_LAYER = re.compile(r"(?:^|/)layers/(\d+)(?:/|$)")


def layer_of(path: str) -> str:
    """``"layer_007"`` for a path inside ``layers/7/``, else ``"non_layer"`` (the reference's key).

    >>> layer_of("layers/7/attn/q_proj/kernel"), layer_of("embed/embedding")
    ('layer_007', 'non_layer')
    """
    m = _LAYER.search(path)
    return f"layer_{int(m.group(1)):03d}" if m else "non_layer"


def layer_means(per_matrix: Mapping[str, Mapping[str, float]],
                layer: Callable[[str], str] = layer_of) -> dict[str, dict[str, float]]:
    """Mean of every metric over the matrices of each layer: ``{layer: {metric: mean}}``.

    ``per_matrix`` is ``{path: {metric: value}}`` (``matrix_spectra(...)["per_matrix"]``,
    :func:`matrix_rank_metrics`, :func:`update_norms`); the layer of a path is
    ``layer(path)`` (default :func:`layer_of`). NaN values are left out of a mean.

    >>> layer_means({"layers/0/a": {"x": 1.0}, "layers/0/b": {"x": 3.0}, "embed": {"x": 5.0}})
    {'layer_000': {'x': 2.0}, 'non_layer': {'x': 5.0}}
    """
    groups: dict[str, dict[str, list[float]]] = {}
    for path, metrics in per_matrix.items():
        g = groups.setdefault(layer(path), {})
        for k, v in metrics.items():
            g.setdefault(k, []).append(float(v))
    return {name: {k: _nanmean(v) for k, v in g.items()} for name, g in sorted(groups.items())}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def matrix_rank_metrics(params: PyTree, select: Callable[[str, Any], bool] | None = None,
                        threshold: float = 0.1, tol: float = RANK_TOL,
                        max_matrices: int | None = None) -> dict[str, Any]:
    """:func:`rank_metrics` of every selected matrix, their mean and their per-layer means.

    Args:
      params: pytree of arrays; paths as ``"layers/0/attn/q_proj/kernel"``.
      select: ``(path, leaf) -> bool`` (default :func:`default_matrix_select`).
      threshold: the ``count_above`` threshold (reference ``--sv_threshold`` 0.1).
      tol: singular values at or below it are not counted (reference ``--rank_tol``).
      max_matrices: stop after this many matrices, in tree order. The reference's
        default is 128 (5_ranks.py ``--max_matrices``), which leaves out the matrices of
        the last layers of a 24-layer model (350M: 168 matrices); ``None`` takes all.

    Returns:
      ``{"per_matrix": {path: {metric: float}}, "mean": {metric: float},
      "per_layer": {layer: {metric: float}}}`` with the metrics of :data:`RANK_METRICS`
      (means are NaN when nothing is selected, as in the reference).

    >>> out = matrix_rank_metrics({"layers": {"0": {"attn": {"q": jnp.zeros((2, 3))}}}})
    >>> out["mean"]["effective_rank"], out["per_layer"]["layer_000"]["rank"]
    (0.0, 0.0)
    """
    select = default_matrix_select if select is None else select
    per: dict[str, dict[str, float]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = _clean(path_string(path))
        if not select(name, leaf):
            continue
        if max_matrices is not None and len(per) >= max_matrices:
            break
        s = _singular_values(jnp.asarray(leaf, jnp.float32))
        per[name] = rank_metrics(s, np.shape(leaf), threshold, tol)
    mean = {m: (float(np.mean([d[m] for d in per.values()])) if per else math.nan)
            for m in RANK_METRICS}
    return {"per_matrix": per, "mean": mean, "per_layer": layer_means(per)}


@jax.jit
def _singular_values(w: jax.Array) -> jax.Array:
    return jnp.linalg.svd(w, compute_uv=False)


def update_norms(params_prev: PyTree, params_curr: PyTree,
                 select: Callable[[str, Any], bool] | None = None) -> dict[str, Any]:
    """``||dW||_F``, ``||W_prev||_F`` and their ratio per matrix, averaged and in total.

    ``dW = W_curr - W_prev`` (float32). Per matrix: ``update_fro_norm``,
    ``prev_fro_norm``, ``update_to_prev_ratio`` (NaN when ``||W_prev|| = 0``). Over
    matrices: the mean of each, and the totals ``total_update_fro_norm =
    sqrt(sum ||dW||^2)``, ``total_prev_fro_norm``, ``total_update_to_prev_ratio``
    (5_ranks_updates.py l.417-480).

    Returns:
      ``{"per_matrix": {path: {...}}, "mean": {...}, "total": {...},
      "per_layer": {layer: {...}}}``.

    >>> a = {"layers": {"0": {"mlp": {"w": jnp.ones((2, 2))}}}}
    >>> b = {"layers": {"0": {"mlp": {"w": 2 * jnp.ones((2, 2))}}}}
    >>> update_norms(a, b)["total"]["total_update_to_prev_ratio"]
    1.0
    """
    select = default_matrix_select if select is None else select
    flat_prev = {_clean(path_string(p)): x for p, x in jax.tree_util.tree_leaves_with_path(
        params_prev)}
    per: dict[str, dict[str, float]] = {}
    for path, cur in jax.tree_util.tree_leaves_with_path(params_curr):
        name = _clean(path_string(path))
        prev = flat_prev.get(name)
        if prev is None or np.shape(prev) != np.shape(cur) or not select(name, cur):
            continue
        p = np.asarray(prev, np.float32)
        d = np.asarray(cur, np.float32) - p
        upd, base = float(np.linalg.norm(d)), float(np.linalg.norm(p))
        per[name] = {"update_fro_norm": upd, "prev_fro_norm": base,
                     "update_to_prev_ratio": upd / base if base > 0 else math.nan}
    keys = ("update_fro_norm", "prev_fro_norm", "update_to_prev_ratio")
    mean = {k: (float(np.mean([d[k] for d in per.values()])) if per else math.nan)
            for k in keys}
    tu = math.sqrt(sum(d["update_fro_norm"] ** 2 for d in per.values()))
    tp = math.sqrt(sum(d["prev_fro_norm"] ** 2 for d in per.values()))
    total = {"total_update_fro_norm": tu if per else math.nan,
             "total_prev_fro_norm": tp if per else math.nan,
             "total_update_to_prev_ratio": tu / tp if tp > 0 else math.nan}
    return {"per_matrix": per, "mean": mean, "total": total, "per_layer": layer_means(per)}
