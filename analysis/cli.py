"""``lowrank-analyze RUN_DIR... --baseline RUN_DIR --out DIR``: the geometry study of runs.

Computes every metric for every checkpoint (cached under ``OUT/cache``), then
writes ``metrics.csv``, ``metrics.json``, ``metrics_by_method.csv`` (statistics
over the seeds of each group, see ``analysis.stats``), PNG figures and
``report.html`` into ``OUT``. A RUN_DIR (or ``--baseline``) holding
``seed_<s>/`` run directories is a seed group (``rundir.groups``). Problems
with the input (a missing directory, a run without checkpoints, mismatched
architectures, a step missing in the baseline) are printed as one-line
warnings and listed in the report; the rest is analysed.

Exit status: 0 when something was analysed (even with problems), 2 when no run
could be read, when ``--steps`` names no checkpoint of any run, or for bad input:
a bad number (NaN, infinite, out of range), no RUN_DIR that exists, a
``--baseline`` that does not exist, an ``--out`` that is a file or cannot be
written, any ``OSError`` while writing the results - each one ``error:`` line,
checked before the analysis imports JAX where it can be.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.user_errors import OneLineArgumentParser

if TYPE_CHECKING:
    from analysis.settings import Settings

__all__ = ["build_parser", "main", "settings_from_args"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lowrank-analyze``."""
    p = OneLineArgumentParser(
        prog="lowrank-analyze",
        description="Landscape, barriers, spectra, activations and subspace overlap of "
                    "lowrank-train runs, with an HTML report.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories to analyse; a directory of seed_<s>/ runs is a "
                        "seed group (statistics over seeds)")
    p.add_argument("--baseline", metavar="RUN_DIR",
                   help="full-rank reference run or seed group (activations, IMBH, findings)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--directions", type=int, default=8,
                   help="random directions per landscape (paper: 100; default 8)")
    p.add_argument("--alpha-max", type=float, default=0.003, help="landscape half-width")
    p.add_argument("--alpha-points", type=int, default=13,
                   help="odd number of landscape points (paper: 25; default 13)")
    p.add_argument("--direction-kind", choices=("gaussian", "filter"), default="gaussian",
                   help="unnormalised Gaussian (the paper's) or Li et al. filter-normalised")
    p.add_argument("--one-d", choices=("zero", "keep", "copy"), default="zero",
                   help="1-D leaves of filter-normalised directions")
    p.add_argument("--sequences", type=int, default=8,
                   help="validation sequences in the evaluation batch (>= 4)")
    p.add_argument("--interp-points", type=int, default=11,
                   help="points on each interpolation path (paper: 21)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="analyse only these checkpoint steps")
    p.add_argument("--threshold", type=float, default=0.1,
                   help="singular values counted above this")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--perturb", choices=("all", "trainable"), default="all",
                   help="variables the random and top-k directions move: every float variable "
                        "(default, the reference's: ReLoRA's frozen base too) or the trainable "
                        "parameters only")
    p.add_argument("--topk", type=int, default=20,
                   help="top-k PCA landscapes for k = 1..K (default 20, the paper's; 0: none)")
    p.add_argument("--pca-grid", choices=("centered", "reference"), default="centered",
                   help="top-k grid: symmetric around the checkpoint (default) or the "
                        "reference's 26 points without alpha = 0")
    p.add_argument("--topk-steps", choices=("all", "final"), default="all",
                   help="top-k landscapes at every analysed checkpoint (default) or the last")
    p.add_argument("--spectra-of", choices=("dense", "stored"), default="dense",
                   help="spectra of dense-equivalent weights (default) or of the stored "
                        "matrices (LoRA/SLTrain factors, ReLoRA's frozen base; the reference's)")
    p.add_argument("--downstream-metric", choices=("headline", "acc"), default="headline",
                   help="accuracy read from lowrank-eval results: each task's headline metric "
                        "(default) or acc (the paper's)")
    p.add_argument("--predictor", choices=("linear", "ridge"), default="linear",
                   help="the accuracy predictor's regression (default: linear)")
    p.add_argument("--ridge-alpha", type=float, default=1.0, help="ridge penalty (--predictor ridge)")
    p.add_argument("--no-cache", action="store_true", help="recompute everything")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _option_message(err: ValueError) -> str:
    """A :class:`~analysis.settings.Settings` error with the field named as its option."""
    text = str(err)
    field = text.split(" ", 1)[0]
    if field.isidentifier() and field == field.lower():
        return "--" + field.replace("_", "-") + text[len(field):]
    return text


