"""Seed groups: a directory of ``seed_<s>/`` run directories (``lowrank-train ... seeds=N``).

A RUN_DIR argument that holds ``seed_<s>`` subdirectories and no ``checkpoints/``
of its own is a *group*: one method trained with several seeds. It expands
into one member per seed, named ``<group>/seed_<s>``; any other directory is a
plain run (a group of one, named as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rundir.layout import CHECKPOINTS, SEED_DIR

__all__ = ["Member", "expand", "is_group"]


@dataclass(frozen=True)
class Member:
    """One run directory of an argument.

    Attributes:
      path: the run directory.
      group: the group label (the argument's directory name).
      seed: the seed of a group member, ``None`` for a plain run.
      name: the run label: ``<group>/seed_<s>`` for members, ``None`` for plain runs
        (they keep the directory-name label).
    """

    path: Path
    group: str
    seed: int | None
    name: str | None


def _seed_dirs(path: Path) -> list[tuple[int, Path]]:
    if not path.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if p.is_dir() and (m := SEED_DIR.match(p.name))]
    return sorted(found)


def is_group(path: str | Path) -> bool:
    """Whether ``path`` holds ``seed_<s>/`` run directories and no checkpoints of its own."""
    p = Path(path)
    return not (p / CHECKPOINTS).is_dir() and bool(_seed_dirs(p))


def expand(path: str | Path) -> list[Member]:
    """The run directories behind one RUN_DIR argument, by ascending seed for a group."""
    p = Path(path)
    if not is_group(p):
        return [Member(p, p.absolute().name, None, None)]
    group = p.absolute().name
    return [Member(d, group, s, f"{group}/seed_{s}") for s, d in _seed_dirs(p)]
