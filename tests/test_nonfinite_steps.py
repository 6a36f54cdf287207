"""The non-finite step policy: a NaN/inf step leaves the whole train state untouched,
is counted and logged, and a streak of them stops the run with exit status 3.

The guard (``train/finite_guard.py``) is checked on a real optax optimizer jitted with
the state donated, under ``jax.vmap`` (per seed), with ``optax.MultiSteps`` and on a
sharded mesh; the hook on a stand-in loop; the whole trainer end to end (slow): a run
with a NaN injected into one batch ends with exactly the state of the same run with
that batch left out, and its metrics log counts one skipped step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from train_support import saved_state, write_corpus

from train import hooks as H
from train.config import config_from_dict
from train.finite_guard import NONFINITE, all_finite, guard_step

REPO = Path(__file__).resolve().parents[1]


class State(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def _tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2, weight_decay=0.1)


def _init(seed: int = 0, tx: optax.GradientTransformation | None = None) -> State:
    k = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(k, (8, 4)), "b": jnp.zeros((4,))}
    return State(params, (tx or _tx()).init(params), jnp.int32(0), jax.random.key(seed))


def _step_fn(tx: optax.GradientTransformation):
    """A pure train step on a least-squares loss; ``batch`` is ``(x (n, 8), y (n, 4))``."""

    def step(state: State, batch):
        x, y = batch

        def loss_fn(p):
            return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng = jax.random.split(state.rng)[0]
        return (State(params, opt_state, state.step + 1, rng),
                {"loss": loss, "grad_norm": optax.tree.norm(grads)})

    return step


TX = _tx()
#: compiled once for the module: the guarded step (state donated) and the plain one
GUARDED = jax.jit(guard_step(_step_fn(TX)), donate_argnums=0)
PLAIN = jax.jit(_step_fn(TX))


def _batch(seed: int, bad: float | None = None):
    k1, k2 = jax.random.split(jax.random.PRNGKey(100 + seed))
    x = jax.random.normal(k1, (6, 8))
    if bad is not None:
        x = x.at[2, 3].set(bad)
    return x, jax.random.normal(k2, (6, 4))


def _leaves(tree) -> list[np.ndarray]:
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.asarray(x))
    return out


def _same(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y)
                                      for x, y in zip(la, lb))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_step_leaves_the_donated_state_untouched(bad):
    step = GUARDED
    state, _ = step(_init(), _batch(0))
    before = jax.tree.map(np.array, _leaves(state))        # host copy: `state` is donated next
    after, metrics = step(state, _batch(1, bad))
    assert bool(metrics[NONFINITE]) and not np.isfinite(float(metrics["grad_norm"]))
    assert all(np.array_equal(x, y) for x, y in zip(before, _leaves(after)))
    assert int(after.step) == 1 and int(after.opt_state[0].count) == 1
    # the next finite step goes on as if the bad batch had never come
    went_on, m = step(after, _batch(2))
    expected, _ = PLAIN(PLAIN(_init(), _batch(0))[0], _batch(2))
    assert not bool(m[NONFINITE]) and _same(went_on, expected)


def test_a_finite_step_is_applied_as_computed():
    state = _init()
    for i in range(3):
        got, m = GUARDED(jax.tree.map(jnp.copy, state), _batch(i))
        state, _ = PLAIN(state, _batch(i))
        assert not bool(m[NONFINITE]) and _same(got, state)


def test_skip_false_applies_the_step_but_still_flags_it():
    step = jax.jit(guard_step(_step_fn(_tx()), skip=False))
    state, m = step(_init(), _batch(0, np.nan))
    assert bool(m[NONFINITE]) and np.isnan(np.asarray(state.params["w"])).all()


def test_non_finite_optimizer_state_alone_is_caught():
    """Finite loss and gradients whose update overflows the state (moments to inf)."""
    tx = _tx()

    def step(state, batch):
        new, metrics = _step_fn(tx)(state, batch)
        mu = jax.tree.map(lambda m: m.at[(0,) * m.ndim].set(jnp.inf), new.opt_state[0].mu)
        return new._replace(opt_state=(new.opt_state[0]._replace(mu=mu), *new.opt_state[1:])), \
            metrics

    state = _init()
    after, m = jax.jit(guard_step(step))(state, _batch(0))
    assert bool(m[NONFINITE]) and _same(after, state)


def test_vmapped_seeds_decide_each_for_itself():
    step = jax.jit(jax.vmap(guard_step(_step_fn(TX))), donate_argnums=0)
    states = [_init(0), _init(1)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    batches = [_batch(0, np.nan), _batch(0)]
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    after, m = step(stacked, batch)
    assert np.asarray(m[NONFINITE]).tolist() == [True, False]
    seed0 = jax.tree.map(lambda x: x[0], after)
    seed1 = jax.tree.map(lambda x: x[1], after)
    assert _same(seed0, states[0])
    # the batched program may round the last bit differently from the single one
    alone = PLAIN(states[1], batches[1])[0]
    for a, b in zip(_leaves(seed1), _leaves(alone)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_multisteps_drops_the_non_finite_micro_batch():
    """With accumulation the unit is the micro-batch: a NaN one is dropped and the
    accumulation goes on with the next, as if the bad micro-batch had not come."""
    tx = optax.MultiSteps(_tx(), every_k_schedule=2)
    step = jax.jit(guard_step(_step_fn(tx)))
    state = _init(tx=tx)
    for b in (_batch(0), _batch(1, np.nan), _batch(2), _batch(3), _batch(4, np.inf)):
        state, _ = step(state, b)
    ref = jax.jit(_step_fn(tx))
    expected = _init(tx=tx)
    for b in (_batch(0), _batch(2), _batch(3)):
        expected, _ = ref(expected, b)
    assert _same(state, expected)
    assert int(state.opt_state.gradient_step) == 1 and int(state.opt_state.mini_step) == 1


def test_on_a_mesh_every_device_keeps_its_shard():
    mesh = jax.make_mesh((4,), ("fsdp",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))
    tx = TX
    state = _init()
    spec = jax.tree.map(lambda x: P("fsdp") if x.ndim == 2 else P(), state)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec,
                             is_leaf=lambda x: isinstance(x, P))
    state = jax.device_put(state, shardings)
    step = jax.jit(guard_step(_step_fn(tx)), in_shardings=(shardings, None),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)
    before = _leaves(state)
    after, m = step(state, _batch(0, np.nan))
    assert bool(m[NONFINITE]) and all(np.array_equal(x, y) for x, y in zip(before, _leaves(after)))
    assert after.params["w"].sharding.spec == P("fsdp")


def test_all_finite_reads_only_floating_leaves():
    assert bool(all_finite({"i": jnp.int32(-1), "k": jax.random.key(0), "f": jnp.ones(2)}))
    assert not bool(all_finite({"f": jnp.array([1.0, jnp.nan], jnp.bfloat16)}))
    assert bool(all_finite({}))


# --------------------------------------------------------------------------- the hook


class FakeLoop:
    """The parts of ``train.loop.Loop`` that ``NonFiniteSteps`` reads."""

    def __init__(self, cfg, n_runs=1, start=0, run_dirs=None):
        self.cfg, self.start, self.step, self.last = cfg, start, start, cfg.steps
        dirs = run_dirs or [f"/nonexistent/run{k}" for k in range(n_runs)]
        self.runs = [SimpleNamespace(cfg=SimpleNamespace(run_dir=d)) for d in dirs]
        self.program = SimpleNamespace(split=(lambda t: [t]) if n_runs == 1 else
                                       (lambda t: [t[k] for k in range(n_runs)]))
        self.micro_metrics: list[dict] = []
        self.rows: list[tuple[int, list[dict]]] = []

    def write(self, rows):
        if any(rows):
            self.rows.append((self.step, rows))

    def advance(self, *flags):
        """One update whose micro-steps had these ``nonfinite`` flags (per run for a group)."""
        self.step += 1
        self.micro_metrics = [{NONFINITE: jnp.asarray(f)} for f in flags]


def _hook_cfg(**raw):
    return config_from_dict({"steps": 12, "log_every": 4, "progress": False, **raw})


def test_the_hook_logs_the_count_at_log_lines():
    cfg = _hook_cfg()
    loop, hook = FakeLoop(cfg), H.NonFiniteSteps.from_config(cfg)
    hook.begin(loop)
    for bad in [False, True, False, False, False, False, True, True, False, False, False, False]:
        loop.advance(bad)
        hook(loop)
    assert loop.rows == [
        (4, [{"nonfinite_skipped": 1, "nonfinite_total": 1, "nonfinite_updates": [2]}]),
        (8, [{"nonfinite_skipped": 2, "nonfinite_total": 3, "nonfinite_updates": [7, 8]}])]


def test_the_hook_stops_after_max_consecutive_with_exit_status_3():
    cfg = _hook_cfg(nonfinite={"max_consecutive": 3}, log_every=100)
    loop, hook = FakeLoop(cfg), H.NonFiniteSteps.from_config(cfg)
    hook.begin(loop)
    # two in a row, a good one, then a streak: read one update late, so the stop
    # comes at the update after the third in a row
    for bad in [True, True, False, True, True, True]:
        loop.advance(bad)
        hook(loop)
    loop.advance(False)
    with pytest.raises(H.StopTraining) as stop:
        hook(loop)
    assert stop.value.exit_code == 3 == H.EXIT_NONFINITE
    msg = str(stop.value)
    assert "3 non-finite steps in a row" in msg and "updates 4-6" in msg
    assert "nonfinite.max_consecutive=3" in msg and "\n" not in msg
    assert loop.rows == [(7, [{"nonfinite_skipped": 5, "nonfinite_total": 5,
                               "nonfinite_updates": [1, 2, 4, 5, 6]}])]


def test_the_hook_counts_micro_batches_per_seed_and_stops_on_any_seed():
    cfg = _hook_cfg(nonfinite={"max_consecutive": 2}, optimizer={"accumulate": 2},
                    batch_size=4)
    loop, hook = FakeLoop(cfg, n_runs=2), H.NonFiniteSteps.from_config(cfg)
    hook.begin(loop)
    loop.advance([False, True], [False, False])      # seed 1: first micro-batch bad
    hook(loop)
    loop.advance([False, True], [False, True])       # seed 1: two more in a row
    hook(loop)
    loop.advance([False, False], [False, False])
    with pytest.raises(H.StopTraining, match=r"in /nonexistent/run1 "):
        hook(loop)
    assert loop.rows[-1][1] == [{}, {"nonfinite_skipped": 3, "nonfinite_total": 3,
                                     "nonfinite_updates": [1, 2]}]


def test_max_consecutive_zero_never_stops(tmp_path):
    cfg = _hook_cfg(nonfinite={"max_consecutive": 0}, steps=30)
    loop, hook = FakeLoop(cfg), H.NonFiniteSteps.from_config(cfg)
    hook.begin(loop)
    for _ in range(30):
        loop.advance(True)
        hook(loop)
    assert loop.rows[-1] == (30, [{"nonfinite_skipped": 2, "nonfinite_total": 30,
                                   "nonfinite_updates": [29, 30]}])


def test_a_resumed_run_carries_its_total_over(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 4, "nonfinite_skipped": 2, "nonfinite_total": 2}) + "\n"
        + json.dumps({"step": 8, "loss": 1.0}) + "\n")
    cfg = _hook_cfg()
    loop = FakeLoop(cfg, start=8, run_dirs=[str(tmp_path)])
    hook = H.NonFiniteSteps.from_config(cfg)
    hook.begin(loop)
    for bad in [True, False, False, False]:
        loop.advance(bad)
        hook(loop)
    assert loop.rows == [(12, [{"nonfinite_skipped": 1, "nonfinite_total": 3,
                                "nonfinite_updates": [9]}])]


# --------------------------------------------------------------------------- end to end

WORDS = ["a", "step", "that", "is", "not", "finite", "changes", "nothing", "and", "the",
         "run", "goes", "on"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    return {"docs": write_corpus(root / "corpus", WORDS, docs=12, seed=4),
            "cache": root / "cache"}


class TamperedBatches:
    """A run's training batches with a NaN put into the mask of some (``poison``) or some
    left out (``drop``); indices count the batches of the stream, the prefetched first one 0."""

    def __init__(self, run, poison=(), drop=()):
        self.inner, self.first = run.train_it, run.first_batch
        self.poison, self.drop, self.index = set(poison), set(drop), 0
        run.first_batch, run.train_it = None, self

    def _raw(self):
        if self.first is not None:
            batch, self.first = self.first, None
            return batch
        return next(self.inner)

    def __next__(self):
        while True:
            batch, i = self._raw(), self.index
            self.index += 1
            if i in self.drop:
                continue
            if i in self.poison:
                batch = {**batch, "mask": batch["mask"].copy()}
                batch["mask"][0, 0] = np.nan
            return batch

    def get_state(self):
        return self.inner.get_state()


def _config(corpus, run_dir: Path, *extra: str):
    from train.config import load_config

    return load_config(None, [
        "model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus['docs']}",
        f"data.cache_dir={corpus['cache']}", "batch_size=4", "seq_len=16",
        "optimizer.name=galore_adamw", "optimizer.rank=4", "optimizer.update_proj_gap=2",
        "optimizer.lr=0.01", "schedule.name=constant", "schedule.warmup_steps=0", "log_every=1",
        "eval.every=0", "checkpoint.every=0", "checkpoint.async_save=false", "progress=false",
        "tensorboard=false", f"run_dir={run_dir}", *extra])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _skip_rows(run_dir: Path) -> list[dict]:
    return [r for r in _metrics(run_dir) if "nonfinite_total" in r]


@pytest.mark.slow
def test_a_nan_batch_is_skipped_and_the_run_equals_the_run_without_it(corpus, tmp_path):
    """GaLore, a refresh every 2 steps: batch 2 (update 3, a refresh) gets a NaN. The run
    finishes, logs one skipped step, and its whole final state (parameters, moments,
    projectors, counters, keys) is bit-identical to the run that never saw that batch."""
    from train.loop import train
    from train.prepare import prepare

    poisoned = prepare(_config(corpus, tmp_path / "poisoned", "steps=6"))
    TamperedBatches(poisoned, poison={2})
    summary = train(poisoned)
    assert summary["step"] == 6
    clean = prepare(_config(corpus, tmp_path / "clean", "steps=5"))
    TamperedBatches(clean, drop={2})
    train(clean)
    assert _same(poisoned.state, clean.state)
    assert np.isfinite(_leaves(poisoned.state.params)[0]).all()
    assert _skip_rows(tmp_path / "poisoned") == [
        {"step": 3, "nonfinite_skipped": 1, "nonfinite_total": 1, "nonfinite_updates": [3]}]
    assert _skip_rows(tmp_path / "clean") == []


@pytest.mark.slow
def test_accumulation_drops_the_non_finite_micro_batch(corpus, tmp_path):
    """Three updates of two micro-batches, a NaN in micro-batch 3: the run used (0,1) (2,4)
    and accumulated 5 without applying it, so its parameters are exactly those of two
    updates on the stream without micro-batch 3."""
    from train.loop import train
    from train.prepare import prepare

    extra = ("optimizer.accumulate=2", "optimizer.name=adamw")
    poisoned = prepare(_config(corpus, tmp_path / "poisoned", "steps=3", *extra))
    TamperedBatches(poisoned, poison={3})
    train(poisoned)
    clean = prepare(_config(corpus, tmp_path / "clean", "steps=2", *extra))
    TamperedBatches(clean, drop={3})
    train(clean)
    assert _same(poisoned.state.params, clean.state.params)
    assert _skip_rows(tmp_path / "poisoned") == [
        {"step": 2, "nonfinite_skipped": 1, "nonfinite_total": 1, "nonfinite_updates": [2]}]


@pytest.mark.slow
def test_vmapped_seeds_skip_each_for_itself(corpus, tmp_path):
    """Two seeds as one vmapped program, a NaN in batch 2 of seed 0 only. Against the
    same vmapped program where seed 0 never saw that batch: seed 0 ends (update 4) with
    the state that one had after update 3, seed 1 with the same final state."""
    from train.loop import train
    from train.prepare import prepare
    from train.seeds import seed_config

    def group(name: str, every: int, **tamper):
        cfg = _config(corpus, tmp_path / name, "steps=4", "seeds=2", "seed_data=per_seed",
                      f"checkpoint.every={every}")
        runs = [prepare(seed_config(cfg, k)) for k in range(2)]
        TamperedBatches(runs[0], **tamper)
        TamperedBatches(runs[1])
        train(runs)
        return [Path(r.cfg.run_dir) for r in runs]

    poisoned, clean = group("poisoned", 0, poison={2}), group("clean", 3, drop={2})
    for (a, sa), (b, sb) in (((poisoned[0], 4), (clean[0], 3)),
                             ((poisoned[1], 4), (clean[1], 4))):
        got, want = saved_state(a, sa), saved_state(b, sb)
        assert got.keys() == want.keys()
        for key in want:
            assert np.array_equal(got[key], want[key]), (a.name, key)
    assert [r["nonfinite_updates"] for r in _skip_rows(poisoned[0])] == [[3]]
    assert _skip_rows(poisoned[1]) == []


@pytest.mark.slow
def test_a_diverged_run_stops_with_exit_status_3_and_an_intact_checkpoint(corpus, tmp_path):
    """``optimizer.lr=1e30`` without clipping: the first update is finite (huge weights),
    every later loss is not; the run stops after 2 in a row with one ``error:`` line and
    exit status 3, and its checkpoints restore (they hold the last finite state)."""
    run_dir = tmp_path / "diverged"
    args = [f"--config={REPO / 'configs' / 'demo_adamw.yaml'}", "model.preset=llama_tiny",
            "data.source=text_dir", f"data.path={corpus['docs']}",
            f"data.cache_dir={corpus['cache']}", "batch_size=4", "seq_len=16", "steps=20",
            "optimizer.lr=1e30", "optimizer.grad_clip=0", "schedule.warmup_steps=0",
            "nonfinite.max_consecutive=2", "checkpoint.every=1", "eval.every=0",
            "progress=false", "tensorboard=false", f"run_dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "train.cli", *args], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    err = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "2 non-finite steps in a row" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    rows = _skip_rows(run_dir)
    assert rows and rows[-1]["nonfinite_total"] >= 2
    # the latest checkpoint restores, verifies and holds finite parameters
    from train.checkpoint import CheckpointStore
    from train.config import load_config
    from train.step import build_trainer

    cfg = load_config(REPO / "configs" / "demo_adamw.yaml", args[1:])
    store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint, warn=pytest.fail)
    restored = store.restore_latest(build_trainer(cfg).abstract_state)
    store.close()
    assert restored is not None
    assert all(np.isfinite(x).all() for x in _leaves(restored.state.params))


@pytest.mark.slow
def test_every_alias_keeps_a_finite_state_on_finite_gradients():
    """The guard checks the whole optimizer state: no alias may keep a NaN/inf sentinel
    in it (every step would then be skipped). Init, a refresh and an ordinary update."""
    import lowrank_jax as lj

    params = {"attn": {"q": jnp.ones((16, 8)) * 0.1}, "mlp": {"up": jnp.ones((8, 24)) * 0.1},
              "norm": jnp.ones((8,))}
    grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)
                                           ).reshape(p.shape), params)
    for name, alias in lj.OPTIMIZERS.items():
        kwargs = lj.alias.accepted_kwargs(name, {"rank": 4, "update_proj_gap": 1,
                                                 "num_heads": 2})
        tx = alias(1e-3, **kwargs)
        state = tx.init(params)
        assert bool(all_finite(state)), name
        for _ in range(2):
            updates, state = jax.jit(tx.update)(grads, state, params)
            assert bool(all_finite(updates, state)), name
