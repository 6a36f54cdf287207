"""``make demo``: pre-train a small LLaMA with AdamW, GaLore, Fira and SARA on the CPU.

Prepares the built-in corpus (Python 3.11 documentation, PSF licence, from
Debian's ``python3.11-doc`` package), trains ``configs/demo_<method>.yaml`` for
each method with ``lowrank-train``, and prints a table: validation perplexity,
optimizer-state bytes and tokens/s, next to the corpus's unigram byte entropy
(the loss of the best model that ignores context).

    python -m train.demo [--methods adamw galore fira sara] [--steps N] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train.data import (
    CorpusUnavailableError,
    DataConfig,
    default_corpus_dir,
    load_tokens,
    prepare_default_corpus,
    unigram_entropy,
)

METHODS = ("adamw", "galore", "fira", "sara")
REPO = Path(__file__).resolve().parent.parent


def read_metrics(run_dir: Path) -> dict:
    """Last validation loss/perplexity, median tokens/s and optimizer-state bytes of a run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    evals = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r and "val_loss" not in r]
    speeds = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")]
    return {
        "val_loss": evals[-1]["val_loss"] if evals else math.nan,
        "val_ppl": evals[-1]["val_ppl"] if evals else math.nan,
        "first_loss": train[0]["loss"] if train else math.nan,
        "state_bytes": next((r["opt_state_bytes"] for r in reversed(train)
                             if "opt_state_bytes" in r), 0),
        "tokens_per_s": statistics.median(speeds) if speeds else math.nan,
        "steps": train[-1]["step"] if train else 0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=None, help="override steps of every run")
    parser.add_argument("--out", default="runs/demo", help="where the runs are written")
    args = parser.parse_args(argv)

    data_cfg = DataConfig()
    print("Preparing the built-in corpus (Python 3.11 docs, PSF licence)...", flush=True)
    try:
        prepare_default_corpus(default_corpus_dir(data_cfg))
    except CorpusUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    entropy = unigram_entropy(load_tokens(data_cfg, "train").tokens, 256)

    out = Path(args.out)
    results = {}
    for method in args.methods:
        run_dir = out / method
        cmd = [sys.executable, "-m", "train.cli", "--config",
               str(REPO / "configs" / f"demo_{method}.yaml"), f"run_dir={run_dir}"]
        if args.steps:
            cmd.append(f"steps={args.steps}")
        print(f"\n== {method}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        if subprocess.run(cmd, check=False).returncode != 0:
            print(f"error: the {method} run failed (see above)", file=sys.stderr)
            return 1
        results[method] = {**read_metrics(run_dir), "minutes": (time.time() - start) / 60}

    print(f"\nCorpus unigram entropy: {entropy['nats']:.3f} nats/byte "
          f"(perplexity {math.exp(entropy['nats']):.2f}); a model that uses context must go below.")
    print(f"{'method':8s} {'steps':>6s} {'val loss':>9s} {'val ppl':>8s} {'opt state MB':>13s} "
          f"{'x adamw':>8s} {'tokens/s':>9s} {'minutes':>8s}")
    base = results.get("adamw", {}).get("state_bytes") or None
    for method, r in results.items():
        ratio = f"{r['state_bytes'] / base:8.2f}" if base else f"{'-':>8s}"
        print(f"{method:8s} {r['steps']:6d} {r['val_loss']:9.3f} {r['val_ppl']:8.2f} "
              f"{r['state_bytes'] / 2**20:13.2f} {ratio} {r['tokens_per_s']:9.0f} "
              f"{r['minutes']:8.1f}")
    below = all(r["val_loss"] < entropy["nats"] for r in results.values())
    print(f"\nEvery method below the unigram entropy: {'yes' if below else 'NO'}")
    print(f"Runs (metrics.jsonl, TensorBoard events, checkpoints): {out.resolve()}")
    return 0 if below else 1


if __name__ == "__main__":
    sys.exit(main())
