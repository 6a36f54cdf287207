"""Cost of the non-finite step guard: the trainer's step with and without it, interleaved.

The guard (``train/finite_guard.py``) checks the loss, the gradient norm and every
floating-point leaf of the new parameters and optimizer state, and selects the old
state leaf by leaf when the step is not finite; XLA should fuse both into the update,
so the guarded step should run at the speed of the unguarded one (target: ratio of
tokens/s guarded / unguarded >= 0.97).

For each optimizer: the application's step (:func:`train.step.build_trainer`) as it is,
and the same step built with the guard replaced by a constant ``nonfinite=False``.
Both are compiled first, then timed interleaved for ``--rounds`` rounds of ``--steps``
steps; the medians and their ratio are printed::

    python benchmarks/finite_guard.py                      # LLaMA-20M-like, batch 16 x 256
    python benchmarks/finite_guard.py --preset llama_tiny --seq-len 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as lowrank-train (see train/cli.py)

import jax
import jax.numpy as jnp
import numpy as np

import train.step as train_step
from train.config import config_from_dict
from train.finite_guard import NONFINITE


def _unguarded(step, skip=True):
    """The step without the guard (its metrics keep the key the loop reads)."""

    def plain(state, batch):
        new, metrics = step(state, batch)
        return new, {**metrics, NONFINITE: jnp.bool_(False)}

    return plain


def _config(opt: str, args: argparse.Namespace):
    return config_from_dict({
        "model": {"preset": args.preset, "overrides": {"vocab_size": args.vocab}},
        "optimizer": {"name": opt, "lr": 1e-3, "rank": args.rank, "update_proj_gap": 10_000},
        "steps": 10_000, "batch_size": args.batch, "seq_len": args.seq_len,
    })


def _time(trainer, state, batch, n: int):
    t0 = time.perf_counter()
    for _ in range(n):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama_20m")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="steps timed per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--optimizers", default="adamw,galore_adamw")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    host = {"tokens": rng.integers(0, args.vocab, (args.batch, args.seq_len + 1), np.int32),
            "mask": np.ones((args.batch, args.seq_len), np.float32)}
    runs = {}
    for opt in args.optimizers.split(","):
        for kind in ("guarded", "unguarded"):
            if kind == "guarded":
                tr = train_step.build_trainer(_config(opt, args))
            else:
                with mock.patch.object(train_step, "guard_step", _unguarded):
                    tr = train_step.build_trainer(_config(opt, args))
            batch = tr.put_batch(host)
            state, _ = _time(tr, tr.init(jax.random.PRNGKey(0)), batch, 2)  # compile
            runs[(opt, kind)] = [tr, state, batch, []]
    for _ in range(args.rounds):
        for run in runs.values():
            run[1], seconds = _time(run[0], run[1], run[2], args.steps)
            run[3].append(seconds)

    tokens = args.batch * args.seq_len
    out = {"device": str(jax.devices()[0]), "shape": vars(args), "results": {}}
    for opt in args.optimizers.split(","):
        g = statistics.median(runs[(opt, "guarded")][3])
        u = statistics.median(runs[(opt, "unguarded")][3])
        out["results"][opt] = {"guarded_ms": 1e3 * g, "unguarded_ms": 1e3 * u,
                               "ratio_tokens_per_s": u / g}
        print(f"{opt:14s} guarded {1e3 * g:8.2f} ms ({tokens / g:9,.0f} tok/s)  unguarded "
              f"{1e3 * u:8.2f} ms ({tokens / u:9,.0f} tok/s)  guarded/unguarded tokens/s "
              f"{u / g:.3f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
