"""Per-layer updates (train.per_layer) against the standard train step, on llama_tiny.

Each run: 4 updates of rank 4 with a projector refresh every 2 updates (at
updates 1 and 3), no clipping (the per-layer step clips per group), the same
initial weights and batches.  With unrolled layers the per-layer step is
bit-identical to the standard one: every block's forward, backward and update
are the same operations, only scheduled differently.  With scanned layers the
blocks run in ``jax.lax.scan`` bodies that XLA fuses differently, so the
results agree to float32 rounding (relative 2e-5, or 1e-5 absolute: a
thousandth of one update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowrank_jax as lj
from lowrank_jax.models import stack_layers, unstack_layers
from lowrank_jax.tree_util import path_string
from train.config import ConfigError, config_from_dict, load_config
from train.per_layer import full_to_layerwise, layerwise_init, layerwise_to_full
from train.schedule import make_schedule
from train.step import build_optimizer, build_trainer

STEPS = 4


def _cfg(optimizer: str, **extra):
    raw = {"model": {"preset": "llama_tiny"},
           "optimizer": {"name": optimizer, "lr": 1e-2, "rank": 4, "update_proj_gap": 2,
                         "grad_clip": 0.0},
           "schedule": {"name": "constant", "warmup_steps": 0},
           # the non-finite guard's selects (whole state vs per group) fuse differently
           # into the two steps' updates, which moves float32 rounding: off for parity
           "nonfinite": {"skip": False},
           "steps": 100, "batch_size": 4, "seq_len": 16}
    for key, value in extra.items():
        section, _, name = key.rpartition(".")
        (raw.setdefault(section, {}) if section else raw)[name] = value
    return config_from_dict(raw)


def _batches(n: int = STEPS) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, 256, (4, 17), dtype=np.int32),
             "mask": np.ones((4, 16), np.float32)} for _ in range(n)]


def _run(cfg, weights: dict) -> tuple:
    """``(final state, losses, grad norms)`` of ``STEPS`` updates from ``weights`` (unrolled)."""
    trainer = build_trainer(cfg)
    state = trainer.init(jax.random.PRNGKey(0))
    params = state.params
    pure = stack_layers(weights) if cfg.model.scan_layers else weights
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.array, pure))
    # jitted: an eager init may hold one scalar buffer in several leaves (not donatable)
    state = state._replace(params=params, opt_state=jax.jit(trainer.tx.init)(params))
    losses, norms = [], []
    for batch in _batches():
        state, metrics = trainer.step(state, trainer.put_batch(batch))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return state, losses, norms


def _flat(tree) -> dict[str, np.ndarray]:
    return {path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _compare(a, b, exact: bool, atol: float = 1e-5) -> None:
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        if exact:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
        else:
            # atol: a thousandth of one update (lr 1e-2); Adam's m / sqrt(v) magnifies the
            # rounding of tiny gradient entries (rare embedding rows) to ~5e-6
            np.testing.assert_allclose(fa[k].astype(np.float64), fb[k].astype(np.float64),
                                       rtol=2e-5, atol=atol, err_msg=k)


@pytest.fixture(scope="module")
def weights() -> dict:
    trainer = build_trainer(_cfg("adamw"))
    return jax.device_get(nnx.to_pure_dict(trainer.init(jax.random.PRNGKey(0)).params))


def _check(optimizer: str, weights: dict, scan: bool) -> None:
    std_cfg = _cfg(optimizer)
    pl_cfg = _cfg(optimizer, per_layer_update=True, **{"model.scan_layers": scan})
    std, std_loss, std_norm = _run(std_cfg, weights)
    pl, pl_loss, pl_norm = _run(pl_cfg, weights)
    exact = not scan
    np.testing.assert_allclose(pl_loss, std_loss, rtol=0 if exact else 1e-6)
    # the logged norm sums per-group squares in another order
    np.testing.assert_allclose(pl_norm, std_norm, rtol=1e-6 if exact else 1e-5)
    _compare(unstack_layers(nnx.to_pure_dict(pl.params)), nnx.to_pure_dict(std.params), exact)
    # the optimizer state, converted to the standard layout, is the standard step's
    tx = build_optimizer(pl_cfg.optimizer, make_schedule(pl_cfg), pl_cfg.seed)
    template = jax.eval_shape(lambda: std.opt_state)
    # projectors are SVD singular vectors: their rounding is eps / (singular-value gap)
    _compare(layerwise_to_full(pl.opt_state, tx, pl.params, template), std.opt_state, exact,
             atol=5e-5)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["galore_adamw", "adamw", "fira_adamw"])
def test_per_layer_step_is_bit_identical_to_standard(weights, optimizer):
    _check(optimizer, weights, scan=False)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["galore_adamw", "fira_adamw"])
def test_scanned_per_layer_step_matches_standard_to_rounding(weights, optimizer):
    _check(optimizer, weights, scan=True)


@pytest.mark.slow
def test_per_layer_accumulation_matches_standard(weights):
    """``optax.MultiSteps`` per group = accumulation of the whole tree (its state is per leaf)."""
    std, std_loss, _ = _run(_cfg("galore_adamw", **{"optimizer.accumulate": 2}), weights)
    pl, pl_loss, _ = _run(_cfg("galore_adamw", per_layer_update=True,
                               **{"optimizer.accumulate": 2}), weights)
    np.testing.assert_array_equal(pl_loss, std_loss)
    _compare(nnx.to_pure_dict(pl.params), nnx.to_pure_dict(std.params), exact=True)


@pytest.mark.slow
def test_layout_conversion_round_trip():
    """``full_to_layerwise`` of a fresh state is ``layerwise_init``; back again is the identity."""
    cfg = _cfg("galore_adamw")
    tx = build_optimizer(cfg.optimizer, make_schedule(cfg), cfg.seed)
    trainer = build_trainer(cfg)
    params = trainer.init(jax.random.PRNGKey(0)).params
    full = tx.init(params)
    layerwise = full_to_layerwise(full, tx, params)
    _compare(layerwise, layerwise_init(tx, params), exact=True)
    _compare(layerwise_to_full(layerwise, tx, params, jax.eval_shape(lambda: full)), full,
             exact=True)
    # block states fold their PRNG key with the block index; the head keeps the run's key
    (base,) = [v for k, v in _flat(full).items() if k.endswith("/key")]
    (block1,) = [v for k, v in _flat(layerwise.layers[1]).items() if k.endswith("/key")]
    (head,) = [v for k, v in _flat(layerwise.head).items() if k.endswith("/key")]
    np.testing.assert_array_equal(head, base)
    np.testing.assert_array_equal(
        block1, jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base), 1)))
    # scanned parameters: the same blocks, stacked
    stacked = stack_layers(params)
    scanned = full_to_layerwise(full, tx, stacked)
    for k, v in _flat(scanned.layers).items():
        np.testing.assert_array_equal(v[1], _flat(layerwise.layers[1])[k])


@pytest.mark.slow
def test_per_layer_on_a_mesh_matches_one_device(weights):
    one, one_loss, _ = _run(_cfg("galore_adamw", per_layer_update=True), weights)
    mesh, mesh_loss, _ = _run(_cfg("galore_adamw", per_layer_update=True,
                                   **{"mesh.fsdp": 2, "mesh.tensor": 2}), weights)
    np.testing.assert_allclose(mesh_loss, one_loss, rtol=1e-5)
    _compare(nnx.to_pure_dict(mesh.params), nnx.to_pure_dict(one.params), exact=False)
    assert lj.state_nbytes(mesh.opt_state) == lj.state_nbytes(one.opt_state)


@pytest.mark.parametrize("overrides,message", [
    (["model.remat=all"], "unknown model.remat 'all'"),
    (["optimizer.state_dtype=half"], "unknown optimizer.state_dtype 'half'"),
    (["model.scan_layers=true", "model.linear=lora", "relora.reset_every=100"],
     "relora.reset_every needs the unrolled layout"),
])
def test_layout_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.preset=llama_tiny", *overrides])


WORDS = ["low", "rank", "gradient", "projection", "keeps", "the", "optimizer", "state", "small"]


def _train_cfg(tmp, *overrides):
    corpus = tmp / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, 300)), encoding="utf-8")
    return load_config(None, [
        "model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus}",
        f"data.cache_dir={tmp / 'cache'}", "batch_size=4", "seq_len=16",
        "optimizer.name=galore_adamw", "optimizer.rank=4", "optimizer.update_proj_gap=2",
        "optimizer.lr=0.01", "schedule.name=constant", "schedule.warmup_steps=0",
        "log_every=1", "eval.every=0", "checkpoint.every=2", "checkpoint.async_save=false",
        "progress=false", "tensorboard=false", f"run_dir={tmp / 'run'}", *overrides])


@pytest.mark.slow
def test_unrolled_checkpoint_resumes_as_scanned_per_layer_run(tmp_path):
    """A run saved with unrolled layers continues with scanned layers and per-layer updates.

    Without clipping the per-layer continuation equals the unrolled continuation
    (to float32 rounding: the scan is compiled differently), and the overlap
    telemetry keeps its ``layers/<i>/...`` names.
    """
    from train.loop import run
    from train.metrics_log import read_metrics

    base = ("optimizer.grad_clip=0",)
    run(_train_cfg(tmp_path, "steps=4", *base))
    reference = tmp_path / "reference"
    import shutil

    shutil.copytree(tmp_path / "run", reference)
    run(_train_cfg(tmp_path, "steps=6", *base))                      # unrolled continuation
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    want = [r for r in records if "loss" in r]
    want_overlap = [r["overlap"] for r in records if "overlap" in r]
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(reference, tmp_path / "run")
    run(_train_cfg(tmp_path, "steps=6", "model.scan_layers=true", "per_layer_update=true", *base))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    got = [r for r in records if "loss" in r]
    got_overlap = [r["overlap"] for r in records if "overlap" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5)
    assert got_overlap and [sorted(o) for o in got_overlap] == [sorted(o) for o in want_overlap]
    assert "layers/1/attn/q_proj/kernel" in got_overlap[-1]
    for o, w in zip(got_overlap, want_overlap):
        np.testing.assert_allclose([o[k] for k in sorted(o)], [w[k] for k in sorted(w)],
                                   atol=1e-4)


@pytest.mark.slow
def test_per_layer_nonfinite_step_keeps_the_state(weights):
    """With the per-layer step the non-finite policy acts per group; a NaN weight
    makes the loss and every group's gradient NaN, so no group is updated (the
    state is bit for bit the input state) and the step is reported non-finite."""
    cfg = _cfg("galore_adamw", per_layer_update=True, **{"nonfinite.skip": True})
    trainer = build_trainer(cfg)
    state = trainer.init(jax.random.PRNGKey(0))
    params = state.params
    poisoned = jax.tree.map(np.array, weights)
    poisoned["layers"][1]["mlp"]["down_proj"]["kernel"][0, 0] = np.nan
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.array, poisoned))
    state = state._replace(params=params, opt_state=jax.jit(trainer.tx.init)(params))
    before = _flat((state.params, state.opt_state))
    state, metrics = trainer.step(state, trainer.put_batch(_batches(1)[0]))
    assert bool(metrics["nonfinite"])
    after = _flat((state.params, state.opt_state))
    assert sorted(after) == sorted(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
