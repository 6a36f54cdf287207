"""Throughput of the vmapped 1-D landscape vs plain forward passes.

On one batch of the chosen model, time

* landscape: ``landscape_1d`` over ``--dirs`` directions x ``--alphas`` alphas
  (one compiled program; directions in chunks of ``--chunk``);
* forward: the jitted loss on the same batch called once per evaluation, the
  same number of evaluations, on the centre parameters (pure forward cost; the
  landscape additionally forms ``theta + alpha * d`` for every evaluation).

Both are warmed up (compiled) first and then timed interleaved for ``--rounds``
rounds; the median is reported as loss evaluations per second and the ratio
landscape / forward (target >= 0.8).

On 2 loaded CPU cores (llama_tiny, batch (4, 65)) the ratio was 1.33 for
``--chunk 1 --alpha-chunk 1`` (pure lax.map), 0.87 for ``--chunk 1 --alpha-chunk 5``
(the default), 0.52 for ``--chunk 1`` with all 25 alphas vmapped and 0.20-0.22
for ``--chunk 4``/``16``: on CPU, vmapping over per-example weights turns the
matmuls into batched ones that run slower than the plain loop.

Run: ``.venv/bin/python benchmarks/landscape.py [--model llama_tiny] [--chunk 1] [--alpha-chunk 5]``
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax import metrics as M
from lowrank_jax.models import Llama, get_preset, loss_from_state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama_tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dirs", type=int, default=16)
    ap.add_argument("--alphas", type=int, default=25)
    ap.add_argument("--chunk", type=int, default=1)
    ap.add_argument("--alpha-chunk", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    cfg = get_preset(args.model, max_seq_len=max(args.seq, 16))
    graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0,
                                cfg.vocab_size, dtype=jnp.int32)
    batch = {"tokens": tokens, "mask": jnp.ones((args.batch, args.seq), jnp.float32)}
    loss_fn = functools.partial(loss_from_state, graphdef)
    dirs = M.random_directions(jax.random.key(2), params, args.dirs)
    alphas = np.linspace(-0.003, 0.003, args.alphas)
    n_evals = args.dirs * args.alphas

    forward = jax.jit(lambda p, b: loss_fn(p, b)[0])

    def run_landscape() -> float:
        t0 = time.perf_counter()
        M.landscape_1d(loss_fn, params, dirs, alphas, batch, args.chunk,
                       args.alpha_chunk).block_until_ready()
        return time.perf_counter() - t0

    def run_forward() -> float:
        t0 = time.perf_counter()
        out = [forward(params, batch) for _ in range(n_evals)]
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    run_landscape()
    run_forward()                                     # compile both
    t_land, t_fwd = [], []
    for _ in range(args.rounds):
        t_land.append(run_landscape())
        t_fwd.append(run_forward())
    land = n_evals / statistics.median(t_land)
    fwd = n_evals / statistics.median(t_fwd)
    print(f"model={args.model} batch=({args.batch}, {args.seq + 1}) evals={n_evals} "
          f"({args.dirs} dirs x {args.alphas} alphas, chunk {args.chunk}, "
          f"alpha chunk {args.alpha_chunk}) "
          f"backend={jax.default_backend()} devices={jax.device_count()}")
    print(f"landscape_1d : {land:10.1f} loss evals/s  (median {statistics.median(t_land):.3f} s)")
    print(f"plain forward: {fwd:10.1f} loss evals/s  (median {statistics.median(t_fwd):.3f} s)")
    print(f"ratio landscape/forward = {land / fwd:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
