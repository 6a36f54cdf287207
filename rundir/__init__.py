"""The run directory: its layout (:mod:`rundir.layout`) and seed groups (:mod:`rundir.groups`).

Written by ``lowrank-train`` (``train``) and read by ``lowrank-analyze``
(``analysis``) and the demo; it imports neither.
"""

from rundir.groups import Member, expand, is_group
from rundir.layout import read_metrics, seed_dir

__all__ = ["Member", "expand", "is_group", "read_metrics", "seed_dir"]