def _check_args(args: argparse.Namespace) -> None:
    """Bad arguments as one ``UserInputError`` line (before any heavy import)."""
    import math

    from train.user_errors import UserInputError

    for option, value, low in (("--alpha-max", args.alpha_max, None),
                               ("--threshold", args.threshold, 0.0)):
        if not math.isfinite(value):
            raise UserInputError(f"{option} must be a finite number, got {value}")
        if low is None and value <= 0:
            raise UserInputError(f"{option} must be > 0, got {value}")
        if low is not None and value < low:
            raise UserInputError(f"{option} must be >= {low}, got {value}")
    bad_steps = [s for s in args.steps or () if s < 0]
    if bad_steps:
        raise UserInputError(f"--steps must be checkpoint steps (>= 0), got {bad_steps[0]}")
    if not any(Path(r).is_dir() for r in args.runs):
        missing = args.runs[0]
        what = "is not a directory" if Path(missing).exists() else "does not exist"
        which = f"RUN_DIR {missing!r} {what}" if len(args.runs) == 1 else \
            f"none of the {len(args.runs)} RUN_DIRs is a directory ({missing!r} {what})"
        raise UserInputError(f"{which}; pass run directories written by lowrank-train")
    if args.baseline is not None and not Path(args.baseline).is_dir():
        raise UserInputError(f"--baseline {args.baseline!r} is not a directory; pass a run "
                             "directory written by lowrank-train, or leave --baseline out")


def _nothing_at_steps(res, steps: tuple[int, ...] | None) -> str | None:
    """The error when ``--steps`` matches no checkpoint of any run (else ``None``)."""
    if not steps or any(r["steps"] for r in res.runs):
        return None
    return (f"--steps {' '.join(map(str, steps))}: no run has a checkpoint at these steps "
            "(the warnings above list the steps each run has); pick some of those, or leave "
            "--steps out")


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`analysis.settings.Settings` of parsed arguments (``ValueError`` if invalid)."""
    from analysis.settings import Settings

    return Settings(directions=args.directions, alpha_max=args.alpha_max,
                    alpha_points=args.alpha_points, direction_kind=args.direction_kind,
                    one_d=args.one_d, sequences=args.sequences,
                    interp_points=args.interp_points, threshold=args.threshold,
                    seed=args.seed, steps=tuple(args.steps) if args.steps else None,
                    perturb=args.perturb, topk=args.topk, pca_grid=args.pca_grid,
                    topk_steps=args.topk_steps, spectra_of=args.spectra_of,
                    downstream_metric=args.downstream_metric)


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; returns the exit status."""
    args = build_parser().parse_args(argv)
    from train.user_errors import UserInputError, describe_os_error, print_error, writable_dir

    try:
        _check_args(args)
        settings = settings_from_args(args)
        out = writable_dir(args.out, "--out")
    except UserInputError as err:
        return print_error(err)
    except ValueError as err:
        return print_error(_option_message(err))
    try:
        return _analyse(args, settings, out)
    except OSError as err:
        return print_error(f"cannot write the results: {describe_os_error(err)}")


def _analyse(args: argparse.Namespace, settings: Settings, out: Path) -> int:
    """The analysis of ``main`` once the arguments are checked."""
    from analysis import accuracy, plots
    from analysis.compute import analyse
    from analysis.findings import findings
    from analysis.report import write_report
    from analysis.stats import AGG_FIELDS, aggregate
    from analysis.table import write_csv, write_json
    from train.console import cli_logging

    start = time.perf_counter()
    with cli_logging():
        res = analyse(args.runs, args.baseline, settings,
                      cache_dir=None if args.no_cache else out / "cache",
                      progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if not res.runs:
        print(f"error: no RUN_DIR could be read ({len(res.problems)} problem(s) above); pass "
              "run directories written by lowrank-train", file=sys.stderr)
        return 2
    nothing = _nothing_at_steps(res, settings.steps)
    if nothing:
        print(f"error: {nothing}", file=sys.stderr)
        return 2
    agg = aggregate(res.rows, res.runs)
    section = accuracy.fit(res.rows, res.runs, out, args.predictor, args.ridge_alpha)
    found = findings(res, agg, section.results)
    images = plots.all_plots(res, out)
    settings_dict = {k: v for k, v in asdict(settings).items()}
    write_csv(res.rows, out / "metrics.csv")
    write_csv(agg, out / "metrics_by_method.csv", AGG_FIELDS)
    write_json({"baseline": res.baseline, "runs": res.runs, "settings": settings_dict,
                "problems": res.problems, "findings": found, "rows": res.rows,
                "by_method": agg, "curves": res.curves,
                "predictor": accuracy.as_json(section)}, out / "metrics.json")
    report = write_report(res, found, images, settings_dict, out / "report.html", seconds,
                          agg, section)
    print(f"analysed {len(res.runs)} run(s): {res.computed_units} unit(s) computed, "
          f"{res.cached_units} from the cache, {len(res.problems)} problem(s), "
          f"{seconds:.1f} s")
    for f in found:
        print(f"  [{f['status']}] {f['claim']}")
    print(f"report: {report.resolve()}")
    return 0 if res.runs else 2


if __name__ == "__main__":
    sys.exit(main())
