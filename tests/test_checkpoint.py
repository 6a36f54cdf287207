"""Checkpoints: fall back past a damaged latest step; an interrupted save is never visible."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import CheckpointStore, state_checksums
from train.config import CheckpointConfig

REPO = Path(__file__).resolve().parents[1]
# A failed tensorstore read leaves orbax coroutines unawaited; that is orbax's business.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step: int) -> dict:
    """A small train-state-like pytree whose values depend on ``step``."""
    k = jax.random.PRNGKey(step)
    return {"params": {"w": jax.random.normal(k, (64, 32)),
                       "b": jnp.full((32,), step, jnp.bfloat16)},
            "opt_state": (jnp.int32(step), jax.random.normal(k, (8, 32))),
            "rng": jax.random.PRNGKey(100 + step)}


def _abstract() -> dict:
    return jax.eval_shape(lambda: _state(0))


def _store(path: Path, warnings: list[str] | None = None, async_save: bool = True):
    cfg = CheckpointConfig(every=1, keep=5, async_save=async_save)
    return CheckpointStore(path, cfg, warn=(warnings.append if warnings is not None else print))


def _save_steps(path: Path, steps=(1, 2, 3)) -> None:
    store = _store(path)
    for s in steps:
        store.save(s, _state(s), {"batches": s}, {"note": "test"})
    store.close()


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, how: str) -> None:
    f = _largest_file(step_dir / "state")
    if how == "truncate":
        with f.open("r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    elif how == "delete":
        f.unlink()
    elif how == "bitflip":  # same size, different bytes: only the checksums notice
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0x55
        f.write_bytes(bytes(data))


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no_manifest"])
@pytest.mark.parametrize("how", ["truncate", "delete", "bitflip"])
def test_damaged_latest_falls_back_to_previous(tmp_path, how, manifest):
    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt)
    assert sorted(p.name for p in (tmp_path / "checkpoint_manifests").iterdir()) == [
        "1.json", "2.json", "3.json"]
    if not manifest:  # e.g. killed right after the save: orbax's read must notice
        (tmp_path / "checkpoint_manifests" / "3.json").unlink()
    _damage(ckpt / "3", how)

    warnings: list[str] = []
    store = _store(ckpt, warnings)
    restored = store.restore_latest(_abstract())
    gc.collect()  # orbax's unawaited read coroutines of the damaged step go here
    assert restored is not None and restored.step == 2
    assert _equal(restored.state, _state(2))
    assert restored.data == {"batches": 2} and restored.config == {"note": "test"}
    assert warnings[0].startswith("checkpoint at step 3 is unreadable (")
    assert warnings[0].endswith("); falling back to step 2"), warnings[0]
    expected = {"truncate": "bytes, expected", "delete": "is missing",
                "bitflip": "checksum mismatch"}[how]
    if manifest or how == "bitflip":
        assert expected in warnings[0], warnings[0]
    # The damaged step is moved aside, so the run can write step 3 again.
    assert store.all_steps() == [1, 2]
    assert any(p.name.startswith("3-") for p in (tmp_path / "corrupt_checkpoints").iterdir())
    store.save(3, _state(3), {"batches": 3}, {})
    store.close()
    again = _store(ckpt).restore_latest(_abstract())
    assert again.step == 3 and _equal(again.state, _state(3))


def test_all_damaged_starts_from_scratch(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, steps=(1,))
    _damage(ckpt / "1", "delete")
    warnings: list[str] = []
    assert _store(ckpt, warnings).restore_latest(_abstract()) is None
    gc.collect()
    assert warnings[0].endswith("; starting from scratch")


def test_restore_leaves_the_process_hooks_and_logging_as_they_were(tmp_path, caplog):
    """A fall-back restore silences orbax's leftovers only while it runs; its warning goes
    through ``logging`` (the default ``warn``)."""
    import logging
    import sys

    ckpt = tmp_path / "checkpoints"
    _save_steps(ckpt, steps=(1, 2))
    _damage(ckpt / "2", "delete")
    hooks = sys.unraisablehook, sys.excepthook
    asyncio_level = logging.getLogger("asyncio").level
    cfg = CheckpointConfig(every=1, keep=5, async_save=False)
    with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
        restored = CheckpointStore(ckpt, cfg).restore_latest(_abstract())
    assert restored is not None and restored.step == 1
    assert (sys.unraisablehook, sys.excepthook) == hooks
    assert logging.getLogger("asyncio").level == asyncio_level
    assert any(r.getMessage().startswith("checkpoint at step 2 is unreadable")
               for r in caplog.records)


def test_checksums_see_every_leaf():
    a = _state(1)
    b = jax.tree.map(lambda x: x, a)
    b["params"]["w"] = a["params"]["w"].at[5, 7].add(1e-3)
    ca, cb = state_checksums(a), state_checksums(b)
    assert len(ca) == len(jax.tree.leaves(a))
    assert [x != y for x, y in zip(ca, cb)].count(True) == 1


_DIE_BEFORE_RENAME = """
import os, sys
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from train.checkpoint import CheckpointStore
from train.config import CheckpointConfig

store = CheckpointStore(sys.argv[1], CheckpointConfig(every=1, keep=5, async_save=True))
state = {{"w": jnp.arange(4096, dtype=jnp.float32)}}
store.save(1, state, {{}}, {{}})
store.wait()

async def die(self):  # everything is written; the process dies before the rename
    os._exit(17)
atomicity.AtomicRenameTemporaryPath.finalize = die
store.save(2, {{"w": state["w"] + 1}}, {{}}, {{}})
store.wait()
"""


def test_interrupted_save_is_never_visible(tmp_path):
    ckpt = tmp_path / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", _DIE_BEFORE_RENAME.format(), str(ckpt)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 17, proc.stderr[-2000:]
    names = sorted(p.name for p in ckpt.iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # half-written

    warnings: list[str] = []
    store = _store(ckpt, warnings)
    assert store.all_steps() == [1]
    abstract = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32)}
    restored = store.restore_latest(abstract)
    assert restored.step == 1 and not warnings
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.arange(4096))
    store.close()
    # Opening a manager removed the leftover temporary directory.
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpt.iterdir())


_SAVE_FOREVER = """
import sys
import jax, jax.numpy as jnp
from train.checkpoint import CheckpointStore
from train.config import CheckpointConfig

store = CheckpointStore(sys.argv[1], CheckpointConfig(every=1, keep=3, async_save=True))
w = jnp.zeros((512, 1024), jnp.float32)  # 2 MiB per save
step = 0
while True:
    step += 1
    store.save(step, {"w": w + step}, {"step": step}, {})
    if step == 2:
        print("saving", flush=True)
"""


def test_sigkill_during_async_saves_leaves_only_complete_steps(tmp_path):
    ckpt = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(ckpt)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(1.0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    warnings: list[str] = []
    store = _store(ckpt, warnings)
    steps = store.all_steps()
    assert steps, "no checkpoint was finalized"
    abstract = {"w": jax.ShapeDtypeStruct((512, 1024), jnp.float32)}
    restored = store.restore_latest(abstract)
    assert restored.step == steps[-1] and not warnings
    assert float(np.asarray(restored.state["w"])[0, 0]) == restored.step
    assert restored.data == {"step": restored.step}
    store.close()
