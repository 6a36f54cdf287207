"""The bad inputs of the four commands, a runner that feeds them to the real entry points,
and the summary table.

Each case is ``(group, command, arguments, name)``: ``name`` must appear in the one
``error:`` line the command prints (the parameter, or the path it concerns), the exit
status must be 2 and nothing may look like a traceback. Arguments may refer to the
scratch objects of :func:`make_places` as ``{file}``, ``{corpus}``, ... .

The runner (``python tests/bad_inputs.py GROUP PLACES_JSON``) calls each command's
``main(argv)`` - the function its console script calls - once per case in ONE process,
so a group pays for its imports once; it prints one JSON line per case. Groups that
need no JAX run first in the fast suite; the ones that prepare data or read a trained
run are slow.

The table (``python tests/bad_inputs.py --table``, a few minutes on two cores) runs
every group and prints, per command: inputs tried, clear errors, tracebacks, hangs and
silent NaN runs (a non-finite number that trained and exited 0). Last printed:

    command          inputs  clear errors  tracebacks  hangs  silent NaN runs
    lowrank-train        66            66           0      0                0
    lowrank-memory       16            16           0      0                0
    lowrank-analyze      21            21           0      0                0
    lowrank-eval         16            16           0      0                0
    total               119           119           0      0                0

(The Python API's bad inputs are in ``tests/test_bad_inputs_api.py``.)
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ENTRY = {"lowrank-train": "train.cli", "lowrank-memory": "train.memory_cli",
         "lowrank-analyze": "analysis.cli", "lowrank-eval": "analysis.downstream.cli"}

#: groups that import no JAX (or little) and run in the fast suite
FAST_GROUPS = ("train_config", "analyze_args", "eval_args")
#: groups that import JAX, prepare data or read a trained run (marked slow)
SLOW_GROUPS = ("train_validate", "memory", "train_prepare", "analyze_run", "eval_run")

#: the overrides of a tiny run on the scratch corpus (later overrides win)
TINY = ["model.preset=llama_tiny", "data.source=text_dir", "data.path={corpus}",
        "data.cache_dir={cache}", "batch_size=2", "seq_len=16", "steps=1", "eval.every=0",
        "progress=false", "tensorboard=false", "run_dir={scratch}/run_ok"]

T, M, A, E = "lowrank-train", "lowrank-memory", "lowrank-analyze", "lowrank-eval"
CASES: list[tuple[str, str, list[str], str]] = [
    # ---- lowrank-train: the config, before JAX is imported
    *[("train_config", T, [f"{key}={value}"], key) for key, value in [
        ("optimizer.lr", ".nan"), ("optimizer.lr", ".inf"), ("optimizer.lr", "-.inf"),
        ("optimizer.lr", "nan"), ("optimizer.scale", ".nan"), ("optimizer.grad_clip", ".nan"),
        ("optimizer.weight_decay", ".inf"), ("schedule.min_lr_ratio", ".nan"),
        ("schedule.warmup_fraction", ".inf"), ("relora.prune_fraction", ".nan"),
        ("data.val_fraction", ".nan"), ("optimizer.kwargs.b1", ".nan"),
        ("model.overrides.rope_base", ".inf"), ("optimizer.lr", "0"),
        ("optimizer.lr", "-1e-3"), ("steps", "0"), ("steps", "many"), ("log_every", "0"),
        ("eval.batches", "0"), ("checkpoint.keep", "0"), ("nonfinite.max_consecutive", "-1"),
        ("nonfinite.skip", "maybe"), ("schedule.warmup_steps", "x"), ("seed_data", "foo"),
        ("data.source", "nope"), ("data.mode", "nope"), ("steps", "[1"),
        ("schedule.warmup_steps", "5000")]],
    ("train_config", T, ["schedule.name=linear"], "schedule"),
    ("train_config", T, ["batch_size=3", "optimizer.accumulate=2"], "optimizer.accumulate"),
    ("train_config", T, ["optimizer.rnak=3"], "optimizer.rank"),
    ("train_config", T, ["steps"], "steps"),
    ("train_config", T, ["data.source=text_dir"], "data.path"),
    ("train_config", T, ["--config", "{scratch}/does_not_exist.yaml"], "does_not_exist.yaml"),
    ("train_config", T, ["--config", "{emptydir}"], "emptydir"),
    ("train_config", T, ["--config", "{yaml_bad}"], "bad.yaml"),
    ("train_config", T, ["--config", "{yaml_list}"], "list.yaml"),
    ("train_config", T, ["--config", "{yaml_binary}"], "binary.yaml"),
    ("train_config", T, ["--bogus"], "--bogus"),
    # ---- lowrank-train: checks that read the library (JAX imported)
    ("train_validate", T, ["model.preset=nope"], "preset"),
    ("train_validate", T, ["optimizer.name=nope"], "optimizer"),
    ("train_validate", T, ["mesh.fsdp=0"], "mesh"),
    ("train_validate", T, ["mesh.rules.embed=foo"], "mesh.rules.embed"),
    ("train_validate", T, ["optimizer.name=galore_adamw", "optimizer.rank=100000"],
     "optimizer.rank"),
    ("train_validate", T, ["optimizer.name=galore_adamw", "optimizer.kwargs.nope=1"], "nope"),
    ("train_validate", T, ["seq_len=4096", "model.max_seq_len=128"], "seq_len"),
    ("train_validate", T, ["data_parallel=2", "mesh.data=2"], "data_parallel"),
    ("train_validate", T, ["relora.reset_every=10"], "relora.reset_every"),
    ("train_validate", T, ["model.linear=nope"], "model.linear"),
    ("train_validate", T, ["model.overrides.nope=3"], "nope"),
    ("train_validate", T, ["optimizer.name=galore_adamw", "optimizer.rank=4",
                           "model.preset=llama_tiny", "optimizer.kwargs.b1=abc"],
     "optimizer.kwargs.b1"),
    ("train_validate", T, ["optimizer.name=galore_adamw", "optimizer.rank=4",
                           "model.preset=llama_tiny", "optimizer.kwargs.proj_type=nope"],
     "proj_type"),
    # ---- lowrank-train: files and directories (the run is prepared)
    *[("train_prepare", T, [*TINY, *extra], name) for extra, name in [
        (["data.tokenizer={bad_model}"], "data.tokenizer"),
        (["data.tokenizer={text_model}"], "data.tokenizer"),
        (["data.tokenizer={emptydir}"], "data.tokenizer"),
        (["data.tokenizer={scratch}/none.model"], "data.tokenizer"),
        (["run_dir={file}"], "run_dir"),
        (["run_dir={file}/sub"], "run_dir"),
        (["run_dir={read_only}/run"], "run_dir"),
        (["data.path={scratch}/no_such_dir"], "data.path"),
        (["data.path={file}"], "data.path"),
        (["data.path={emptydir}"], "data.path"),
        (["data.cache_dir={file}"], "data.cache_dir"),
        (["profile.steps=1", "profile.dir={file}"], "profile.dir"),
        (["seq_len=20000", "model.max_seq_len=20000"], "seq_len"),
        (["mesh.data=64"], "mesh"),
    ]],
    # ---- lowrank-memory
    *[("memory", M, ["--model", "llama_tiny", *extra], name) for extra, name in [
        (["--model", "nope"], "preset"), (["--optimizer", "nope"], "optimizer"),
        (["--mesh", "fsdp=2,fsdp=4"], "--mesh"), (["--mesh", ""], "--mesh"),
        (["--mesh", "fsdp=0"], "--mesh"), (["--mesh", "fsdp"], "--mesh"),
        (["--mesh", "pipeline=2"], "--mesh"), (["--mesh", "fsdp=x"], "--mesh"),
        (["--mesh", "fsdp=2,,"], "--mesh"),
        (["--optimizer", "galore_adamw", "--rank", "0"], "--rank"),
        (["--optimizer", "galore_adamw", "--rank", "-1"], "--rank"),
        (["--linear", "cola", "--linear-rank", "0"], "--linear-rank"),
        (["--optimizer", "galore_adamw", "--rank", "100000"], "rank"),
        (["--rank", "abc"], "--rank"), (["--dtype", "fp64"], "--dtype"),
        (["--linear", "nope"], "--linear")]],
    # ---- lowrank-analyze: arguments, checked before the analysis imports JAX
    ("analyze_args", A, ["{scratch}/no_run", "--out", "{scratch}/o"], "RUN_DIR"),
    ("analyze_args", A, ["{file}", "--out", "{scratch}/o"], "RUN_DIR"),
    ("analyze_args", A, ["{scratch}/a", "{scratch}/b", "--out", "{scratch}/o"], "RUN_DIR"),
    ("analyze_args", A, ["{emptydir}", "--out", "{file}"], "--out"),
    ("analyze_args", A, ["{emptydir}", "--out", "{file}/x"], "--out"),
    ("analyze_args", A, ["{emptydir}", "--out", "{read_only}/o"], "--out"),
    *[("analyze_args", A, ["{emptydir}", "--out", "{scratch}/o", *extra], name)
      for extra, name in [
        (["--alpha-max", "nan"], "--alpha-max"), (["--alpha-max", "inf"], "--alpha-max"),
        (["--alpha-max", "-1"], "--alpha-max"), (["--threshold", "nan"], "--threshold"),
        (["--threshold", "-0.5"], "--threshold"), (["--directions", "0"], "--directions"),
        (["--alpha-points", "4"], "--alpha-points"),
        (["--interp-points", "1"], "--interp-points"), (["--sequences", "2"], "--sequences"),
        (["--steps", "-1"], "--steps"), (["--baseline", "{scratch}/nope"], "--baseline"),
        (["--directions", "x"], "--directions")]],
    ("analyze_args", A, ["{emptydir}"], "--out"),
    # ---- lowrank-analyze: a real run
    ("analyze_run", A, ["{run}", "--out", "{scratch}/o_steps", "--steps", "99999",
                        "--no-progress"], "--steps"),
    ("analyze_run", A, ["{emptydir}", "--out", "{scratch}/o_empty", "--no-progress"],
     "RUN_DIR"),
    # ---- lowrank-eval: arguments and task files
    *[("eval_args", E, ["{emptydir}", *extra], name) for extra, name in [
        (["--tasks", "nope"], "--tasks"), (["--tasks", "{jsonl_binary}"], "--tasks"),
        (["--tasks", "{jsonl_dir}"], "--tasks"), (["--tasks", "{scratch}/none.jsonl"],
                                                   "--tasks"),
        (["--tasks", "{jsonl_bad}"], "--tasks"), (["--batch-size", "0"], "--batch-size"),
        (["--max-examples", "0"], "--max-examples"), (["--max-length", "1"], "--max-length"),
        (["--bootstrap-iters", "0"], "--bootstrap-iters"),
        (["--batch-size", "x"], "--batch-size")]],
    ("eval_args", E, ["{scratch}/no_run"], "RUN_DIR"),
    ("eval_args", E, ["{file}"], "RUN_DIR"),
    # ---- lowrank-eval: a real run
    ("eval_run", E, ["{emptydir}"], "emptydir"),
    ("eval_run", E, ["{run}", "--steps", "abc", "--no-progress"], "--steps"),
    ("eval_run", E, ["{run}", "--steps", "99999", "--no-progress"], "99999"),
    ("eval_run", E, ["{run_blocked}", "--bootstrap-iters", "2", "--tasks", "{jsonl_good}",
                     "--no-progress"], "run_blocked"),
]


def cases(group: str) -> list[tuple[str, str, list[str], str]]:
    """The cases of one group."""
    return [c for c in CASES if c[0] == group]


def case_id(case: tuple[str, str, list[str], str]) -> str:
    """A short readable id: the command and its arguments (the tiny-run prefix left out)."""
    _, cmd, args, _ = case
    shown = [a for a in args if a not in TINY]
    return f"{cmd.removeprefix('lowrank-')} {' '.join(shown) or '(none)'}"


def make_places(root: Path) -> dict[str, str]:
    """Scratch files and directories the cases refer to, under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "afile").write_text("a regular file\n")
    (root / "emptydir").mkdir(exist_ok=True)
    (root / "bad.model").write_bytes(bytes(range(256)) * 8)
    (root / "text.model").write_text("not a model\n")
    (root / "bad.yaml").write_text("steps: [1\n")
    (root / "list.yaml").write_text("- steps\n- 2\n")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00steps")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00{}")
    (root / "dir.jsonl").mkdir(exist_ok=True)
    (root / "bad.jsonl").write_text("{not json\n")
    (root / "good.jsonl").write_text("".join(
        json.dumps({"context": f"document {i}: some words", "choices": [" go here", " went"],
                    "gold": 0}) + "\n" for i in range(4)))
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document {i}: " + "some words go here. " * 40)
    return {"scratch": str(root), "file": str(root / "afile"), "emptydir": str(root / "emptydir"),
            "bad_model": str(root / "bad.model"), "text_model": str(root / "text.model"),
            "yaml_bad": str(root / "bad.yaml"), "yaml_list": str(root / "list.yaml"),
            "yaml_binary": str(root / "binary.yaml"), "jsonl_binary": str(root / "binary.jsonl"),
            "jsonl_dir": str(root / "dir.jsonl"), "jsonl_bad": str(root / "bad.jsonl"),
            "jsonl_good": str(root / "good.jsonl"),
            "corpus": str(corpus), "cache": str(root / "cache"),
            "read_only": read_only_place(root)}


