"""Exact resume: a run killed with SIGKILL and restarted equals an uninterrupted one.

For AdamW and SARA (GaLore's SVD refresh plus random projector state) on
``llama_tiny`` and a small synthetic text corpus, three real ``lowrank-train``
processes per optimizer:

* A: 16 steps, uninterrupted;
* B: the same in another run_dir, killed with SIGKILL once ``metrics.jsonl``
  shows step >= 7 (checkpoints every 2 steps, async);
* C: B's command again: it resumes from B's latest finalized checkpoint.

Projectors refresh at steps 1, 5, 9, 13 (``update_proj_gap=4``), so at least one
refresh happens after the restart point. The final train states (params,
optimizer state with projectors and PRNG keys, counters) must be bit-identical
and the metrics lines after the restart equal. All processes of one phase run
concurrently.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from train_support import saved_state, without_timing, write_corpus

REPO = Path(__file__).resolve().parents[1]
# ~25 s idle; resuming is also covered in make test by test_train_cli (fall-back and
# resume in-process) and test_distributed_train (resume on another mesh).
pytestmark = pytest.mark.slow
OPTIMIZERS = ("adamw", "sara_adamw")
STEPS, KILL_AFTER = 16, 7
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "low", "rank", "gradient", "projection", "keeps", "optimizer", "memory", "small", "and", "training", "loss", "goes", "down", "slowly"]


def _corpus(root: Path) -> Path:
    return write_corpus(root, WORDS, docs=24, seed=0)


def _overrides(opt: str, corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    return [
        "model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus}",
        f"data.cache_dir={cache}", f"steps={STEPS}", "batch_size=4", "seq_len=32",
        f"optimizer.name={opt}", "optimizer.rank=8", "optimizer.update_proj_gap=4",
        "optimizer.lr=0.01" if opt != "adamw" else "optimizer.lr=0.003",
        "log_every=1", "eval.every=8", "eval.batches=2", "checkpoint.every=2",
        "checkpoint.keep=3", "progress=false", "tensorboard=false", f"run_dir={run_dir}",
    ]


def _launch(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    fh = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=env,
                            stdout=fh, stderr=subprocess.STDOUT)


def _max_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    best = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                best = max(best, int(json.loads(line).get("step", 0)))
            except (json.JSONDecodeError, ValueError):
                pass
    return best


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_state(run_dir: Path) -> list[tuple[str, np.ndarray]]:
    return list(saved_state(run_dir, STEPS).items())


def _kill_b_runs(procs: dict, facts: dict) -> None:
    """SIGKILL each run B once its log shows step >= KILL_AFTER; record its exit and steps."""
    deadline = time.monotonic() + 300   # four concurrent runs on a busy 2-core machine
    pending = set(OPTIMIZERS)
    while pending and time.monotonic() < deadline:
        for opt in list(pending):
            proc = procs[opt, "B"]
            if _max_step(facts[opt]["B"]) < KILL_AFTER and proc.poll() is None:
                continue
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            facts[opt]["B_rc"] = proc.wait()
            facts[opt]["B_steps"] = _max_step(facts[opt]["B"])
            pending.discard(opt)
        time.sleep(0.01)
    for opt in pending:
        procs[opt, "B"].kill()
        pytest.fail(f"{opt}: run B never reached step {KILL_AFTER}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A, B (killed) and C (resumed) for every optimizer; returns their facts."""
    root = tmp_path_factory.mktemp("resume")
    corpus, cache = _corpus(root / "corpus"), root / "cache"
    from train.data import DataConfig, build_batches

    # Tokenise once here so concurrent children only read the cache.
    data_cfg = DataConfig(source="text_dir", path=str(corpus), cache_dir=str(cache))
    for split in ("train", "validation"):
        next(build_batches(data_cfg, split=split, seq_len=32, batch_size=4))

    # One BLAS thread: XLA already runs the LAPACK custom calls on its own threads and
    # nine concurrent processes on two cores would otherwise spin OpenBLAS threads.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    facts = {}
    procs = {}
    for opt in OPTIMIZERS:
        a, b = root / f"{opt}_A", root / f"{opt}_B"
        facts[opt] = {"A": a, "B": b}
        procs[opt, "A"] = _launch(_overrides(opt, corpus, cache, a), env, root / f"{opt}_A.log")
        procs[opt, "B"] = _launch(_overrides(opt, corpus, cache, b), env, root / f"{opt}_B.log")

    _kill_b_runs(procs, facts)

    for opt in OPTIMIZERS:
        b = facts[opt]["B"]
        procs[opt, "C"] = _launch(_overrides(opt, corpus, cache, b), env, root / f"{opt}_C.log")
    for (opt, which), proc in procs.items():
        if which != "B":
            rc = proc.wait(timeout=180)
            log = (root / f"{opt}_{which}.log").read_text()
            assert rc == 0, f"{opt} run {which} failed:\n{log[-3000:]}"
            facts[opt][f"{which}_log"] = log
    return facts


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_killed_run_resumes_bit_identically(runs, opt):
    f = runs[opt]
    assert f["B_rc"] == -signal.SIGKILL, "run B finished before it could be killed"
    assert KILL_AFTER <= f["B_steps"] < STEPS
    m = re.search(r"resumed from step (\d+)", f["C_log"])
    assert m, f["C_log"][-2000:]
    restart = int(m.group(1))
    assert 2 <= restart <= f["B_steps"]
    print(f"{opt}: killed after step {f['B_steps']}, resumed from step {restart}")

    final_a, final_b = _final_state(f["A"]), _final_state(f["B"])
    assert [k for k, _ in final_a] == [k for k, _ in final_b]
    for (name, x), (_, y) in zip(final_a, final_b):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{opt}: {name} differs"

    rows_a = [r for r in _rows(f["A"]) if r["step"] > restart]
    rows_b = [r for r in _rows(f["B"]) if r["step"] > restart]
    assert without_timing(rows_a) == without_timing(rows_b)
    assert [r["step"] for r in _rows(f["B"]) if "loss" in r] == list(range(1, STEPS + 1))
    if opt != "adamw":  # a projector refresh (with a logged overlap) after the restart
        assert any("overlap" in r and r["step"] > restart for r in rows_b)
