"""Non-finite gradients, per projector: no hang, and the documented outcome.

Policy (README, "Non-finite gradients"): every decomposition sees the gradient with its
non-finite entries replaced by 0, and a refresh whose gradient (or result) is not finite
is discarded, so

* the projector state stays exactly what it was (``refreshed`` False), at a refresh and
  between refreshes, and the next finite refresh works;
* without ``optax.apply_if_finite`` the inner moments and the update take the non-finite
  values (as any optax optimizer's would);
* inside ``optax.apply_if_finite`` the update is zero and the whole state, moments and
  projector included, is left untouched (the non-finite count goes up).

``jnp.linalg.svd`` of a float32 matrix holding +-inf does not return on CPU, so each test
runs under a timeout (pytest-timeout, thread method: a hang fails the run instead of
blocking it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lowrank_jax as lj
from lowrank_jax.projectors import PROJECTORS, SwitchProjector

NAMES = ["svd", "sara", "rsvd", "random", "gaussian", "dct", "columns", "online_pca", "switch",
         "flora"]
BAD = {"inf": jnp.inf, "-inf": -jnp.inf, "nan": jnp.nan}
SHAPE = (12, 6)


def _tx(name: str, every: int):
    """A low-rank transformation with projector ``name``; the second step is a refresh when
    ``at_refresh``."""
    if name == "flora":
        # resamples at 1-based steps kappa, 2 kappa: step 2 is one for kappa = 2
        return lj.scale_by_compressed_momentum(0.9, rank=2, update_every=every)
    projector = (SwitchProjector(PROJECTORS["svd"], PROJECTORS["random"], 1)
                 if name == "switch" else name)
    return lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=2, projector=projector,
                               update_every=every)


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.inexact))


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.timeout(240, method="thread")
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_keeps_the_projector(name):
    params = {"w": jnp.zeros(SHAPE)}
    good = {"w": jax.random.normal(jax.random.key(0), SHAPE)}
    for at_refresh in (True, False):
        every = (2 if name == "flora" else 1) if at_refresh else 3
        tx = _tx(name, every)
        step = jax.jit(tx.update)
        guarded = optax.apply_if_finite(tx, max_consecutive_errors=10)
        gstep = jax.jit(guarded.update)
        _, s1 = step(good, tx.init(params), params)
        g_state = gstep(good, guarded.init(params), params)[1]
        for label, value in BAD.items():
            bad = {"w": good["w"].at[0, 0].set(value)}
            where = f"{name} {label} {'at' if at_refresh else 'between'} refresh"
            # without apply_if_finite: projector kept, moments and update take the value
            out, s2 = step(bad, s1, params)
            assert _equal(s2.projector, s1.projector), where
            assert _finite(s2.projector), where
            assert not bool(lj.refreshed_leaves(s2)["w"]), where
            assert bool(jax.tree.leaves(s2.ready)[0]), where
            assert not _finite(out), where
            # the next finite gradient refreshes as scheduled, from a finite projector
            _, s3 = step(good, s2, params)
            assert _finite(s3.projector), where
            # inside apply_if_finite: zero update, state untouched, one non-finite step counted
            g_out, g2 = gstep(bad, g_state, params)
            assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(g_out)), where
            assert _equal(g2.inner_state, g_state.inner_state), where
            assert int(g2.notfinite_count) == 1, where


@pytest.mark.timeout(120, method="thread")
def test_galore_with_inf_at_a_refresh_returns_and_keeps_its_projector():
    """The reported hang: galore_adamw, +inf in a gradient at a refresh (fast smoke test)."""
    p = {"attn": {"q": jax.random.normal(jax.random.key(1), (32, 16))}}
    tx = lj.galore_adamw(1e-2, rank=4, update_proj_gap=1)
    _, s1 = tx.update(p, tx.init(p), p)
    g = {"attn": {"q": p["attn"]["q"].at[0, 0].set(jnp.inf)}}
    _, s2 = tx.update(g, s1, p)
    b1, b2 = lj.projector_bases(s1)["attn/q"][0], lj.projector_bases(s2)["attn/q"][0]
    np.testing.assert_array_equal(b1, b2)
