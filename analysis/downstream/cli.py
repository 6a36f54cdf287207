"""``lowrank-eval``: zero-shot multiple-choice accuracy of trained runs, written per step.

    lowrank-eval RUN_DIR... [--tasks builtin | NAME... | FILE.jsonl...] [--steps final|all|N...]

Each RUN_DIR is a run written by ``lowrank-train`` or a seed group (``seed_*/``
runs, evaluated one seed at a time). For every selected checkpoint the tasks are
scored with the run's own model, tokenizer and weights, and the results are
merged into ``<run>/downstream/step_<N>.json`` (:mod:`analysis.downstream.results`).
Tasks: the built-in offline suite (``builtin`` = all of
:data:`analysis.downstream.tasks.BUILTIN_TASKS`, generated from the run's held-out
documents) and any JSONL file of ``{"context", "choices", "gold"}`` lines.
Bad input (an unknown task, a malformed or unreadable task file, a run without
checkpoints, a missing step, a bad number, a run directory where the results
cannot be written, any ``OSError``) is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analysis.downstream.tasks import BUILTIN_TASKS, Task, TaskError, load_jsonl_task
from train.user_errors import OneLineArgumentParser, describe_os_error, print_error

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="lowrank-eval", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or seed groups")
    p.add_argument("--tasks", nargs="+", default=["builtin"], metavar="TASK",
                   help=f"'builtin', built-in task names ({', '.join(BUILTIN_TASKS)}) or "
                        ".jsonl files (default: builtin)")
    p.add_argument("--steps", nargs="+", default=["final"], metavar="STEP",
                   help="checkpoint steps: 'final' (default), 'all' or integers")
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows per compiled call (default 32)")
    p.add_argument("--max-examples", type=int, default=1000,
                   help="questions per built-in task at most (default 1000)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest model input in tokens (default: the run's seq_len)")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples of the standard errors (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="task generation and bootstrap seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _task_specs(specs: list[str]) -> tuple[list[str], list[Task]]:
    """Built-in names (validated) and JSONL tasks (read now, so a bad file fails first)."""
    builtin, files = [], []
    for spec in specs:
        if spec == "builtin":
            builtin += [t for t in BUILTIN_TASKS if t not in builtin]
        elif spec in BUILTIN_TASKS:
            if spec not in builtin:
                builtin.append(spec)
        elif spec.endswith(".jsonl") or Path(spec).is_file():
            if Path(spec).is_dir():
                raise TaskError(f"--tasks: {spec!r} is a directory; give a .jsonl file of "
                                '{"context", "choices", "gold"} lines')
            try:
                files.append(load_jsonl_task(spec))
            except TaskError as err:
                raise TaskError(f"--tasks: {err}") from None
            except UnicodeDecodeError as err:
                raise TaskError(f"--tasks: task file {spec!r} is not UTF-8 text (byte "
                                f"{err.start}); write one JSON object per line") from None
            except OSError as err:
                raise TaskError(f"--tasks: task file {describe_os_error(err)}") from None
        else:
            raise TaskError(f"--tasks: unknown task {spec!r}; give 'builtin', one of "
                            f"{', '.join(BUILTIN_TASKS)}, or a .jsonl file of "
                            '{"context", "choices", "gold"} lines')
    names = [t.name for t in files] + builtin
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"--tasks: two tasks are named {dup[0]!r}; rename one of the files")
    return builtin, files


def _validate(args: argparse.Namespace) -> None:
    for run in args.runs:  # before the heavy imports that opening a run needs
        if not Path(run).is_dir():
            what = "is not a directory" if Path(run).exists() else "does not exist"
            raise ValueError(f"RUN_DIR {run!r} {what}; pass run directories written by "
                             "lowrank-train (or seed groups of them)")
    for name in ("batch_size", "max_examples", "bootstrap_iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")


def _line(run: str, step: int, name: str, res: dict) -> str:
    key = res.get("metric", "acc")
    se = res[f"{key}_stderr"]
    margin = (res[key] - res["chance"]) / se if se > 0 else 0.0
    return (f"{run:24s} {step:7d} {name:22s} {res['acc']:.3f}±{res['acc_stderr']:.3f} "
            f"{res['acc_norm']:.3f}±{res['acc_norm_stderr']:.3f} "
            f"{key:>15s} {res[key]:.3f}±{se:.3f} {res['chance']:6.3f} {margin:+6.1f} "
            f"{res['n']:6d}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lowrank-eval``; returns the exit status."""
    from analysis.downstream.source import (
        EvalInputError,
        expand_runs,
        heldout_documents,
        open_eval_run,
        scoring_model,
        select_steps,
    )

    args = _parser().parse_args(argv)
    try:
        _validate(args)
        builtin, file_tasks = _task_specs(args.tasks)
        plan = []
        for arg in args.runs:
            for path, label in expand_runs(arg):
                run = open_eval_run(path, label)
                plan.append((run, select_steps(run, args.steps)))
    except (TaskError, EvalInputError, ValueError) as err:
        return print_error(err)
    except OSError as err:
        return print_error(describe_os_error(err))

    from analysis.downstream.evaluate import evaluate_task
    from analysis.downstream.results import write_step_results
    from analysis.downstream.tasks import build_builtin_task

    print(f"{'run':24s} {'step':>7s} {'task':22s} {'acc':>11s} {'acc_norm':>11s} "
          f"{'headline metric':>27s} {'chance':>6s} {'z':>6s} {'n':>6s}")
    print("(z = (headline - chance) / its bootstrap standard error)")
    for run, steps in plan:
        try:
            tasks = list(file_tasks)
            if builtin:
                docs = heldout_documents(run)
                tasks += [build_builtin_task(t, docs, args.max_examples, args.seed)
                          for t in builtin]
            tokenizer = run.tokenizer()
            for step in steps:
                start = time.time()
                model = scoring_model(run, step, args.max_length)
                results = {}
                for task in tasks:
                    results[task.name] = evaluate_task(
                        model, tokenizer, task, args.batch_size, args.bootstrap_iters,
                        args.seed, progress=None if args.no_progress else _bar(task, run, step))
                    print(_line(run.name, step, task.name, results[task.name]), flush=True)
                try:
                    path = write_step_results(run.path, step, run.name, results)
                except OSError as err:
                    return print_error(f"cannot write the results of run {run.name!r} into "
                                       f"its directory: {describe_os_error(err)}")
                print(f"  -> {path} ({time.time() - start:.1f} s)", flush=True)
        except (TaskError, EvalInputError, ValueError) as err:
            return print_error(err)
        except OSError as err:
            return print_error(f"run {run.name!r}: {describe_os_error(err)}")
    return 0


def _bar(task: Task, run, step: int):
    """A tqdm progress callback over the task's choices (closed when full)."""
    from tqdm import tqdm

    total = sum(len(ex.choices) for ex in task.examples)
    bar = tqdm(total=total, desc=f"{run.name}@{step} {task.name}", leave=False,
               file=sys.stderr, disable=None)

    def update(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return update


if __name__ == "__main__":
    sys.exit(main())