def read_only_place(root: Path) -> str:
    """A directory in which nothing can be created, also for root (who ignores chmod).

    As root: ``/sys`` (sysfs refuses new entries); otherwise a ``chmod 0o555``
    directory under ``root``.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/sys").is_dir():
        return "/sys/lowrank_jax_bad_input"
    ro = root / "read_only"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    return str(ro)


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang()


def run_case(case: tuple[str, str, list[str], str], places: dict[str, str],
             timeout: int = 120) -> dict:
    """Call the command's ``main`` with the case's arguments; what it printed and returned."""
    _, cmd, args, name = case
    argv = [a.format(**places) for a in args]
    err, out = io.StringIO(), io.StringIO()
    rc: int | None
    hang = raised = False
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = importlib.import_module(ENTRY[cmd]).main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    except _Hang:
        rc, hang = None, True
    except BaseException:  # noqa: BLE001 - what the user would see as a traceback
        rc, raised = 1, True
        err.write(traceback.format_exc())
    finally:
        signal.alarm(0)
    text = err.getvalue()
    return {"id": case_id(case), "command": cmd, "name": name.format(**places), "rc": rc,
            "stderr": text, "stdout": out.getvalue()[-2000:], "hang": hang,
            "traceback": raised or "Traceback (most recent call last)" in text,
            "seconds": round(time.perf_counter() - start, 2)}


def check(result: dict) -> list[str]:
    """What is wrong with one result (empty: a clear one-line error naming the parameter)."""
    problems = []
    if result["hang"]:
        problems.append("did not return")
    if result["traceback"]:
        problems.append("traceback")
    if result["rc"] != 2:
        problems.append(f"exit status {result['rc']}, expected 2")
    lines = [x for x in result["stderr"].splitlines() if "error:" in x]
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    elif result["name"] not in lines[0]:
        problems.append(f"the error line does not name {result['name']!r}")
    return problems


def run_group(group: str, places: dict[str, str], timeout: int = 1200) -> list[dict]:
    """The results of a group's cases, from one fresh process."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), group,
                           json.dumps(places)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or len(results) != len(cases(group)):
        raise RuntimeError(f"the runner of {group} failed (exit {proc.returncode}): "
                           f"{proc.stderr[-3000:]}")
    return results


