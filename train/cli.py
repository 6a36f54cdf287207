"""``lowrank-train``: pre-train a LLaMA model with a (low-rank) optimizer.

Usage::

    lowrank-train --config configs/demo_galore.yaml [key=value ...]
    lowrank-train --config configs/llama_60m_galore.yaml optimizer.rank=64 run_dir=runs/r64
    lowrank-train --config configs/demo_adamw.yaml --print-config
    lowrank-train --config configs/demo_galore.yaml seeds=3   # runs/demo_galore/seed_{0,1,2}
    lowrank-train -c configs/base/c4.yaml -c configs/presets/llama_60m.yaml \
                  -c configs/methods/galore.yaml run_dir=runs/g60   # composed from parts

Several ``--config`` files compose in order (as a ``defaults:`` list does, see
:mod:`train.config.compose`); the resolved config is written to
``<run_dir>/config.yaml``. Starting again with the same ``run_dir`` resumes
from the latest good checkpoint.
Bad input (unknown preset, optimizer or key, a value of the wrong type, a NaN or
infinite number, a missing data path, a tokenizer file that is not a SentencePiece
model, ``seq_len`` longer than the corpus, a rank too large for the model, a
``run_dir`` that is a file or cannot be written, any ``OSError``, running out of
memory) prints one line ``error: ...`` on stderr and exits with status 2. A run
stopped by too many non-finite steps in a row (``nonfinite.max_consecutive``)
prints one ``error:`` line and exits with status 3. Set
``LOWRANK_TRAIN_TRACEBACK=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from train.user_errors import OneLineArgumentParser

__all__ = ["main"]

EXIT_USAGE = 2  # = train.user_errors.EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="lowrank-train",
        description="Pre-train a LLaMA model with AdamW or a low-rank optimizer "
                    "(GaLore, SARA, Fira, ...). Resumes automatically in an existing run_dir.")
    p.add_argument("--config", "-c", action="append",
                   help="YAML config file (see configs/); several compose in order")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optimizer.rank=64 steps=100")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    return p


def _error(msg: str) -> int:
    first = (msg.strip().splitlines() or ["unknown error"])[0]
    print(f"error: {first}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _single_threaded_blas() -> None:
    """One OpenBLAS thread unless the user chose otherwise (call before importing JAX).

    XLA:CPU runs the LAPACK calls of the projector refreshes (one SVD per matrix)
    on its own worker threads; OpenBLAS threads on top of those oversubscribe the
    cores: on a loaded 2-core machine a GaLore refresh step of the 20M-like model
    took 32 s with OpenBLAS's default threads and 1.4 s with one thread.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _print_json(obj: Any) -> None:
    try:
        print(json.dumps(obj, indent=2), flush=True)
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stdout = None  # nothing more to flush at exit


def _config_paths(cfg: Any) -> list[tuple[str, str]]:
    """``(config key, absolute path)`` of every file or directory a run reads or writes."""
    data = cfg.data
    paths = [("run_dir", cfg.run_dir), ("data.cache_dir", str(data.resolved_cache_dir)),
             ("data.path", data.path), ("profile.dir", cfg.profile.dir)]
    if data.tokenizer != "byte":
        paths.append(("data.tokenizer", data.tokenizer))
    return [(key, os.path.abspath(os.path.expanduser(p))) for key, p in paths if p]


def os_error_message(err: OSError, cfg: Any) -> str:
    """One line for an ``OSError`` of a run, naming the config key whose path it concerns."""
    from train.user_errors import describe_os_error

    if err.filename is None:
        return f"{describe_os_error(err)} (run_dir={cfg.run_dir})"
    path = os.path.abspath(os.fspath(err.filename))
    owners = [(len(p), key) for key, p in _config_paths(cfg)
              if path == p or path.startswith(p.rstrip(os.sep) + os.sep)]
    if owners:
        key = max(owners)[1]
        return f"{key}: {describe_os_error(err, f'another {key}')}"
    return describe_os_error(err)


def _out_of_memory(err: Exception) -> str | None:
    """One line for XLA running out of memory (else ``None``)."""
    text = str(err)
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return None
    from train.user_errors import first_line

    return (f"out of memory ({first_line(text)[:200]}); lower batch_size (or raise "
            "optimizer.accumulate), pick a smaller model, or shard over more devices "
            "(mesh.fsdp)")


def _bad_input_message(err: Exception, cfg: Any) -> str:
    if isinstance(err, OSError) and err.errno is not None:  # the system's, not our message
        return os_error_message(err, cfg)
    if isinstance(err, StopIteration):
        return (f"the training data yields no batch of seq_len+1={cfg.seq_len + 1} tokens; "
                "lower seq_len or use a larger corpus")
    return str(err)


def _prepare_and_train(cfg: Any) -> list[dict[str, Any]] | int:
    """Prepare then train ``cfg`` (all its seeds); the summaries, or 2 for bad input."""
    from train.data import CorpusUnavailableError
    from train.loop import train
    from train.prepare import prepare

    try:
        if cfg.seeds > 1:
            from train.seeds import run_seeds

            return run_seeds(cfg)
        run = prepare(cfg)
    except (ValueError, FileNotFoundError, NotADirectoryError, CorpusUnavailableError,
            StopIteration) as e:
        if os.environ.get("LOWRANK_TRAIN_TRACEBACK"):
            raise
        return _error(_bad_input_message(e, cfg))
    return [train(run)]


def _train(cfg: Any) -> int:
    """Train ``cfg``; print one summary line per run; the exit status."""
    from train.hooks import StopTraining

    try:
        summaries = _prepare_and_train(cfg)
    except KeyboardInterrupt:
        print("interrupted; the run resumes from its last checkpoint when started again",
              file=sys.stderr)
        return 130
    except StopTraining as stop:
        _error(str(stop))
        return stop.exit_code
    except OSError as err:
        if os.environ.get("LOWRANK_TRAIN_TRACEBACK"):
            raise
        return _error(os_error_message(err, cfg))
    except Exception as err:  # XLA's own error type: only out-of-memory is the user's
        message = _out_of_memory(err)
        if message is None or os.environ.get("LOWRANK_TRAIN_TRACEBACK"):
            raise
        return _error(message)
    if isinstance(summaries, int):
        return summaries
    for summary in summaries:
        print(json.dumps(summary), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    _single_threaded_blas()
    args = _parser().parse_args(argv)

    from train.config import config_to_dict, load_config
    from train.console import cli_logging

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("LOWRANK_TRAIN_TRACEBACK"):
            raise
        return _error(str(e))
    if args.print_config:
        _print_json(config_to_dict(cfg))
        return 0
    with cli_logging():
        return _train(cfg)


if __name__ == "__main__":
    sys.exit(main())
