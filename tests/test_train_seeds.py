"""``lowrank-train ... seeds=N``: N seeds as one vmapped program, one run directory each.

The property that makes the multi-seed program trustworthy: seed ``k`` of the
vmapped run ends bit-identical (every parameter, optimizer-state leaf, projector
and key of the final checkpoint) to the same seed trained alone by the ordinary
single-seed path; its logged losses (scalar reductions that XLA may order
differently in the batched program) agree to fp32 rounding. SARA with a refresh
every two steps covers the SVDs of the projector refreshes and per-seed sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_support import saved_state, without_timing, write_corpus

import train.seeds as seeds_mod
from train.config import load_config
from train.loop import run
from train.seeds import run_seeds, seed_config

WORDS = ["seeds", "vary", "the", "init", "while", "data", "order", "stays", "fixed", "and",
         "each", "run", "keeps", "its", "own", "directory", "for", "analysis"]
STEPS = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seeds")
    return {"docs": write_corpus(root / "corpus", WORDS, docs=12, seed=2), "cache": root / "cache"}


def _config(corpus: dict[str, Path], run_dir: Path, *extra: str):
    return load_config(None, [
        "model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus['docs']}",
        f"data.cache_dir={corpus['cache']}", f"steps={STEPS}", "batch_size=4", "seq_len=32",
        "optimizer.rank=4", "optimizer.update_proj_gap=2", "optimizer.lr=0.01",
        "log_every=1", "eval.every=2", "eval.batches=2", "checkpoint.every=2",
        "checkpoint.async_save=false", "progress=false", "tensorboard=false",
        f"run_dir={run_dir}", *extra])


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    return saved_state(run_dir, STEPS)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return without_timing(rows)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sara_adamw"])
def test_vmapped_seed_equals_the_seed_alone(corpus, tmp_path, optimizer):
    group = tmp_path / "group"
    summaries = run_seeds(_config(corpus, group, f"optimizer.name={optimizer}", "seeds=2",
                                  "seed=3", "seeds_mode=vmap"))
    assert [s["seed"] for s in summaries] == [3, 4]
    assert sorted(p.name for p in group.iterdir()) == ["seed_3", "seed_4"]

    alone = tmp_path / "alone"
    run(_config(corpus, alone, f"optimizer.name={optimizer}", "seed=4", "data_seed=3"))
    vm, single = _final(group / "seed_4"), _final(alone)
    assert vm.keys() == single.keys()
    for key, value in single.items():
        assert value.dtype == vm[key].dtype and np.array_equal(value, vm[key]), key
    # Logged losses are scalar reductions that XLA may order differently in the
    # batched program (last-bit differences); everything else in the log is exact.
    rows_vm, rows_alone = _rows(group / "seed_4"), _rows(alone)
    assert len(rows_vm) == len(rows_alone)
    for a, b in zip(rows_vm, rows_alone):
        assert a.keys() == b.keys()
        for key in a:
            if key in ("loss", "val_loss", "val_ppl"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), (key, a["step"])
            else:
                assert a[key] == b[key], (key, a["step"])
    # The two seeds of the group really differ (different init, same data order).
    other = _final(group / "seed_3")
    assert not np.array_equal(other["['params']['lm_head']['kernel']['value']"],
                              vm["['params']['lm_head']['kernel']['value']"])


@pytest.mark.slow
def test_seed_configs_and_sequential_fallback(corpus, tmp_path, monkeypatch):
    base = _config(corpus, tmp_path / "g", "optimizer.name=adamw", "seeds=2", "seed=5",
                   "steps=2", "eval.every=0")
    c1 = seed_config(base, 1)
    assert (c1.seed, c1.seeds, c1.data_seed) == (6, 1, 5)
    assert c1.run_dir == str(tmp_path / "g" / "seed_6")
    per_seed = seed_config(load_config(None, ["seeds=2", "seed_data=per_seed"]), 1)
    assert per_seed.data_seed is None and per_seed.seed == 1

    monkeypatch.setattr(seeds_mod, "_available_bytes", lambda: 1)
    summaries = run_seeds(base)
    assert [s["seed"] for s in summaries] == [5, 6]
    assert all((tmp_path / "g" / f"seed_{s}" / "checkpoints" / "2").is_dir() for s in (5, 6))
