"""``lowrank-train`` with the architecture methods: CoLA, SLTrain, LoRA and ReLoRA.

In-process runs of ``llama_tiny`` on a small synthetic corpus:

* each ``model.linear`` trains (finite, decreasing loss) and the variables that
  must not train (LoRA's frozen ``kernel``, SLTrain's ``sparse_index``) are
  saved in the checkpoint and unchanged between checkpoints;
* ReLoRA resets after updates ``k * reset_every``: the checkpoint at a reset step
  holds ``B = 0`` and a merged ``W``, and the learning rate restarts;
* exact resume across a reset boundary: a run restarted from the checkpoint at the
  reset step, and from one just after it, ends bit-identical to the uninterrupted
  run (LoRA dropout on, so the dropout RNG streams are part of what must resume).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_support import saved_state, write_corpus

from train.config import ConfigError, load_config
from train.loop import run

WORDS = ["low", "rank", "adapters", "merge", "into", "frozen", "weights", "every", "few",
         "steps", "and", "the", "loss", "keeps", "going", "down", "while", "memory", "stays"]
STEPS, RESET = 6, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    docs = write_corpus(root / "corpus", WORDS, docs=16, seed=1)
    return {"root": root, "docs": docs, "cache": root / "cache"}


def _config(corpus: dict[str, Path], run_dir: Path, *extra: str):
    return load_config(None, [
        "model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus['docs']}",
        f"data.cache_dir={corpus['cache']}", f"steps={STEPS}", "batch_size=4", "seq_len=32",
        "optimizer.name=adamw", "optimizer.lr=0.003", "log_every=1", "eval.every=0",
        "checkpoint.every=1", "checkpoint.keep=10", "checkpoint.async_save=false",
        "progress=false", "tensorboard=false", f"run_dir={run_dir}", *extra])


def _state(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    return saved_state(run_dir, step)


def _pick(state: dict[str, np.ndarray], *parts: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if all(p in k for p in parts)}


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("linear, frozen_name", [
    ("cola", None),
    pytest.param("sltrain", "sparse_index", marks=pytest.mark.slow),
    pytest.param("lora", "'kernel'", marks=pytest.mark.slow)])
def test_each_linear_trains_and_keeps_frozen_state(corpus, tmp_path, linear, frozen_name):
    run_dir = tmp_path / linear
    out = run(_config(corpus, run_dir, f"model.linear={linear}",
                      "model.overrides.linear_rank=8", "optimizer.lr=0.01"))
    losses = _losses(run_dir)
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses
    assert out["loss"] == pytest.approx(losses[-1])
    first, last = _state(run_dir, 1), _state(run_dir, STEPS)
    trained = _pick(last, "params", "layers")
    assert all(not np.array_equal(v, first[k]) for k, v in trained.items()
               if "lora_b" in k or "cola" in k), "a factor did not train"
    if frozen_name is None:
        assert not _pick(last, "model_state")
        return
    frozen = _pick(last, "model_state", frozen_name)
    assert len(frozen) == 2 * 7  # two blocks of seven projections
    for k, v in frozen.items():
        assert np.array_equal(v, first[k]), f"{k} changed"


RELORA = ("model.linear=lora", "model.overrides.linear_rank=4",
          "model.overrides.lora_dropout=0.1", f"relora.reset_every={RESET}",
          "relora.restart_warmup_steps=1", "schedule.warmup_steps=1")


@pytest.fixture(scope="module")
def relora_run(corpus) -> Path:
    """One uninterrupted ReLoRA run (dropout on), checkpoints at every step."""
    run_dir = corpus["root"] / "relora"
    run(_config(corpus, run_dir, *RELORA))
    return run_dir


@pytest.mark.slow
def test_relora_resets_merge_and_restart_the_schedule(relora_run):
    before, at = _state(relora_run, RESET - 1), _state(relora_run, RESET)
    b_at = _pick(at, "['params']", "lora_b")
    assert b_at and all(not v.any() for v in b_at.values()), "B not zeroed at the reset"
    # The first update after a reset runs at lr 0 (re-warmup), the second moves B.
    assert not any(_state(relora_run, RESET + 1)[k].any() for k in b_at)
    assert any(_state(relora_run, RESET + 2)[k].any() for k in b_at), "B does not train again"
    kernels = _pick(at, "model_state", "'kernel'")
    assert all(not np.array_equal(v, before[k]) for k, v in kernels.items()), "W not merged"
    rows = [json.loads(x) for x in (relora_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "relora_reset" in r] == [RESET]  # never after the last
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert lr[RESET + 1] == 0.0 and lr[RESET + 2] > 0.0  # the re-warmup starts from zero


@pytest.mark.slow
@pytest.mark.parametrize("restart", [RESET, RESET + 1])
def test_relora_resume_across_reset_is_exact(corpus, relora_run, tmp_path, restart):
    b = tmp_path / "b"
    shutil.copytree(relora_run, b)
    for step_dir in (b / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > restart:
            shutil.rmtree(step_dir)
    for manifest in (b / "checkpoint_manifests").glob("*.json"):
        if int(manifest.stem) > restart:
            manifest.unlink()
    run(_config(corpus, b, *RELORA))
    final_a, final_b = _state(relora_run, STEPS), _state(b, STEPS)
    assert final_a.keys() == final_b.keys()
    assert _pick(final_a, "rngs"), "dropout RNG streams are not in the saved state"
    for k, v in final_a.items():
        assert np.array_equal(v, final_b[k]), f"{k} differs after resuming at {restart}"


def test_relora_config_errors(corpus, tmp_path):
    with pytest.raises(ConfigError, match="needs model.linear=lora"):
        _config(corpus, tmp_path, "relora.reset_every=2")
    with pytest.raises(ConfigError, match="unknown model.linear"):
        _config(corpus, tmp_path, "model.linear=sparse")
    with pytest.raises(ConfigError, match="relora.prune"):
        _config(corpus, tmp_path, "model.linear=lora", "relora.reset_every=3",
                "relora.prune=largest")
