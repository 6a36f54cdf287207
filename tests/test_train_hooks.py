"""The training loop's hooks: which a config switches on, their schedules, what they write.

The hooks are exercised on a stand-in for :class:`train.loop.Loop` (the loop itself
runs them in the end-to-end tests of ``test_train_cli.py`` and ``test_train_seeds.py``).
"""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from train import hooks as H
from train.config import config_from_dict


def _cfg(**raw):
    base = {"steps": 10, "log_every": 4, "eval": {"every": 5}, "checkpoint": {"every": 3},
            "progress": False, "batch_size": 2, "seq_len": 8}
    return config_from_dict({**base, **raw})


class FakeLoop:
    """The parts of ``train.loop.Loop`` the hooks read; ``write`` collects the rows."""

    def __init__(self, cfg, n_runs=1, start=0, last=None):
        self.cfg, self.start, self.step = cfg, start, start
        self.last = cfg.steps if last is None else last
        self.runs = [SimpleNamespace(val_batches=[1], state=SimpleNamespace(opt_state={}))
                     for _ in range(n_runs)]
        self.program = SimpleNamespace(split=lambda tree: [
            jax.tree.map(lambda x, k=k: x[k], tree) for k in range(n_runs)] if n_runs > 1
            else [tree])
        self.clock = SimpleNamespace(now=lambda: self.now)
        self.now = 0.0
        self.rows: list[tuple[int, list[dict]]] = []

    def write(self, rows):
        self.rows.append((self.step, rows))


def _due_steps(hook, loop):
    out = []
    for step in range(loop.start + 1, loop.last + 1):
        loop.step = step
        if hook.due(loop):
            out.append(step)
    return out


def test_periodic():
    assert [s for s in range(1, 11) if H.periodic(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if H.periodic(s, 0, 10)] == [10]


def test_default_hooks_follow_the_config():
    names = lambda cfg: [type(h).__name__ for h in H.default_hooks(cfg)]
    assert names(_cfg()) == ["TrainMetrics", "UpdateWallTime", "NonFiniteSteps", "Evaluation",
                             "Checkpointing"]
    assert names(_cfg(optimizer={"name": "galore_adamw"}, progress=True,
                      profile={"steps": 2}, eval={"every": 0})) == [
        "TrainMetrics", "UpdateWallTime", "NonFiniteSteps", "ProjectorOverlap", "Checkpointing",
        "ProgressBar", "Profiling"]


def test_each_hook_keeps_its_own_schedule():
    cfg = _cfg()
    loop = FakeLoop(cfg)
    assert _due_steps(H.TrainMetrics.from_config(cfg), loop) == [4, 8, 10]
    assert _due_steps(H.Evaluation.from_config(cfg), loop) == [5, 10]
    assert _due_steps(H.Checkpointing.from_config(cfg), loop) == [3, 6, 9, 10]
    # a loop that stops early (until=7) still checkpoints where it stops; logs follow cfg.steps
    early = FakeLoop(cfg, last=7)
    assert _due_steps(H.Checkpointing.from_config(cfg), early) == [3, 6, 7]
    assert _due_steps(H.TrainMetrics.from_config(cfg), early) == [4]
    assert _due_steps(H.Evaluation.from_config(cfg), FakeLoop(cfg, start=5)) == [10]


def test_train_metrics_line_per_run():
    """Loss: mean over the update's micro-batches; tokens/s: all runs' tokens since the last
    line over the training clock."""
    cfg = _cfg(optimizer={"accumulate": 2})
    loop = FakeLoop(cfg, n_runs=2)
    hook = H.TrainMetrics.from_config(cfg)
    hook.begin(loop)
    loop.step, loop.now = 4, 2.0
    loop.metrics = {"lr": np.array([0.1, 0.2], np.float32),
                    "grad_norm": np.array([1.0, 3.0], np.float32)}
    loop.losses = [np.array([1.0, 4.0], np.float32), np.array([3.0, 6.0], np.float32)]
    hook(loop)
    step, rows = loop.rows[-1]
    assert step == 4 and [r["loss"] for r in rows] == [2.0, 5.0]
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.2])
    assert [r["grad_norm"] for r in rows] == [1.0, 3.0]
    # 4 updates x 2 runs x 2 x 8 tokens in 2 s
    assert rows[0]["tokens_per_s"] == pytest.approx(4 * 2 * 2 * 8 / 2.0)
    loop.step, loop.now = 8, 6.0
    hook(loop)
    assert loop.rows[-1][1][1]["tokens_per_s"] == pytest.approx(4 * 2 * 2 * 8 / 4.0)


