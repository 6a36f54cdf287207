"""Tokens/s of the jitted train step: AdamW vs GaLore-AdamW, timed interleaved.

The step is the application's own (:func:`train.step.build_trainer`: grad,
global-norm clip, optimizer with the cosine schedule, donated state). Default
shape: LLaMA-20M-like (d 256, ffn 688, 4 heads, 4 layers) with a byte vocabulary
(256), sequences of 256 tokens, batch 16, synthetic tokens.

Each round, for each optimizer in turn: a fresh state (so its first step is a
projector refresh for GaLore, timed on its own), then ``--steps`` ordinary steps
timed together. Reported per optimizer: the median over rounds of the ordinary
step time, the median refresh-step time, and tokens/s both for ordinary steps
and amortised over one refresh period ``(refresh + (T-1) * step) / T``::

    python benchmarks/train_step.py                 # defaults below
    python benchmarks/train_step.py --rounds 9 --steps 30 --rank 64 --gap 200

OpenBLAS runs single-threaded unless ``OPENBLAS_NUM_THREADS`` is set, as in
``lowrank-train``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as lowrank-train (see train/cli.py)

import jax
import numpy as np

from train.config import config_from_dict
from train.step import build_trainer


def _config(opt: str, args: argparse.Namespace):
    return config_from_dict({
        "model": {"preset": args.preset, "overrides": {"vocab_size": args.vocab}},
        "optimizer": {"name": opt, "lr": 1e-2 if opt != "adamw" else 1e-3, "rank": args.rank,
                      "update_proj_gap": args.gap, "scale": 0.25},
        "steps": 10_000, "batch_size": args.batch, "seq_len": args.seq_len,
    })


def _time_steps(trainer, state, batch, n: int):
    t0 = time.perf_counter()
    for _ in range(n):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama_20m")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--gap", type=int, default=200)
    p.add_argument("--steps", type=int, default=20, help="ordinary steps timed per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--optimizers", default="adamw,galore_adamw")
    args = p.parse_args(argv)
    opts = args.optimizers.split(",")

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1), dtype=np.int32)
    host_batch = {"tokens": tokens, "mask": np.ones((args.batch, args.seq_len), np.float32)}
    trainers, batches = {}, {}
    for opt in opts:
        tr = build_trainer(_config(opt, args))
        trainers[opt], batches[opt] = tr, tr.put_batch(host_batch)
        state = tr.init(jax.random.PRNGKey(0))  # compile init + step (+ refresh branch)
        _time_steps(tr, state, batches[opt], 2)

    step_t = {o: [] for o in opts}
    refresh_t = {o: [] for o in opts}
    for _ in range(args.rounds):
        for opt in opts:
            tr = trainers[opt]
            state = jax.block_until_ready(tr.init(jax.random.PRNGKey(0)))
            state, t_refresh = _time_steps(tr, state, batches[opt], 1)  # count 0: a refresh
            state, t_step = _time_steps(tr, state, batches[opt], args.steps)
            refresh_t[opt].append(t_refresh)
            step_t[opt].append(t_step)

    tokens_per_step = args.batch * args.seq_len
    out = {"device": str(jax.devices()[0]), "shape": vars(args), "results": {}}
    for opt in opts:
        s, r = statistics.median(step_t[opt]), statistics.median(refresh_t[opt])
        amortised = (r + (args.gap - 1) * s) / args.gap
        out["results"][opt] = {
            "step_ms": 1e3 * s, "refresh_step_ms": 1e3 * r,
            "tokens_per_s": tokens_per_step / s,
            "tokens_per_s_amortised": tokens_per_step / amortised,
        }
        print(f"{opt:14s} step {1e3 * s:8.2f} ms  refresh step {1e3 * r:8.2f} ms  "
              f"{tokens_per_step / s:10,.0f} tok/s  ({tokens_per_step / amortised:10,.0f} "
              f"tok/s amortised over T={args.gap})")
    if "adamw" in opts and "galore_adamw" in opts:
        res = out["results"]
        ratio = res["galore_adamw"]["tokens_per_s"] / res["adamw"]["tokens_per_s"]
        ratio_am = (res["galore_adamw"]["tokens_per_s_amortised"]
                    / res["adamw"]["tokens_per_s_amortised"])
        out["ratio_galore_over_adamw"] = {"steady": ratio, "amortised": ratio_am}
        print(f"galore/adamw tokens/s ratio: {ratio:.3f} (steady), {ratio_am:.3f} (amortised)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
