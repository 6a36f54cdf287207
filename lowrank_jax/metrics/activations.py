"""Representation similarity between two runs' activations at one layer.

All inputs are ``(n_examples, features)`` (flatten tokens into examples first);
all functions are pure ``jnp`` and jit-able.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _f32(x: Any) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x.reshape(x.shape[0], -1)


def l2_distance(x: Any, y: Any) -> jax.Array:
    """Mean over examples of ``||x_i - y_i||_2``.

    >>> float(l2_distance(jnp.array([[3.0, 4.0], [0.0, 0.0]]), jnp.zeros((2, 2))))
    2.5
    """
    return jnp.mean(jnp.linalg.norm(_f32(x) - _f32(y), axis=-1))


def mean_norm(x: Any) -> jax.Array:
    """Mean over examples of ``||x_i||_2`` (the reference's ``baseline_mean_norm``).

    >>> float(mean_norm(jnp.array([[3.0, 4.0], [0.0, 1.0]])))
    3.0
    """
    return jnp.mean(jnp.linalg.norm(_f32(x), axis=-1))


def relative_l2_distance(baseline: Any, target: Any, eps: float = 1e-12) -> jax.Array:
    """``l2_distance(baseline, target) / (mean_norm(baseline) + eps)``: scale-free L2.

    The reference's ``relative_l2_distance`` (NamrataRShivagunde/low-rank-geometry,
    ``loss-landscape/scripts/single_checkpoint_scripts/6_activations_comparison.py``
    l.185-195): the mean per-example distance over the mean per-example norm of the
    *baseline* (full-rank) activations, ``eps = 1e-12``.

    >>> round(float(relative_l2_distance(jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 4.0]]))), 6)
    0.6
    """
    return l2_distance(baseline, target) / (mean_norm(baseline) + eps)


def cosine_similarity(x: Any, y: Any, eps: float = 1e-8) -> jax.Array:
    """Mean over rows of ``<x_i, y_i> / (||x_i|| ||y_i||)``.

    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([[2.0, 0.0], [1.0, 0.0]])
    >>> float(cosine_similarity(x, y))
    0.5
    """
    x, y = _f32(x), _f32(y)
    num = jnp.sum(x * y, axis=-1)
    den = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    return jnp.mean(num / jnp.maximum(den, eps))


def linear_cka(x: Any, y: Any) -> jax.Array:
    """Linear CKA ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features.

    Uses the feature-space form when features are fewer than examples and the
    equivalent Gram form ``<K, L>_F / (||K||_F ||L||_F)`` (``K = X X^T``) otherwise.

    >>> x = jax.random.normal(jax.random.key(0), (10, 3))
    >>> round(float(linear_cka(x, 2.0 * x)), 5)
    1.0
    """
    x, y = _f32(x), _f32(y)
    x = x - jnp.mean(x, axis=0, keepdims=True)
    y = y - jnp.mean(y, axis=0, keepdims=True)
    n = x.shape[0]
    if max(x.shape[1], y.shape[1]) <= n:
        cross = jnp.sum(jnp.square(y.T @ x))
        return cross / (jnp.linalg.norm(x.T @ x) * jnp.linalg.norm(y.T @ y))
    k, l_ = x @ x.T, y @ y.T
    return jnp.sum(k * l_) / (jnp.linalg.norm(k) * jnp.linalg.norm(l_))


def _u_centre(gram: jax.Array) -> jax.Array:
    """U-centring of a Gram matrix (zero diagonal); ``<U(K), U(L)> / (n (n - 3))`` is unbiased HSIC."""
    n = gram.shape[0]
    off = gram * (1.0 - jnp.eye(n, dtype=gram.dtype))
    row = jnp.sum(off, axis=1) / (n - 2)
    total = jnp.sum(off) / ((n - 1) * (n - 2))
    centred = off - row[:, None] - row[None, :] + total
    return centred * (1.0 - jnp.eye(n, dtype=gram.dtype))


def debiased_linear_cka(x: Any, y: Any) -> jax.Array:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

    ``HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L))`` with ``K = X X^T``, ``L = Y Y^T``,
    computed by U-centring both Gram matrices. Needs ``n_examples >= 4``; can be
    slightly negative for unrelated features; invariant to shifting the features.

    >>> x = jax.random.normal(jax.random.key(0), (10, 3))
    >>> round(float(debiased_linear_cka(x, x + 1.0)), 5)
    1.0
    """
    x, y = _f32(x), _f32(y)
    if x.shape[0] < 4:
        raise ValueError("debiased_linear_cka needs at least 4 examples")
    x = x - jnp.mean(x, axis=0, keepdims=True)         # exact no-op for the estimator; better rounding
    y = y - jnp.mean(y, axis=0, keepdims=True)
    k, l_ = _u_centre(x @ x.T), _u_centre(y @ y.T)
    return jnp.sum(k * l_) / jnp.sqrt(jnp.sum(k * k) * jnp.sum(l_ * l_))


def mean_over_layers(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over layers (the reference's "mean across layers" summary).

    ``per_layer``: ``{layer: {metric: value}}``; a metric missing or ``None`` in a
    layer is left out of that metric's mean (6_activations_comparison_plots.py
    ``plot_summary_trends``, l.100-106).

    >>> mean_over_layers({"a": {"cka": 0.5}, "b": {"cka": 1.0, "l2": 2.0}})
    {'cka': 0.75, 'l2': 2.0}
    """
    values: dict[str, list[float]] = {}
    for metrics in per_layer.values():
        for k, v in metrics.items():
            if v is not None:
                values.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in values.items()}
