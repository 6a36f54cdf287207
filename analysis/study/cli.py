"""``lowrank-study --config configs/study/<name>.yaml``: the whole study in one command.

Trains every method x scale (x seed) of the config with ``lowrank-train`` (finished runs
are skipped, interrupted ones resume), evaluates each run's final checkpoint with
``lowrank-eval``, analyses every scale against its full-rank run with
``lowrank-analyze``'s units, fits the downstream-accuracy predictors and writes one
report: ``<out>/analysis/report.html``. Starting it again continues where it stopped
(training resumes, evaluations and analysis units are not repeated).

Bad input (a missing config, an unknown method, a bad scale, an invalid override or
analysis option) is one ``error:`` line and exit status 2, before anything runs. A run
that fails to train or evaluate is one problem line in the report; the rest goes on
(exit status 1 when something failed, 0 otherwise).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-study", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True, metavar="YAML",
                   help="study config (configs/study/cpu.yaml, ...)")
    p.add_argument("--out", metavar="DIR", help="overrides the config's out")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs and the commands, do nothing")
    p.add_argument("--no-progress", action="store_true", help="no analysis progress bar")
    return p


def _analysis_argv(options: dict[str, Any]) -> list[str]:
    """``lowrank-analyze`` arguments of the config's ``analysis`` mapping."""
    argv = []
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def analysis_settings(options: dict[str, Any]) -> tuple[Any, argparse.Namespace]:
    """``(Settings, parsed lowrank-analyze arguments)`` of the config's ``analysis`` options.

    Raises:
      ValueError: an invalid value (one line).
    """
    from analysis.cli import build_parser, settings_from_args

    parser = build_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(["RUN", "--out", "OUT", *_analysis_argv(options)])
    except (argparse.ArgumentError, SystemExit) as err:
        raise ValueError(f"analysis: {err}") from None
    return settings_from_args(args), args


def _say(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lowrank-study``; returns the exit status."""
    args = _parser().parse_args(argv)
    from analysis.study.config import StudyConfigError, load_study

    try:
        study = load_study(args.config, args.out)
        settings, analysis_args = analysis_settings(study.analysis)
    except (StudyConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in study.runs:
            files = " ".join(f"-c {f}" for f in spec.configs)
            print(f"{spec.scale}/{spec.method}: lowrank-train {files} {' '.join(spec.overrides)}")
        return 0
    return run_study(study, settings, analysis_args, progress=not args.no_progress)


def run_study(study: Any, settings: Any, analysis_args: argparse.Namespace,
              progress: bool = True) -> int:
    """Train, evaluate, analyse and report; the exit status (1 when something failed)."""
    from analysis.compute import analyse
    from analysis.study.report import write_study_report
    from analysis.study.runner import (
        downstream_tasks,
        evaluate_lm_eval,
        evaluate_scale,
        train_run,
    )
    from train.console import cli_logging

    problems: list[str] = []
    timings: dict[str, float] = {}
    study.out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    trained = []
    for spec in study.runs:
        problem = train_run(spec, study.seeds, _say)
        if problem:
            problems.append(problem)
            print(f"warning: {problem}", file=sys.stderr)
        else:
            trained.append(spec)
    timings["training"] = time.time() - start

    start = time.time()
    tasks, names, task_problems = downstream_tasks(study)
    if not tasks and not study.downstream.get("lm_eval_tasks"):
        task_problems.append("no downstream task is left to evaluate")
    for problem in task_problems:
        problems.append(problem)
        print(f"warning: {problem}", file=sys.stderr)
    for scale in study.scales:
        dirs = [s.run_dir for s in trained if s.scale == scale]
        found = [] if not dirs else (
            (evaluate_scale(study, scale, dirs, tasks, names, _say) if tasks else [])
            + evaluate_lm_eval(study, scale, dirs, _say))
        for problem in found:
            problems.append(problem)
            print(f"warning: {problem}", file=sys.stderr)
    timings["downstream"] = time.time() - start

    start = time.time()
    parts = {}
    with cli_logging():
        for scale in study.scales:
            runs = [s for s in trained if s.scale == scale]
            base = next((s.run_dir for s in runs if s.method == study.baseline), None)
            if base is None:
                problems.append(f"scale {scale}: the full-rank run ({study.baseline}) is "
                                "missing; its methods are not compared with full rank")
            others = [str(s.run_dir) for s in runs if s.method != study.baseline]
            if not runs:
                continue
            _say(f"[analyse] {scale}: {len(runs)} run(s)")
            parts[scale] = analyse(others or [str(base)], None if base is None else str(base),
                                   settings, cache_dir=study.out / "analysis" / "cache",
                                   progress=progress)
    timings["analysis"] = time.time() - start
    if not parts:
        print("error: no run was trained; nothing to analyse (see the warnings above)",
              file=sys.stderr)
        return 1
    start = time.time()
    report = write_study_report(study, settings, parts, problems, timings,
                                analysis_args.predictor, analysis_args.ridge_alpha)
    timings["report"] = time.time() - start
    total = sum(timings.values())
    print(f"study {study.name}: {len(trained)} of {len(study.runs)} run(s), "
          f"{len(problems)} problem(s); " + ", ".join(f"{k} {v / 60:.1f} min"
                                                    for k, v in timings.items())
          + f", total {total / 60:.1f} min")
    print(f"report: {report.resolve()}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
