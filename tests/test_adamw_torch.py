"""Side by side with ``torch.optim.AdamW`` (CPU torch 2.13 of the ``reference`` extra).

``lj.adamw`` and ``torch.optim.AdamW`` (float32) on the same gradients, 21 steps, a
tall, a square and a wide matrix and a 1-D leaf (torch layout on both sides).
"""

from __future__ import annotations

import numpy as np
import parity_support as ps
import pytest
from test_parity_adamw import B1, B2, EPS, LR, SHAPES, STEPS, WD
from torch_reference_support import import_official, max_relative_update_error, torch_trajectory

import lowrank_jax as lj

pytestmark = pytest.mark.slow


def test_adamw_matches_torch():
    torch = import_official("torch")
    rng = np.random.default_rng(71)
    w0 = {p: 0.1 * rng.standard_normal(s) for p, s in SHAPES.items()}
    grads = [{p: rng.standard_normal(s) * (1 + 0.2 * t) for p, s in SHAPES.items()}
             for t in range(STEPS)]
    upds = ps.updates_of_each_step(lj.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
                                   w0, grads, "torch")
    ref = torch_trajectory(lambda p: torch.optim.AdamW(list(p.values()), lr=LR, betas=(B1, B2),
                                                       eps=EPS, weight_decay=WD), w0, grads)
    ps.report_error("adamw vs torch.optim.AdamW", max_relative_update_error(upds, ref, w0))
