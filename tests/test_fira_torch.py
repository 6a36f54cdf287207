"""Side by side with the official Fira optimizer (pip ``fira`` 1.0.2, extra ``reference``).

``fira.FiraAdamW`` (``fira/fira_adamw.py``: GaLore's Adam on ``R`` plus the residual
``G - alpha Back(R)`` scaled per row/column by ``||N|| / ||R||`` and the 1.01 norm-growth
limiter) and its projector (``fira/gradient_projection.py``) run on CPU torch in float32
against ``lj.fira_adamw`` on the same gradients: 21 steps, refreshes at 1, 6, 11, 16,
21, tall/square/wide projected matrices, a 1-D and a 2-D plain leaf. The only
intervention: the official projector's singular vectors take our signs at each refresh
(checked to be the same vectors first).
"""

from __future__ import annotations

import parity_support as ps
import pytest
from torch_reference_support import (
    import_official,
    max_relative_update_error,
    svd_optimizer_trajectory,
)

import lowrank_jax as lj

pytestmark = pytest.mark.slow
LR, WD, T, RANK, STEPS, ALPHA = 0.02, 0.1, 5, 4, 21, 0.25


def test_fira_adamw_matches_the_official_optimizer():
    fira = import_official("fira")
    projector_cls = import_official("fira.gradient_projection").GradientProjector
    w0, grads = ps.make_svd_problem(seed=21, steps=STEPS, rank=RANK, gap=T)
    w0 = {p: 0.1 * w for p, w in w0.items()}
    tx = lj.fira_adamw(LR, rank=RANK, update_proj_gap=T, scale=ALPHA, weight_decay=WD,
                       layout="torch")
    _, upds, projs = ps.run_jax(tx, w0, grads, "torch")
    ref_params = svd_optimizer_trajectory(
        fira.FiraAdamW, projector_cls, w0, grads, projs,
        {"rank": RANK, "update_proj_gap": T, "alpha": ALPHA, "proj_type": "std"},
        lr=LR, weight_decay=WD)
    ps.report_error("fira_adamw vs official fira", max_relative_update_error(upds, ref_params, w0))
