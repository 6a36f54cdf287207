"""The work of a study: train every run, evaluate it downstream (each as its own process).

* Training: ``lowrank-train`` (``python -m train.cli``) per run; a run whose checkpoint at
  its last step exists (every seed of a group) is finished and skipped; any other is
  started, and ``lowrank-train`` resumes it from its newest checkpoint by itself.
* Downstream: ``lowrank-eval`` (``python -m analysis.downstream.cli``) on the runs of a
  scale at their final checkpoint; a run whose results already hold every requested task
  at that step is skipped. JSONL task files are checked first: a malformed one is one
  problem line and is left out, the other tasks are evaluated.

Every failure is one problem line (returned, and shown in the report); the study goes on
with the rest.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from analysis.study.config import RunSpec, Study
from rundir import groups as G
from rundir import layout

__all__ = ["downstream_tasks", "evaluate_lm_eval", "evaluate_scale", "is_finished",
           "train_run"]

Say = Callable[[str], None]


def _steps_saved(run_dir: Path) -> set[int]:
    ckpts = run_dir / layout.CHECKPOINTS
    if not ckpts.is_dir():
        return set()
    return {int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit()}


def is_finished(spec: RunSpec, seeds: int) -> bool:
    """Whether the run (every seed of a group) has its checkpoint at its last step."""
    dirs = [spec.run_dir] if seeds == 1 else [layout.seed_dir(spec.run_dir, s)
                                               for s in range(seeds)]
    return all(spec.steps in _steps_saved(d) for d in dirs)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def train_run(spec: RunSpec, seeds: int, say: Say) -> str | None:
    """Train (or resume) one run; ``None`` on success, else a one-line problem."""
    if is_finished(spec, seeds):
        say(f"[train] {spec.scale}/{spec.method}: finished, skipped")
        return None
    resumed = " (resuming)" if _steps_saved(spec.run_dir) or (
        seeds > 1 and any(_steps_saved(m.path) for m in G.expand(spec.run_dir))) else ""
    cmd = [sys.executable, "-m", "train.cli"]
    for f in spec.configs:
        cmd += ["-c", str(f)]
    cmd += [*spec.overrides, "progress=false"]
    say(f"[train] {spec.scale}/{spec.method}{resumed}: {' '.join(cmd[3:])}")
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return (f"run {spec.scale}/{spec.method}: lowrank-train failed (exit "
                f"{done.returncode}: {_last_line(done.stderr or done.stdout)}); it is left out")
    say(f"[train] {spec.scale}/{spec.method}: done in {(time.time() - start) / 60:.1f} min")
    return None


def downstream_tasks(study: Study) -> tuple[list[str], list[str], list[str]]:
    """``(task arguments, their result names, problems)``: JSONL files are read now, a
    malformed one is a problem and is left out."""
    from analysis.downstream.tasks import BUILTIN_TASKS, TaskError, load_jsonl_task

    args, names, problems = [], [], []
    for spec in study.downstream.get("tasks", ["builtin"]):
        spec = str(spec)
        if spec == "builtin":
            args.append(spec)
            names += list(BUILTIN_TASKS)
        elif spec in BUILTIN_TASKS:
            args.append(spec)
            names.append(spec)
        else:
            try:
                task = load_jsonl_task(spec)
            except TaskError as err:
                problems.append(f"{err}; the task is left out of the downstream evaluation")
                continue
            args.append(spec)
            names.append(task.name)
    return args, names, problems


def _evaluated(run_dir: Path, names: list[str]) -> bool:
    """Every seed's results hold ``names`` at its newest checkpoint, written after it."""
    from analysis.downstream import DownstreamResultsError, read_downstream, result_path

    members = [m.path for m in G.expand(run_dir)]
    for path in members:
        steps = _steps_saved(path)
        if not steps:
            return False
        try:
            results = read_downstream(path).get(max(steps))
        except DownstreamResultsError:
            return False
        if results is None or not set(names) <= set(results["tasks"]):
            return False
        written = result_path(path, max(steps)).stat().st_mtime
        if written < (path / layout.CHECKPOINTS / str(max(steps))).stat().st_mtime:
            return False                          # the checkpoint was written again since
    return True


