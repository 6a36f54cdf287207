"""Side by side with the official APOLLO optimizer (pip ``apollo-torch`` 1.0.3, extra ``reference``).

``apollo_torch.APOLLOAdamW`` (``apollo_torch/apollo.py``: Adam on the randomly projected
gradient, the raw gradient scaled per channel or per tensor by ``||N|| / ||R||``,
``sqrt(scale)`` before or after the 1.01 norm-growth limiter) runs on CPU torch in
float32 against ``lj.apollo_adamw`` (channel, rank 4, scale 1) and ``lj.apollo_mini``
(tensor, rank 1, ``sqrt(128)`` in front) on the same gradients: 21 steps, projection
redrawn at steps 1, 6, 11, 16, 21, tall/square/wide projected matrices, a 1-D and a 2-D
plain leaf, gradients growing so that the limiter acts. The random projections cannot
be matched across RNGs: the official projector (``random_projector.py``
``get_orthogonal_matrix``) is handed the matrix our optimizer drew at that refresh
(Gaussian ``N(0, 1/r)``, read from our state), so everything else is compared exactly.
"""

from __future__ import annotations

import numpy as np
import parity_support as ps
import pytest
from torch_reference_support import (
    import_official,
    max_relative_update_error,
    patched,
    torch_trajectory,
)

import lowrank_jax as lj

pytestmark = pytest.mark.slow
LR, WD, T, STEPS = 0.01, 0.1, 5, 21


def problem(seed):
    rng = np.random.default_rng(seed)
    w0 = {p: 0.1 * rng.standard_normal(s) for p, s in ps.SHAPES.items()}
    grads = [{p: rng.standard_normal(s) * (1 + 0.3 * t) for p, s in ps.SHAPES.items()}
             for t in range(STEPS)]
    return w0, grads


@pytest.mark.parametrize("name", ["apollo_adamw", "apollo_mini"])
def test_apollo_matches_the_official_optimizer(name):
    apollo = import_official("apollo_torch.apollo")
    projector_cls = import_official("apollo_torch.random_projector").GradientProjector
    torch = import_official("torch")
    w0, grads = problem(31 if name == "apollo_adamw" else 32)
    if name == "apollo_adamw":
        tx = lj.apollo_adamw(LR, rank=4, update_proj_gap=T, weight_decay=WD, layout="torch")
        group = {"rank": 4, "scale_type": "channel", "scale": 1.0}
        scale_front = False
    else:
        tx = lj.apollo_mini(LR, update_proj_gap=T, weight_decay=WD, layout="torch")
        group = {"rank": 1, "scale_type": "tensor", "scale": 128.0}
        scale_front = True
    _, upds, projs = ps.run_jax(tx, w0, grads, "torch")
    by_shape = {shape: path for path, shape in ps.PROJECTED.items()}
    step = [0]

    def ours(self, weights, rank, type, seed):
        basis = projs[step[0]][by_shape[tuple(weights.shape)]]      # (d, r)
        mat = basis.T if type == "right" else basis
        return torch.tensor(np.ascontiguousarray(mat), dtype=weights.dtype)

    def make(params):
        return apollo.AdamW(
            [{"params": [params[p] for p in ps.PLAIN]},
             {"params": [params[p] for p in ps.PROJECTED], "proj": "random",
              "update_proj_gap": T, "proj_type": "std", **group}],
            lr=LR, weight_decay=WD, scale_front=scale_front)

    with patched(projector_cls, "get_orthogonal_matrix", ours):
        ref_params = torch_trajectory(make, w0, grads, lambda t: step.__setitem__(0, t))
    ps.report_error(f"{name} vs official apollo_torch", max_relative_update_error(upds, ref_params, w0))
