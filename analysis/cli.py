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
could be read.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lowrank-analyze``."""
    p = argparse.ArgumentParser(
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
    p.add_argument("--no-cache", action="store_true", help="recompute everything")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; returns the exit status."""
    args = build_parser().parse_args(argv)
    from analysis import plots
    from analysis.compute import Settings, analyse
    from analysis.findings import findings
    from analysis.report import write_report
    from analysis.stats import AGG_FIELDS, aggregate
    from analysis.table import write_csv, write_json
    from train.console import cli_logging

    try:
        settings = Settings(directions=args.directions, alpha_max=args.alpha_max,
                            alpha_points=args.alpha_points, direction_kind=args.direction_kind,
                            one_d=args.one_d, sequences=args.sequences,
                            interp_points=args.interp_points, threshold=args.threshold,
                            seed=args.seed,
                            steps=tuple(args.steps) if args.steps else None)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with cli_logging():
        res = analyse(args.runs, args.baseline, settings,
                      cache_dir=None if args.no_cache else out / "cache",
                      progress=not args.no_progress)
    seconds = time.perf_counter() - start
    agg = aggregate(res.rows, res.runs)
    found = findings(res, agg)
    images = plots.all_plots(res, out)
    settings_dict = {k: v for k, v in asdict(settings).items()}
    write_csv(res.rows, out / "metrics.csv")
    write_csv(agg, out / "metrics_by_method.csv", AGG_FIELDS)
    write_json({"baseline": res.baseline, "runs": res.runs, "settings": settings_dict,
                "problems": res.problems, "findings": found, "rows": res.rows,
                "by_method": agg, "curves": res.curves}, out / "metrics.json")
    report = write_report(res, found, images, settings_dict, out / "report.html", seconds,
                          agg)
    print(f"analysed {len(res.runs)} run(s): {res.computed_units} unit(s) computed, "
          f"{res.cached_units} from the cache, {len(res.problems)} problem(s), "
          f"{seconds:.1f} s")
    for f in found:
        print(f"  [{f['status']}] {f['claim']}")
    print(f"report: {report.resolve()}")
    return 0 if res.runs else 2


if __name__ == "__main__":
    sys.exit(main())
