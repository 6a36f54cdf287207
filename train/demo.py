"""``make demo``: pre-train a small LLaMA with AdamW, GaLore, Fira and SARA on the CPU.

Prepares the built-in corpus (Python 3.11 documentation, PSF licence, from
Debian's ``python3.11-doc`` package), trains ``configs/demo_<method>.yaml`` for
each method with ``lowrank-train``, and prints a table: validation perplexity,
optimizer-state bytes and tokens/s, next to the corpus's unigram byte entropy
(the loss of the best model that ignores context). It ends by running
``lowrank-analyze`` on the runs (baseline: the AdamW run) and prints where the
HTML report is (``<out>/analysis/report.html``); the analysis of the four runs
(4 checkpoints each) takes about 1 minute on two CPU cores (up to 3 when the
machine is busy) and about 5 s when repeated (cached).

Methods: the four optimizer methods by default; ``--methods`` also takes
``coap``, ``qgalore``, ``grass`` and ``gum`` (COAP, Q-GaLore, Grass, GUM), the
architecture methods ``cola``, ``sltrain``, ``relora`` and ``lost`` (CoLA, SLTrain,
ReLoRA and LOST layers trained with AdamW), each ``configs/demo_<method>.yaml``, and
``--optimizer NAME...`` adds a run of ``configs/demo_galore.yaml`` with
``optimizer.name=NAME`` for any alias of ``lowrank_jax.OPTIMIZERS`` (run
directory ``<out>/opt_<NAME>``; Adam-mini aliases get ``optimizer.kwargs.num_heads=4``).

Seeds: ``--seeds N`` trains every method with ``lowrank-train ... seeds=N``
(one vmapped program, ``<out>/<method>/seed_<s>/``); the table then shows the
mean +- standard deviation over seeds and the analysis treats each method as a
seed group (mean +- std, Welch's t-test against the AdamW group). Time budget:
one method of 1000 steps takes about 2.5 minutes on two CPU cores with one seed,
so the default four methods take about 10 minutes plus about 1 minute of
analysis. Three seeds multiply the training time by about 3 on a CPU (the
vmapped step does three seeds' arithmetic on the same two cores, and the
analysis of 12 runs takes about 3 minutes), which exceeds a 15-minute demo
budget, so the default stays at 1 seed; ``--seeds 3`` is the multi-seed demo
(about 35 minutes on two CPU cores). Measured on two shared CPU cores with
``python -m train.demo --methods adamw --steps 100 --seeds 1`` / ``--seeds 3``:
one seed 8,980 tokens/s (0.6 min with compilation), three vmapped seeds
6,900-8,100 tokens/s for all three together (1.4 min of training), i.e. three
seeds cost about 3x one seed on a CPU.

    python -m train.demo [--methods adamw galore fira sara coap qgalore grass gum
                                    cola sltrain relora lost]
                         [--optimizer NAME ...] [--seeds N] [--steps N]
                         [--out runs/demo] [--no-analysis]
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import rundir
from train.data import (
    CorpusUnavailableError,
    DataConfig,
    default_corpus_dir,
    load_tokens,
    prepare_default_corpus,
    unigram_entropy,
)

METHODS = ("adamw", "galore", "fira", "sara")
#: questions per built-in downstream task in the demo (lowrank-eval's default is 1000)
EVAL_EXAMPLES = 200
#: lowrank-analyze settings of the demo: top-k landscapes for k = 1..5 at the last checkpoint
ANALYSIS_ARGS = ("--topk", "5", "--topk-steps", "final")
MORE_METHODS = ("coap", "qgalore", "grass", "gum")
ARCH_METHODS = ("cola", "sltrain", "relora", "lost")
REPO = Path(__file__).resolve().parent.parent


def read_metrics(run_dir: Path) -> dict:
    """Last validation loss/perplexity, median tokens/s and optimizer-state bytes of a run."""
    rows = rundir.read_metrics(run_dir)
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else math.nan)


def read_group(run_dir: Path, seeds: int) -> dict:
    """:func:`read_metrics` of a run, or over the ``seed_<s>/`` runs of a seed group.

    Returns the single run's values plus ``seeds`` (its count) and, for a group,
    ``val_loss_std`` / ``val_ppl_std`` (``ddof=1``) next to the means; tokens/s is
    the mean of the seeds' medians (for a vmapped group, tokens of all seeds per second).
    """
    if seeds == 1 or not rundir.is_group(run_dir):
        return {**read_metrics(run_dir), "seeds": 1, "val_loss_std": math.nan,
                "val_ppl_std": math.nan}
    per_seed = [read_metrics(m.path) for m in rundir.expand(run_dir)]
    out = {"seeds": len(per_seed), "state_bytes": per_seed[0]["state_bytes"],
           "steps": min(r["steps"] for r in per_seed),
           "all_val_loss": [r["val_loss"] for r in per_seed]}
    for key in ("val_loss", "val_ppl", "first_loss", "tokens_per_s"):
        out[key], out[f"{key}_std"] = _mean_std([r[key] for r in per_seed])
    return out


def jobs(methods: list[str], optimizers: list[str]) -> list[tuple[str, Path, list[str]]]:
    """``(label, config, extra overrides)`` of every run the demo trains."""
    out = [(m, REPO / "configs" / f"demo_{m}.yaml", []) for m in methods]
    for name in optimizers:
        extra = [f"optimizer.name={name}"]
        if "adam_mini" in name:
            extra.append("optimizer.kwargs.num_heads=4")
        out.append((f"opt_{name}", REPO / "configs" / "demo_galore.yaml", extra))
    return out


def _pm(mean: float, std: float, width: int, digits: int) -> str:
    text = f"{mean:.{digits}f}" if not math.isfinite(std) else \
        f"{mean:.{digits}f}±{std:.{digits}f}"
    return f"{text:>{width}s}"


def _parser() -> argparse.ArgumentParser:
    from lowrank_jax import OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        choices=METHODS + MORE_METHODS + ARCH_METHODS,
                        help="demo configs to train (default: the four optimizer methods)")
    parser.add_argument("--optimizer", nargs="+", default=[], metavar="NAME",
                        choices=sorted(OPTIMIZERS),
                        help="also train configs/demo_galore.yaml with optimizer.name=NAME")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per method (lowrank-train seeds=N; default 1)")
    parser.add_argument("--steps", type=int, default=None, help="override steps of every run")
    parser.add_argument("--out", default="runs/demo", help="where the runs are written")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip lowrank-eval and lowrank-analyze at the end")
    parser.add_argument("--eval-examples", type=int, default=EVAL_EXAMPLES,
                        help=f"questions per downstream task (default {EVAL_EXAMPLES})")
    return parser


def _train_one(method: str, config: Path, extra: list[str], run_dir: Path,
               args: argparse.Namespace) -> dict | int:
    """Train one demo run with ``lowrank-train``; its :func:`read_group` row, or an exit code."""
    if args.seeds > 1 and (run_dir / "checkpoints").is_dir():
        print(f"error: {run_dir} holds a single-seed run; --seeds {args.seeds} writes "
              f"{run_dir}/seed_<s>/ — pass another --out or remove {run_dir}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "train.cli", "--config", str(config), f"run_dir={run_dir}",
           *extra]
    if args.steps:
        cmd.append(f"steps={args.steps}")
    if args.seeds > 1:
        cmd.append(f"seeds={args.seeds}")
    print(f"\n== {method}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    if subprocess.run(cmd, check=False).returncode != 0:
        print(f"error: the {method} run failed (see above)", file=sys.stderr)
        return 1
    return {**read_group(run_dir, args.seeds), "minutes": (time.time() - start) / 60}


def _print_table(results: dict[str, dict], entropy: dict[str, float], seeds: int) -> bool:
    """The demo's table; returns whether every method went below the unigram entropy."""
    print(f"\nCorpus unigram entropy: {entropy['nats']:.3f} nats/byte "
          f"(perplexity {math.exp(entropy['nats']):.2f}); a model that uses context must go below.")
    seeded = seeds > 1
    wl, wp = (15, 13) if seeded else (9, 8)
    if seeded:
        print(f"Mean ± standard deviation over {seeds} seeds (seed_<s>/ under each "
              "method); tokens/s: all seeds of the vmapped step together.")
    width = max([8, *(len(m) for m in results)])
    print(f"{'method':{width}s} {'steps':>6s} {'val loss':>{wl}s} {'val ppl':>{wp}s} "
          f"{'opt state MB':>13s} {'x adamw':>8s} {'tokens/s':>9s} {'minutes':>8s}")
    base = results.get("adamw", {}).get("state_bytes") or None
    for method, r in results.items():
        ratio = f"{r['state_bytes'] / base:8.2f}" if base else f"{'-':>8s}"
        print(f"{method:{width}s} {r['steps']:6d} {_pm(r['val_loss'], r['val_loss_std'], wl, 3)} "
              f"{_pm(r['val_ppl'], r['val_ppl_std'], wp, 2)} "
              f"{r['state_bytes'] / 2**20:13.2f} {ratio} {r['tokens_per_s']:9.0f} "
              f"{r['minutes']:8.1f}")
    print("val loss: each run's own evaluation (eval.batches validation batches, "
          "metrics.jsonl); the analysis report's loss column is measured on its smaller "
          "analysis batch (--sequences), so it differs.")
    below = all(max(r.get("all_val_loss", [r["val_loss"]])) < entropy["nats"]
                for r in results.values())
    print(f"\nEvery method below the unigram entropy: {'yes' if below else 'NO'}")
    return below


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")

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
    for method, config, extra in jobs(args.methods, args.optimizer):
        got = _train_one(method, config, extra, out / method, args)
        if isinstance(got, int):
            return got
        results[method] = got
    below = _print_table(results, entropy, args.seeds)
    print(f"Runs (metrics.jsonl, TensorBoard events, checkpoints): {out.resolve()}")
    analysed = True
    if not args.no_analysis:
        evaluated = run_downstream(out, list(results), args.eval_examples) == 0
        analysed = run_analysis(out, list(results)) == 0 and evaluated
    return 0 if below and analysed else 1