def _silent_nan(result: dict, case: tuple[str, str, list[str], str]) -> bool:
    """A non-finite number in the input that trained and exited 0."""
    text = " ".join(case[2]).lower()
    return result["rc"] == 0 and any(s in text for s in ("nan", "inf"))


def table(root: Path) -> str:
    """Run every group; the per-command table of outcomes."""
    from train.config import load_config  # noqa: F401 - fail early outside the repository

    places = make_places(root)
    places.update(trained_places(root))
    rows: dict[str, list[int]] = {cmd: [0, 0, 0, 0, 0] for cmd in ENTRY}
    for group in FAST_GROUPS + SLOW_GROUPS:
        for case, res in zip(cases(group), run_group(group, places)):
            row = rows[case[1]]
            row[0] += 1
            row[1] += not check(res)
            row[2] += res["traceback"]
            row[3] += res["hang"]
            row[4] += _silent_nan(res, case)
    total = [sum(col) for col in zip(*rows.values())]
    head = f"{'command':16s} {'inputs':>6s}  {'clear errors':>12s}  {'tracebacks':>10s}  " \
           f"{'hangs':>5s}  {'silent NaN runs':>15s}"
    lines = [head] + [f"{name:16s} {r[0]:6d}  {r[1]:12d}  {r[2]:10d}  {r[3]:5d}  {r[4]:15d}"
                      for name, r in [*rows.items(), ("total", total)]]
    return "\n".join(lines)


def trained_places(root: Path) -> dict[str, str]:
    """A tiny trained run (2 checkpoints) and a copy whose results cannot be written."""
    import shutil

    from train.config import load_config
    from train.loop import run

    places = make_places(root)
    run_dir = root / "run"
    if not (run_dir / "checkpoints").is_dir():
        args = [a.format(**places) for a in TINY]
        run(load_config(None, [*args, f"run_dir={run_dir}", "steps=2", "checkpoint.every=1",
                               "checkpoint.async_save=false"]))
    blocked = root / "run_blocked"
    if not blocked.is_dir():
        shutil.copytree(run_dir, blocked)
        (blocked / "downstream").write_text("a file where the results directory goes\n")
    return {"run": str(run_dir), "run_blocked": str(blocked)}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--table"]:
        with tempfile.TemporaryDirectory() as tmp:
            print(table(Path(tmp)))
        return 0
    group, places = argv[0], json.loads(argv[1])
    for case in cases(group):
        print(json.dumps(run_case(case, places)), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main(sys.argv[1:]))