def _eval_options(options: dict[str, Any]) -> list[str]:
    out = []
    for key in ("max_examples", "batch_size", "bootstrap_iters", "seed", "max_length"):
        if options.get(key) is not None:
            out += [f"--{key.replace('_', '-')}", str(options[key])]
    steps = options.get("steps", "final")
    out += ["--steps", *([str(s) for s in steps] if isinstance(steps, list) else [str(steps)])]
    return out


def evaluate_scale(study: Study, scale: str, run_dirs: list[Path], tasks: list[str],
                   names: list[str], say: Say) -> list[str]:
    """``lowrank-eval`` of ``tasks`` (arguments; ``names``: their result names) on the trained
    runs of one scale; the problems (one line each)."""
    problems: list[str] = []
    args = tasks
    todo = [d for d in run_dirs if not _evaluated(d, names)]
    if not args:
        return problems
    if not todo:
        say(f"[eval] {scale}: every run already evaluated, skipped")
        return problems
    cmd = [sys.executable, "-m", "analysis.downstream.cli", *map(str, todo), "--tasks", *args,
           *_eval_options(study.downstream), "--no-progress"]
    say(f"[eval] {scale}: lowrank-eval on {len(todo)} run(s)")
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        say(f"[eval] {scale}: done in {(time.time() - start) / 60:.1f} min")
        return problems
    # one run failed and stopped the call: the others one by one, each failure one line
    for d in [d for d in todo if not _evaluated(d, names)]:
        one = subprocess.run([sys.executable, "-m", "analysis.downstream.cli", str(d),
                              "--tasks", *args, *_eval_options(study.downstream),
                              "--no-progress"], capture_output=True, text=True, check=False)
        if one.returncode != 0:
            problems.append(f"run {scale}/{d.name}: lowrank-eval failed (exit "
                            f"{one.returncode}: {_last_line(one.stderr or one.stdout)})")
    return problems


def evaluate_lm_eval(study: Study, scale: str, run_dirs: list[Path], say: Say) -> list[str]:
    """The config's ``lm_eval_tasks`` through ``lowrank-lm-eval`` (lm-evaluation-harness with
    our model) at every run's final checkpoint, imported into its downstream results
    (:mod:`analysis.downstream.lm_eval_import`); the problems (one line each).

    lm-eval's standard error of ``acc`` / ``acc_norm`` is its closed form
    ``std(ddof=1) / sqrt(n)`` (its CLI takes no bootstrap setting; the bootstrap is used
    only for metrics that are not means)."""
    from analysis.downstream.lm_eval_import import import_lm_eval

    opts = study.downstream
    tasks = [str(t) for t in opts.get("lm_eval_tasks") or []]
    if not tasks:
        return []
    problems = []
    for member in [m.path for d in run_dirs for m in G.expand(d)]:
        if _evaluated(member, tasks):
            continue
        out = member / "downstream" / "lm_eval"
        cmd = [sys.executable, "-m", "analysis.downstream.lm_eval_cli", "--model", "lowrank-jax",
               "--model_args", f"run_dir={member},step=final", "--tasks", ",".join(tasks),
               "--output_path", str(out), "--batch_size", str(opts.get("batch_size", 16))]
        if opts.get("lm_eval_include_path"):
            cmd += ["--include_path", str(opts["lm_eval_include_path"])]
        if opts.get("lm_eval_limit"):
            cmd += ["--limit", str(opts["lm_eval_limit"])]
        say(f"[lm-eval] {scale}/{member.name}: {', '.join(tasks)}")
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        files = sorted(out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        if done.returncode != 0 or not files:
            problems.append(f"run {scale}/{member.name}: lowrank-lm-eval failed (exit "
                            f"{done.returncode}: {_last_line(done.stderr or done.stdout)})")
            continue
        try:
            import_lm_eval(member, files[-1], sorted(_steps_saved(member)), tasks=tasks)
        except ValueError as err:
            problems.append(f"run {scale}/{member.name}: {err}")
    return problems
