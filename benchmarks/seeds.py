"""Throughput of N seeds trained as one vmapped step against N runs one after the other.

    python benchmarks/seeds.py [--model llama_demo] [--optimizer galore_adamw]
                               [--seeds 1 2 3] [--steps 10] [--batch 16] [--seq 128]

For each N: ``N x steps`` single-seed steps (the jitted step of ``lowrank-train``,
one seed after the other) and ``steps`` vmapped steps over N stacked states
(:mod:`train.seeds`), both after one compiling warm-up step, on the same random
batches. Prints tokens/s of both and their ratio (vmapped / sequential) measured
in this one run; the ratio is > 1 when batching the seeds uses the device better.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from train.config import load_config
from train.programs import stack
from train.step import build_trainer


def _batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32),
             "mask": np.ones((batch, seq), np.float32)} for _ in range(n)]


def _block(tree) -> None:
    jax.block_until_ready(jax.tree.leaves(tree))


def measure(args: argparse.Namespace, n: int) -> tuple[float, float]:
    """(sequential tokens/s, vmapped tokens/s) for ``n`` seeds."""
    cfg = load_config(None, [f"model.preset={args.model}", f"optimizer.name={args.optimizer}",
                             f"optimizer.rank={args.rank}", "optimizer.update_proj_gap=1000",
                             f"batch_size={args.batch}", f"seq_len={args.seq}",
                             "data.source=default"])
    tr = build_trainer(cfg)
    batches = _batches(args.steps + 1, args.batch, args.seq, min(tr.model_cfg.vocab_size, 256))
    tokens = args.steps * args.batch * args.seq * n

    states = [tr.init(jax.random.PRNGKey(k)) for k in range(n)]
    for k in range(n):  # warm-up (compiles once) and the first step (projector refresh)
        states[k], _ = tr.step(states[k], tr.put_batch(batches[0]))
    _block(states)
    t0 = time.perf_counter()
    for k in range(n):
        for b in batches[1:]:
            states[k], _ = tr.step(states[k], tr.put_batch(b))
    _block(states)
    sequential = tokens / (time.perf_counter() - t0)

    vstep = jax.jit(jax.vmap(tr.step_fn), donate_argnums=0)
    stacked = stack([tr.init(jax.random.PRNGKey(k)) for k in range(n)])
    put = [{key: jnp.stack([v] * n) for key, v in b.items()} for b in batches]
    stacked, _ = vstep(stacked, put[0])
    _block(stacked)
    t0 = time.perf_counter()
    for b in put[1:]:
        stacked, _ = vstep(stacked, b)
    _block(stacked)
    vmapped = tokens / (time.perf_counter() - t0)
    return sequential, vmapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama_demo")
    p.add_argument("--optimizer", default="galore_adamw")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; model {args.model}, "
          f"{args.optimizer}, batch {args.batch} x {args.seq}, {args.steps} timed steps")
    print(f"{'seeds':>5s} {'sequential tok/s':>17s} {'vmapped tok/s':>14s} {'ratio':>6s}")
    for n in args.seeds:
        seq, vm = measure(args, n)
        print(f"{n:5d} {seq:17,.0f} {vm:14,.0f} {vm / seq:6.2f}", flush=True)


if __name__ == "__main__":
    main()
