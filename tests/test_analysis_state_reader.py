"""The analysis reads optimizer state through the one public reader (``projector_bases``), never
by decoding state paths or low-rank states itself."""

from __future__ import annotations

import ast
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import lowrank_jax as lj
from analysis.units import consecutive

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
READERS = {"projector_bases", "projector_overlaps", "refreshed_leaves"}


def test_no_module_of_the_analysis_decodes_optimizer_state():
    users = {}
    for path in ANALYSIS.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {"find_lowrank_states",
                                                                 "projector", "overlap"}:
                raise AssertionError(f"{path.name} decodes optimizer state ({node.attr})")
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names} & READERS
                if names:
                    users.setdefault(node.module, set()).update(names)
    # one place: the library's reader
    assert set(users) <= {"lowrank_jax"}, users
    assert users, "the analysis does not read projector bases at all"


def test_bases_come_from_the_reader():
    params = {"layers": {"0": {"attn": {"q_proj": {"kernel": jnp.ones((8, 6))}}}}}
    tx = lj.galore_adamw(1e-2, rank=2, update_proj_gap=1)
    state = tx.init(params)
    grads = {"layers": {"0": {"attn": {"q_proj": {"kernel": jnp.arange(48.0).reshape(8, 6)}}}}}
    _, state = tx.update(grads, state, params)
    bases = consecutive._bases(state)
    reader = consecutive.projector_bases(state)
    assert set(bases) == set(reader) == {"layers/0/attn/q_proj/kernel"}
    np.testing.assert_array_equal(bases["layers/0/attn/q_proj/kernel"],
                                  np.asarray(reader["layers/0/attn/q_proj/kernel"][0]))
    assert bases["layers/0/attn/q_proj/kernel"].shape == (6, 2)