def run_downstream(out: Path, methods: list[str], examples: int) -> int:
    """``lowrank-eval`` on the demo's runs (the built-in offline suite, final checkpoints).

    ``examples`` questions per task (the standard errors shrink as ``1/sqrt(examples)``);
    the results land in each run's ``downstream/`` and the analysis reads them. It runs
    as its own process, as the training runs do.
    """
    runs = [str(out / m) for m in methods]
    args = [*runs, "--max-examples", str(examples), "--no-progress"]
    print(f"\n== downstream: lowrank-eval {' '.join(args)}", flush=True)
    start = time.time()
    code = subprocess.run([sys.executable, "-m", "analysis.downstream.cli", *args],
                          check=False).returncode
    print(f"Downstream evaluation took {(time.time() - start) / 60:.1f} min")
    return code


def run_analysis(out: Path, methods: list[str]) -> int:
    """``lowrank-analyze`` on the demo's runs (baseline: adamw when trained); prints the report path.

    A method trained with several seeds is a ``seed_<s>/`` group, which
    ``lowrank-analyze`` aggregates (mean ± std, significance against the AdamW group).
    It runs as its own process, as the training runs do.
    """
    runs = [str(out / m) for m in methods if m != "adamw"]
    args = [*runs, "--out", str(out / "analysis"), *ANALYSIS_ARGS]
    if "adamw" in methods:
        args += ["--baseline", str(out / "adamw")]
    if not runs:
        args.insert(0, str(out / "adamw"))
    print(f"\n== analysis: lowrank-analyze {' '.join(args)}", flush=True)
    start = time.time()
    code = subprocess.run([sys.executable, "-m", "analysis.cli", *args], check=False).returncode
    print(f"Analysis took {(time.time() - start) / 60:.1f} min; open the report: "
          f"{(out / 'analysis' / 'report.html').resolve()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
