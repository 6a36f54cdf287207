"""Singular-value statistics of weight matrices and of weight deltas.

Per matrix (``s`` = singular values, descending): effective rank ``exp(H(p))``
with ``p = s / sum(s)``; stable rank ``sum s^2 / s_1^2``; spectral gap
``(s_1 - s_2) / s_1``; the count of ``s > 0.1``; ``s_1``. :func:`matrix_spectra`
applies them to the attention/MLP matrices and averages over matrices; on
``weight_delta(previous, current)`` it gives the dW spectra.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax.selection import DEFAULT_TARGETS
from lowrank_jax.tree_util import path_string

PyTree = Any
METRICS = ("effective_rank", "stable_rank", "spectral_gap", "count_above", "top_singular")


def _sorted(s: Any) -> jax.Array:
    return -jnp.sort(-jnp.abs(jnp.asarray(s, jnp.float32)), axis=-1)


def effective_rank(s: Any) -> jax.Array:
    """``exp(-sum p log p)`` with ``p = s / sum(s)`` (``0 log 0 = 0``); ``s``: ``(..., k)``.

    >>> float(effective_rank(jnp.ones(5))), float(effective_rank(jnp.array([2.0, 0, 0])))
    (5.0, 1.0)
    """
    s = jnp.abs(jnp.asarray(s, jnp.float32))
    p = s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1e-30)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-jnp.sum(plogp, axis=-1))


def stable_rank(s: Any) -> jax.Array:
    """``sum s^2 / max(s)^2``.

    >>> float(stable_rank(jnp.array([2.0, 1.0])))
    1.25
    """
    s = _sorted(s)
    return jnp.sum(s ** 2, axis=-1) / jnp.maximum(s[..., 0] ** 2, 1e-30)


def spectral_gap(s: Any) -> jax.Array:
    """``(s_1 - s_2) / s_1`` on the sorted spectrum (needs ``k >= 2``).

    >>> float(spectral_gap(jnp.array([1.0, 4.0])))
    0.75
    """
    s = _sorted(s)
    return (s[..., 0] - s[..., 1]) / jnp.maximum(s[..., 0], 1e-30)


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
