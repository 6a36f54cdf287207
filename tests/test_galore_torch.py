"""Side by side with the official GaLore optimizers (pip ``galore-torch`` 1.0, extra ``reference``).

``galore_torch.GaLoreAdamW`` (``galore_torch/adamw.py``), ``GaLoreAdafactor``
(``adafactor.py``, configured as the GaLore training script does: no relative step, no
parameter scaling, no first moment) and their projector (``galore_projector.py``) run
on CPU torch in float32 against ``lj.galore_adamw`` / ``lj.galore_adafactor`` on the same
gradients: 21 steps, projector refreshed at steps 1, 6, 11, 16, 21 (moments kept), a
tall ``(24, 10)``, square ``(10, 10)`` and wide ``(10, 24)`` projected matrix, a 1-D and
a 2-D leaf outside the projection. The only intervention: at each refresh the official
projector's singular vectors take the signs of ours (``get_orthogonal_matrix`` wrapped;
the SVD leaves each sign free, and with kept moments the sign matters from the second
period on); the wrapper first checks that they are the same vectors.
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
LR, WD, T, RANK, STEPS, SCALE = 0.02, 0.1, 5, 4, 21, 0.25
TOL = 1e-5


def problem(seed: int):
    params, grads = ps.make_svd_problem(seed=seed, steps=STEPS, rank=RANK, gap=T)
    return {p: 0.1 * w for p, w in params.items()}, grads


def compare(name, tx, optimizer_cls, seed, **kwargs):
    w0, grads = problem(seed)
    _, upds, projs = ps.run_jax(tx, w0, grads, "torch")
    ref_params = svd_optimizer_trajectory(
        optimizer_cls, import_official("galore_torch.galore_projector").GaLoreProjector,
        w0, grads, projs, {"rank": RANK, "update_proj_gap": T, "scale": SCALE,
                           "proj_type": "std"}, lr=LR, **kwargs)
    errors = max_relative_update_error(upds, ref_params, w0)
    ps.report_error(f"{name} vs official {optimizer_cls.__module__}", errors, TOL)


def test_galore_adamw_matches_the_official_optimizer():
    galore_torch = import_official("galore_torch")
    tx = lj.galore_adamw(LR, rank=RANK, update_proj_gap=T, scale=SCALE, weight_decay=WD,
                         layout="torch")
    compare("galore_adamw", tx, galore_torch.GaLoreAdamW, 11, weight_decay=WD, no_deprecation_warning=True)


def test_galore_adafactor_matches_the_official_optimizer():
    galore_torch = import_official("galore_torch")
    tx = lj.galore_adafactor(LR, rank=RANK, update_proj_gap=T, scale=SCALE, weight_decay=WD,
                             layout="torch")
    compare("galore_adafactor", tx, galore_torch.GaLoreAdafactor, 12, weight_decay=WD, relative_step=False,
            scale_parameter=False, warmup_init=False)
