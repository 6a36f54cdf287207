"""Tokens/s of the jitted train step: optimizers, the per-layer step and PyTorch, interleaved.

Our step is the application's own (:func:`train.step.build_trainer`: grad,
global-norm clip, optimizer with the cosine schedule, donated state). Default
shape: LLaMA-20M-like (d 256, ffn 688, 4 heads, 4 layers) with a byte vocabulary
(256), sequences of 256 tokens, batch 16, float32, synthetic tokens.

Variants (``--variants``, comma separated):

* ``adamw``, ``galore_adamw``, ... - our standard step with that optimizer;
* ``galore_adamw@per_layer`` - the per-layer step (each block updated inside the
  backward pass, :mod:`train.per_layer`); ``@scan`` and ``@per_layer+scan`` use
  scanned layers;
* ``torch:adamw``, ``torch:galore_adamw`` - the same model in PyTorch
  (:mod:`benchmarks.torch_llama`) under ``torch.compile`` with ``torch.optim.AdamW``
  / galore-torch's ``GaLoreAdamW`` (needs the extra: ``pip install -e '.[torch]'``),
  ``--threads`` intra-op threads.

Each round runs every variant in turn: for ours a fresh state (its first step
is a projector refresh for GaLore, timed on its own) then ``--steps`` ordinary
steps; for torch ``--steps`` steps of one long run (its GaLore projectors are
computed during the warm-up). Reported per variant: the median and min over
rounds of the ordinary step time and tokens/s, and the ratios asked for::

    galore_adamw / torch:galore_adamw   our GaLore step against galore-torch
    adamw / torch:adamw                 our AdamW step against torch.optim.AdamW
    galore_adamw@per_layer / galore_adamw   the per-layer step against the standard one

Ratios are per round (both measured back to back) and summarised by their median.

    python benchmarks/train_step.py                               # ours only
    python benchmarks/train_step.py --variants galore_adamw,torch:galore_adamw,adamw,torch:adamw
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

RATIOS = (("galore_adamw", "torch:galore_adamw"), ("adamw", "torch:adamw"),
          ("galore_adamw@per_layer", "galore_adamw"),
          ("galore_adamw@per_layer+scan", "galore_adamw"))


def _config(variant: str, args: argparse.Namespace):
    opt, _, mode = variant.partition("@")
    modes = set(filter(None, mode.split("+")))
    unknown = modes - {"per_layer", "scan"}
    if unknown:
        raise SystemExit(f"--variants: unknown mode {sorted(unknown)} in {variant!r}; "
                         "use @per_layer, @scan or @per_layer+scan")
    return config_from_dict({
        "model": {"preset": args.preset, "overrides": {"vocab_size": args.vocab},
                  "scan_layers": "scan" in modes},
        "optimizer": {"name": opt, "lr": 1e-2 if opt != "adamw" else 1e-3, "rank": args.rank,
                      "update_proj_gap": args.gap, "scale": 0.25},
        "per_layer_update": "per_layer" in modes,
        "steps": 10_000, "batch_size": args.batch, "seq_len": args.seq_len,
    })


class JaxVariant:
    """Our train step: a fresh state each round, the refresh step timed apart."""

    def __init__(self, variant: str, args: argparse.Namespace, host_batch: dict):
        self.trainer = build_trainer(_config(variant, args))
        self.batch = self.trainer.put_batch(host_batch)
        self.refresh_times: list[float] = []
        state = self.trainer.init(jax.random.PRNGKey(0))  # compile init + step (+ refresh)
        self._run(state, 2)

    def _run(self, state, n: int):
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = self.trainer.step(state, self.batch)
        jax.block_until_ready(metrics)
        return state, (time.perf_counter() - t0) / n

    def round(self, steps: int) -> float:
        state = jax.block_until_ready(self.trainer.init(jax.random.PRNGKey(0)))
        state, t_refresh = self._run(state, 1)  # count 0: a refresh
        self.refresh_times.append(t_refresh)
        _, t_step = self._run(state, steps)
        return t_step


class TorchVariant:
    """The same model in PyTorch under ``torch.compile``; one run across rounds."""

    def __init__(self, name: str, args: argparse.Namespace, host_batch: dict):
        try:
            import torch

            from benchmarks import torch_llama
        except ImportError as err:
            raise SystemExit(f"{name} needs the torch extra: pip install -e '.[torch]' ({err})")
        from lowrank_jax.models import get_preset, param_count_formula

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        cfg = get_preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq_len)
        model = torch_llama.TorchLlama(cfg)
        n = sum(p.numel() for p in model.parameters())
        if n != param_count_formula(cfg):
            raise SystemExit(f"torch model has {n} parameters, ours {param_count_formula(cfg)}")
        opt = torch_llama.make_optimizer(model, name.split(":", 1)[1],
                                         1e-2 if "galore" in name else 1e-3, args.rank,
                                         args.gap, 0.25)
        self.step_fn = torch_llama.make_step(model, opt)
        self.tokens = torch.from_numpy(host_batch["tokens"]).long()
        self.refresh_times: list[float] = []
        for _ in range(3):  # compile forward/backward, GaLore's first projectors
            self.step_fn(self.tokens)

    def round(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step_fn(self.tokens)
        float(loss)
        return (time.perf_counter() - t0) / steps


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
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--variants", default="adamw,galore_adamw,galore_adamw@per_layer")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq_len + 1), dtype=np.int32)
    host_batch = {"tokens": tokens, "mask": np.ones((args.batch, args.seq_len), np.float32)}
    runners = {v: (TorchVariant if v.startswith("torch:") else JaxVariant)(v, args, host_batch)
               for v in variants}

    step_t: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            step_t[v].append(runners[v].round(args.steps))

    tokens_per_step = args.batch * args.seq_len
    out = {"device": str(jax.devices()[0]), "shape": vars(args), "results": {}, "ratios": {}}
    for v in variants:
        s, fastest = statistics.median(step_t[v]), min(step_t[v])
        row = {"step_ms": 1e3 * s, "min_step_ms": 1e3 * fastest,
               "tokens_per_s": tokens_per_step / s}
        refresh = runners[v].refresh_times
        if refresh:
            r = statistics.median(refresh)
            row["refresh_step_ms"] = 1e3 * r
            row["tokens_per_s_amortised"] = tokens_per_step * args.gap / (r + (args.gap - 1) * s)
        out["results"][v] = row
        print(f"{v:30s} step {1e3 * s:8.2f} ms (min {1e3 * fastest:8.2f})  "
              f"{tokens_per_step / s:10,.0f} tok/s"
              + (f"  refresh step {row['refresh_step_ms']:8.2f} ms" if refresh else ""))
    for a, b in RATIOS:
        if a in step_t and b in step_t:
            per_round = [tb / ta for ta, tb in zip(step_t[a], step_t[b])]
            ratio = statistics.median(per_round)
            out["ratios"][f"{a} / {b}"] = {"median": ratio, "min": min(per_round),
                                          "max": max(per_round)}
            print(f"tokens/s {a} / {b}: {ratio:.3f} (median of {len(per_round)} rounds; "
                  f"min {min(per_round):.3f}, max {max(per_round):.3f})")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
