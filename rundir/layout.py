"""What a run directory holds, by name: the one place that writes and reads its layout.

``lowrank-train`` writes, under ``run_dir``::

    config.yaml                  the resolved config of the run (YAML)
    metrics.jsonl                one JSON object per line (train, telemetry, eval lines)
    tb/                          TensorBoard event files
    checkpoints/<step>/          orbax checkpoints (state, data, config, meta)
    checkpoint_manifests/<step>.json   sizes of a finalized step's files
    corrupt_checkpoints/<step>-<time>/ damaged steps moved out of the way
    profile/                     a profiler trace (when ``profile.steps > 0``)

``lowrank-train ... seeds=N`` writes one such directory per seed,
``<run_dir>/seed_<s>/`` (:func:`seed_dir`); :mod:`rundir.groups` reads them back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINTS", "CONFIG", "CORRUPT", "MANIFESTS", "METRICS", "PROFILE", "SEED_DIR",
           "TENSORBOARD", "read_metrics", "seed_dir"]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
MANIFESTS = "checkpoint_manifests"
CORRUPT = "corrupt_checkpoints"
PROFILE = "profile"
#: the name of one seed's run directory inside a group
SEED_DIR = re.compile(r"^seed_(\d+)$")


def seed_dir(group_dir: str | Path, seed: int) -> Path:
    """``<group_dir>/seed_<seed>``: the run directory of one seed of a group.

    >>> seed_dir("runs/g", 3).as_posix()
    'runs/g/seed_3'
    """
    return Path(group_dir) / f"seed_{seed}"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The parsed lines of a ``metrics.jsonl`` (a run directory or the file; a torn line is skipped).

    Returns ``[]`` when there is no such file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