def test_projector_overlap_is_logged_at_refreshes_with_the_subspace_overlap():
    """GaLore refreshing every 2 updates: nothing at the first refresh (no previous
    projector), a line at the second with ||P_old^T P_new||_F^2 / r per matrix."""
    import jax.numpy as jnp

    import lowrank_jax as lj

    cfg = _cfg(optimizer={"name": "galore_adamw", "rank": 2, "update_proj_gap": 2}, steps=4)
    hook = H.ProjectorOverlap.from_config(cfg)
    params = {"attn": {"q": jnp.ones((8, 6))}}
    tx = lj.galore_adamw(1e-2, rank=2, update_proj_gap=2)
    state = tx.init(params)
    loop = FakeLoop(cfg)
    loop.state = SimpleNamespace(opt_state=state)
    hook.begin(loop)
    bases, update = [], jax.jit(tx.update)
    for step in range(1, 5):
        g = {"attn": {"q": jax.random.normal(jax.random.key(step), (8, 6))}}
        _, state = update(g, state, params)
        bases.append(np.asarray(lj.find_lowrank_states(state)[0].projector["attn"]["q"]))
        loop.step, loop.state = step, SimpleNamespace(opt_state=state)
        if hook.due(loop):
            hook(loop)
    logged = [(step, rows[0]) for step, rows in loop.rows if rows[0]]
    assert [step for step, _ in logged] == [3]
    old, new = bases[1], bases[2]          # the projector before and after the refresh at 3
    expected = float(np.sum((old.T @ new) ** 2) / old.shape[1])
    assert logged[0][1]["overlap"] == {"attn/q": pytest.approx(expected, rel=1e-5)}
    assert logged[0][1]["overlap_mean"] == pytest.approx(expected, rel=1e-5)


def test_update_wall_time_is_seconds_per_update_since_the_last_line(monkeypatch):
    cfg = _cfg()
    loop = FakeLoop(cfg, n_runs=2)
    hook = H.UpdateWallTime.from_config(cfg)
    clock = iter([100.0, 108.0, 110.0])
    monkeypatch.setattr(H.time, "perf_counter", lambda: next(clock))
    hook.begin(loop)
    assert _due_steps(hook, FakeLoop(cfg)) == [4, 8, 10]
    loop.step = 4
    hook(loop)                          # 8 s over 4 updates
    loop.step = 8
    hook(loop)                          # 2 s over 4 updates
    assert [rows for _, rows in loop.rows] == [[{"update_wall_seconds": 2.0}] * 2,
                                               [{"update_wall_seconds": 0.5}] * 2]


def test_profiling_traces_the_configured_updates(tmp_path):
    """``profile: {start: 1, steps: 2}``: the trace starts after update 1, stops after 3."""
    import jax.numpy as jnp

    cfg = _cfg(profile={"start": 1, "steps": 2, "dir": str(tmp_path / "trace")}, steps=5)
    hook = H.Profiling.from_config(cfg)
    loop = FakeLoop(cfg)
    loop.state = jnp.zeros(3)
    hook.begin(loop)
    assert _due_steps(hook, FakeLoop(cfg)) == [1, 3]
    tracing = []
    for step in range(1, 6):
        loop.step = step
        loop.state = loop.state + 1.0
        if hook.due(loop):
            hook(loop)
        tracing.append(hook.tracing)
    hook.end(loop)
    assert tracing == [True, True, False, False, False]
    assert list((tmp_path / "trace").rglob("*.xplane.pb")), "no trace written"
