"""Q-GaLore's lazy refresh in the metrics log: the LazyRefreshSVDs hook.

Counts written by hand from the refresh rule (``docs/methods/qgalore.md``): with
``update_proj_gap = 1``, ``queue_size = 2`` and a threshold every cosine passes, a
matrix refreshes at 0-based steps 0 and 1, its queue is full at the SVD of step 2
(period 1 -> 2), then at 4 (-> 4) and 8 (-> 8): after 10 updates 5 SVDs were done
where a fixed period of 1 does 10, so 5 are saved per matrix.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

import lowrank_jax as lj
from train.config import config_from_dict
from train.hooks import HOOKS, LazyRefreshSVDs, default_hooks

PARAMS = {"attn": {"q": jnp.ones((8, 6)), "k": jnp.ones((8, 6))}, "norm": jnp.ones(6)}
KW = {"rank": 2, "update_proj_gap": 1, "queue_size": 2, "cos_threshold": -2.0,
      "proj_group_size": 4, "weight_bits": None}


TX = lj.qgalore_adamw8bit(1e-2, **KW)
_update = jax.jit(TX.update)


def _state_after(steps: int):
    state = TX.init(PARAMS)
    for k in range(steps):
        g = jax.tree.map(lambda p, k=k: jax.random.normal(jax.random.key(k), p.shape), PARAMS)
        _, state = _update(g, state, PARAMS)
    return state


class _Single:
    def split(self, tree):
        return [tree]


class _Vmapped:
    def __init__(self, n):
        self.n = n

    def split(self, tree):
        return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(self.n)]


def _loop(opt_state, step, program=None, n=1):
    rows = []
    run_state = SimpleNamespace(opt_state=opt_state)
    loop = SimpleNamespace(step=step, cfg=SimpleNamespace(steps=step), state=run_state,
                           runs=[SimpleNamespace(state=run_state)] * n,
                           program=program or _Single(), write=rows.extend)
    return loop, rows


@pytest.fixture(scope="module")
def state10():
    return _state_after(10)


@pytest.mark.slow      # compiles Q-GaLore's update (~7 s on two busy cores)
def test_counts_follow_the_lazy_rule(state10):
    counts = lj.lazy_refresh_counts(state10)
    assert sorted(counts) == ["attn/k", "attn/q"]
    for c in counts.values():
        assert (int(c.done), int(c.fixed), int(c.saved)) == (5, 10, 5)


@pytest.mark.slow      # compiles Q-GaLore's update (~7 s on two busy cores)
def test_hook_writes_svds_done_fixed_and_saved(state10):
    hook = LazyRefreshSVDs(every=5)
    loop, rows = _loop(state10, 10)
    hook.begin(loop)
    assert hook.due(loop)
    hook(loop)
    assert rows == [{"svds_done": 10, "svds_fixed": 20, "svds_saved": 10}]


@pytest.mark.slow      # compiles Q-GaLore's update (~7 s on two busy cores)
def test_hook_splits_vmapped_seeds(state10):
    """Two runs of a vmapped group: one row each, from its own slice of the state."""
    early = _state_after(3)   # SVDs at 0, 1, 2
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), state10, early)
    hook = LazyRefreshSVDs(every=5)
    loop, rows = _loop(stacked, 10, _Vmapped(2), n=2)
    hook(loop)
    assert rows == [{"svds_done": 10, "svds_fixed": 20, "svds_saved": 10},
                    {"svds_done": 6, "svds_fixed": 6, "svds_saved": 0}]


def test_hook_is_off_without_lazy_projectors():
    assert LazyRefreshSVDs in HOOKS
    adamw = config_from_dict({"optimizer": {"name": "adamw"}})
    assert not any(isinstance(h, LazyRefreshSVDs) for h in default_hooks(adamw))
    galore = config_from_dict({"optimizer": {"name": "galore_adamw"}, "log_every": 5})
    assert not any(isinstance(h, LazyRefreshSVDs) for h in default_hooks(galore))
    hook = LazyRefreshSVDs(every=5)                     # a state without lazy projectors
    tx = lj.galore_adamw(1e-2, rank=2)
    loop, rows = _loop(tx.init(PARAMS), 5)
    hook.begin(loop)
    assert not hook.due(loop) and rows == []
    qg = config_from_dict({"optimizer": {"name": "qgalore_adamw8bit"}, "log_every": 5})
    assert any(isinstance(h, LazyRefreshSVDs) and h.every == 5 for h in default_hooks(qg))
    assert lj.lazy_refresh_counts(tx.init(PARAMS)) == {}
