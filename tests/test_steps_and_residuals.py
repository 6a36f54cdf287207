"""The pure steps of ``scale_by_lowrank`` and the residual rules, each against NumPy.

``lowrank_jax.steps`` (project, back-project, rotation, refresh) and
``lowrank_jax.residuals`` (``BackProjection``, ``FiraResidual``, ``ApolloScaling``,
``StateFreeResidual``) on small random matrices, one call at a time: the formulas of
the docstrings written out in NumPy (the parity tests check whole runs against the
official code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import steps
from lowrank_jax.geometry import LeafGeometry
from lowrank_jax.projectors import PROJECTORS
from lowrank_jax.residuals import (
    ApolloScaling,
    BackProjection,
    FiraResidual,
    ResidualInputs,
    StateFreeResidual,
)

RNG = np.random.default_rng(0)
A, B, R = 9, 6, 3


def orthonormal(d, r, rng=RNG):
    return np.linalg.qr(rng.standard_normal((d, r)))[0]


GEOMS = {"right": LeafGeometry((A, B), (1,), R), "left": LeafGeometry((A, B), (0,), R),
         "both": LeafGeometry((A, B), (0, 1), R)}


def bases_for(geom, rng=RNG):
    return tuple(orthonormal(geom.shape[ax], R, rng) for ax in geom.reduced)


@pytest.mark.parametrize("kind", list(GEOMS))
def test_project_back_project_and_rotation(kind):
    geom = GEOMS[kind]
    g = RNG.standard_normal((A, B))
    old, new = bases_for(geom), bases_for(geom)
    if kind == "right":
        want_r, back = g @ old[0], (lambda n: n @ old[0].T)
        move = lambda m: m @ old[0].T @ new[0]
    elif kind == "left":
        want_r, back = old[0].T @ g, (lambda n: old[0] @ n)
        move = lambda m: new[0].T @ old[0] @ m
    else:
        want_r, back = old[0].T @ g @ old[1], (lambda n: old[0] @ n @ old[1].T)
        move = lambda m: new[0].T @ old[0] @ m @ old[1].T @ new[1]
    f32 = lambda t: tuple(jnp.asarray(x, jnp.float32) for x in t)
    r = steps.project(jnp.asarray(g, jnp.float32), f32(old), geom)
    assert r.shape == geom.small_shape
    np.testing.assert_allclose(r, want_r, rtol=1e-5, atol=1e-5)
    n = RNG.standard_normal(geom.small_shape)
    np.testing.assert_allclose(steps.back_project(jnp.asarray(n, jnp.float32), f32(old), geom),
                               back(n), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(steps.rotation(f32(old), f32(new), geom)(
        jnp.asarray(n, jnp.float32)), move(n), rtol=1e-5, atol=1e-5)


def _refresh(g, pstate, ready, due, count=3):
    geom = GEOMS["right"]
    return steps.refresh_leaf(PROJECTORS["svd"], jax.random.key(0), jnp.asarray(g, jnp.float32),
                              pstate, jnp.asarray(ready), jnp.asarray(-1.0, jnp.float32), geom,
                              jnp.asarray(count), jnp.asarray(due))


def test_refresh_leaf_computes_keeps_and_discards():
    g = RNG.standard_normal((A, B))
    top = np.linalg.svd(g)[2][:R].T                                   # (B, R)
    old = jnp.asarray(orthonormal(B, R), jnp.float32)
    # due: the top-r right singular vectors, refreshed; the overlap with the old basis
    res = _refresh(g, old, True, True)
    assert bool(res.refreshed) and bool(res.ready)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(res.projector) * top, 0)), 1, atol=1e-5)
    overlap = np.sum((np.asarray(old).T @ np.asarray(res.projector)) ** 2) / R
    np.testing.assert_allclose(float(res.overlap), overlap, rtol=1e-5)
    # not due and ready: kept
    res = _refresh(g, old, True, False)
    assert not bool(res.refreshed)
    np.testing.assert_array_equal(res.projector, old)
    # not due but no projector yet: computed (a leaf without one retries every step)
    res = _refresh(g, old, False, False)
    assert bool(res.refreshed) and float(res.overlap) == -1.0
    # due but the gradient is not finite: discarded, the projector and flags unchanged
    bad = g.copy()
    bad[0, 0] = np.inf
    res = _refresh(bad, old, True, True)
    assert not bool(res.refreshed) and bool(res.ready)
    np.testing.assert_array_equal(res.projector, old)


def _inputs(kind="right"):
    geom = GEOMS[kind]
    (q,) = bases_for(geom)
    g = RNG.standard_normal((A, B))
    small = g @ q if kind == "right" else q.T @ g
    inner = RNG.standard_normal(small.shape)
    back = (lambda n: n @ q.T) if kind == "right" else (lambda n: q @ n)
    x = ResidualInputs(jnp.asarray(g, jnp.float32), jnp.asarray(small, jnp.float32),
                       jnp.asarray(inner, jnp.float32),
                       lambda s: back(np.asarray(s, np.float64)).astype(np.float32),
                       geom.reduced[0])
    return x, g, small, inner, back


def _ratio(n, r, axis):
    if axis is None:
        return np.linalg.norm(n) / (np.linalg.norm(r) + 1e-8)
    return (np.linalg.norm(n, axis=axis, keepdims=True)
            / (np.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))


def _limited(u, prev, gamma=1.01):
    norm = np.linalg.norm(u)
    if prev is None:
        return u, norm
    lim = max(norm / (prev + 1e-8), gamma) / gamma
    return u / lim, norm / lim


def test_back_projection_rule():
    x, _, _, inner, back = _inputs()
    out, _ = BackProjection(0.5).apply(x, ())
    np.testing.assert_allclose(out, 0.5 * back(inner), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["right", "left"])
def test_fira_rule_two_steps_with_the_limiter(kind):
    rule = FiraResidual(scale=0.25, gamma=1.01)
    state, prev = rule.init(), None
    for growth in (1.0, 3.0):              # the second residual grows: the limiter acts
        x, g, small, inner, back = _inputs(kind)
        x = x._replace(grad=x.grad * growth)
        g = g * growth
        axis = 1 if kind == "right" else 0
        res = (g - 0.25 * back(small)) * _ratio(inner, small, axis)
        res, prev = _limited(res, prev)
        out, state = rule.apply(x, state)
        np.testing.assert_allclose(out, 0.25 * back(inner) + res, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scaling,front", [("channel", False), ("tensor", True)])
def test_apollo_rule_two_steps_with_the_limiter(scaling, front):
    rule = ApolloScaling(scale=4.0, scaling=scaling, scale_front=front)
    state, prev = rule.init(), None
    for growth in (1.0, 3.0):
        x, g, small, inner, _ = _inputs()
        x = x._replace(grad=x.grad * growth)
        u = g * growth * _ratio(inner, small, 1 if scaling == "channel" else None)
        u = u * 2.0 if front else u
        u, prev = _limited(u, prev)
        u = u if front else u * 2.0
        out, state = rule.apply(x, state)
        np.testing.assert_allclose(out, u, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule_name", ["signsgd", "sgd"])
def test_state_free_rule(rule_name):
    x, g, small, inner, back = _inputs("left")
    free = g - back(small)
    free = np.sign(free) if rule_name == "signsgd" else free
    out, _ = StateFreeResidual(rule_name, scale=0.5, free_scale=0.1).apply(x, ())
    np.testing.assert_allclose(out, 0.5 * back(inner) + 0.1 * free, rtol=1e-4, atol=1e-5)
