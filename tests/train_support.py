"""Shared helpers of the tests that train tiny runs: a synthetic corpus and saved states."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


def write_corpus(directory: Path, words: Sequence[str], docs: int, seed: int,
                 words_per_doc: int = 300) -> Path:
    """``docs`` text files of ``words_per_doc`` words drawn from ``words`` into ``directory``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = " ".join(rng.choice(list(words), size=words_per_doc))
        (directory / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return directory


def saved_state(run_dir: Path, step: int) -> dict[str, np.ndarray]:
    """The train state of checkpoint ``step`` of a run as ``{keystr(path): array}``."""
    path = run_dir / "checkpoints" / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path).item_metadata
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta.tree)
    tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def analysis_run_overrides(root: Path, corpus: Path) -> list[str]:
    """``lowrank-train`` overrides of the tiny, quiet, checkpoint-every-step runs the
    analysis tests train (``llama_tiny``, batch 4 x 16, rank 4, refresh every 2 steps)."""
    return ["model.preset=llama_tiny", "data.source=text_dir", f"data.path={corpus}",
            f"data.cache_dir={root / 'cache'}", "batch_size=4", "seq_len=16", "log_every=1",
            "eval.every=0", "checkpoint.keep=5", "progress=false", "tensorboard=false",
            "checkpoint.async_save=false", "optimizer.rank=4", "optimizer.update_proj_gap=2"]


#: suffixes of metrics fields that measure wall-clock time (see ``train/hooks.py``)
TIMING_SUFFIXES = ("_per_s", "_seconds")


def without_timing(rows: list[dict]) -> list[dict]:
    """Metrics lines without the fields that measure wall-clock time (and lines left empty)."""
    out = [{k: v for k, v in r.items() if not k.endswith(TIMING_SUFFIXES)} for r in rows]
    return [r for r in out if set(r) != {"step"}]
