"""Compiled peaks of the train step next to the analytic figures, as a markdown table.

For every preset x optimizer x mode (standard step / per-layer update) this runs
``lowrank-memory --compiled --json`` in a fresh process (so one compile cannot
inflate the next) and prints one row: the analytic bytes (parameters +
gradients + optimizer state), XLA's arguments, temporaries and peak, and the
compile time::

    python benchmarks/memory_table.py                      # the README table (bf16, batch 1 x 256)
    python benchmarks/memory_table.py --models llama_60m --optimizers adamw --modes standard
    python benchmarks/memory_table.py --models llama_7b --optimizers galore_adamw \\
        --modes standard standard+scan             # compile time, scanned vs unrolled

Modes: ``standard``, ``per_layer``, and either with ``+scan`` (scanned layers).
Ranks follow the GaLore paper (128 for 60M, 256 for 130M/350M, 512 for 1B,
1024 for 7B).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512,
         "llama_7b": 1024}
GIB = 2**30


def measure(model: str, optimizer: str, mode: str, args: argparse.Namespace) -> dict:
    """One ``lowrank-memory --compiled --json`` row."""
    flags = {"per_layer": ["--per-layer-update"], "scan": ["--scan-layers"], "standard": []}
    argv = [sys.executable, "-m", "train.memory_cli", "--compiled", "--json", "--model", model,
            "--optimizer", optimizer, "--rank", str(RANKS.get(model, 128)),
            "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq)]
    for part in mode.split("+"):
        if part not in flags:
            raise SystemExit(f"unknown mode {mode!r}; use standard, per_layer, +scan")
        argv += flags[part]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv[2:])} failed:\n{out.stderr[-2000:]}")
    (row,) = json.loads(out.stdout)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(RANKS))
    p.add_argument("--optimizers", nargs="+",
                   default=["adamw", "galore_adamw", "galore_adamw8bit", "apollo_mini"])
    p.add_argument("--modes", nargs="+", default=["standard", "per_layer"])
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--jsonl", default=None, help="also append every row to this file")
    args = p.parse_args(argv)
    print(f"| model | optimizer | mode | analytic GiB | arguments GiB | temporaries GiB "
          f"| compiled peak GiB | compile s |  (dtype {args.dtype}, batch {args.batch} x "
          f"{args.seq})")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for model in args.models:
        for optimizer in args.optimizers:
            for mode in args.modes:
                row = measure(model, optimizer, mode, args)
                c = row["compiled"]
                print(f"| {model} | {optimizer} | {mode} | {row['total_bytes'] / GIB:.2f} "
                      f"| {c['arguments'] / GIB:.2f} | {c['temporaries'] / GIB:.2f} "
                      f"| {c['peak'] / GIB:.2f} | {c['compile_seconds']:.0f} |", flush=True)
                if args.jsonl:
                    with open(args.jsonl, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"model": model, "mode": mode, **row}) + "\n")


if __name__ == "__main__":
    main()
