"""``lowrank-train`` on a (data, fsdp, tensor) mesh of simulated CPU devices.

A GaLore run on mesh (2, 2, 2) logs the losses of the same run on one device
(fp32 tolerance, across a projector refresh), shards the parameters and the
optimizer state, and a run directory written on 8 devices resumes on a mesh of
2 devices.

The rank (4) stays below the numerical rank of this tiny model's gradients: with a
rank above it the trailing singular vectors are round-off, another summation
order (another mesh) picks other ones, and Adam's normalisation turns them into
full-size updates, so runs then differ beyond fp32 tolerance on any two meshes.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from train.config import ConfigError, load_config
from train.loop import prepare, run

WORDS = ["low", "rank", "gradient", "projection", "keeps", "the", "optimizer", "state",
         "small", "while", "loss", "goes", "down"]


def _corpus(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS, size=200)), encoding="utf-8")
    return root


def _cfg(tmp: Path, run_dir: str, steps: int, *mesh: str):
    return load_config(None, [
        "model.preset=llama_tiny", "data.source=text_dir", f"data.path={_corpus(tmp / 'c')}",
        f"data.cache_dir={tmp / 'cache'}", f"steps={steps}", "batch_size=8", "seq_len=16",
        "optimizer.name=galore_adamw", "optimizer.rank=4", "optimizer.update_proj_gap=2",
        "optimizer.lr=0.01", "schedule.name=constant", "schedule.warmup_steps=0",
        "log_every=1", "eval.every=0", "checkpoint.every=2",
        "checkpoint.async_save=false", "progress=false", "tensorboard=false",
        f"run_dir={tmp / run_dir}", *mesh])


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# slow: the sharded step and a restore onto another mesh stay in make test through
# test_distributed.py (GaLore LLaMA on meshes, restores onto other meshes)
@pytest.mark.slow
def test_train_on_mesh_matches_one_device_and_resumes_on_another_mesh(tmp_path):
    mesh8 = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    r = prepare(_cfg(tmp_path, "m8", 4, *mesh8))
    q = r.state.params["layers"][0]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == P("fsdp", "tensor")
    mu = r.state.opt_state[1][0].inner_states["lowrank"].inner_state.inner_state.mu
    assert mu["layers"][0]["attn"]["q_proj"]["kernel"].sharding.spec != P()
    r.store.close()
    run(_cfg(tmp_path, "m8", 4, *mesh8))
    run(_cfg(tmp_path, "m8", 6, "mesh.fsdp=2"))           # resume on 2 devices
    run(_cfg(tmp_path, "one", 6))
    got, want = _losses(tmp_path / "m8"), _losses(tmp_path / "one")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                               rtol=1e-4)


def test_mesh_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="use mesh.data only"):
        _cfg(tmp_path, "x", 2, "mesh.data=2", "data_parallel=2")
    with pytest.raises(ConfigError, match="not divisible by mesh.data x mesh.fsdp"):
        _cfg(tmp_path, "x", 2, "mesh.fsdp=3")
    with pytest.raises(ValueError, match="needs 16 devices"):
        prepare(_cfg(tmp_path, "x", 2, "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2"))
    assert jax.device_count() == 8
