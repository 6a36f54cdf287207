"""GaLore-Adafactor parity: ``lj.galore_adafactor`` against a float64 NumPy re-statement.

Written from jiaweizzhao/GaLore (pip ``galore-torch`` 1.0), ``galore_torch/adafactor.py``
as the GaLore training script configures it (``relative_step=False``,
``scale_parameter=False``, no first moment; torch layout ``(m, n)``):

* L186-193: the projector (``galore_projector.py``: ``std`` side, a new SVD basis when
  the 0-based ``step % update_proj_gap == 0``) turns ``G`` into ``R``; everything below
  runs on ``R`` (its moments kept across refreshes);
* L225-230: ``step += 1``, ``beta2t = 1 - step^-0.8``, ``sq = R^2 + 1e-30``;
* L232-245: for a matrix, row and column means of ``sq`` averaged with ``beta2t`` and
  ``u = R * rsqrt(row / mean(row)) rsqrt(col)`` (``_approx_sq_grad`` L153-158); for a
  vector, ``u = R * rsqrt(v)``;
* L247-248: ``u /= max(rms(u) / 1, 1)``, ``u *= lr`` (``_get_lr`` L132-140: ``lr``);
* L256-262: ``u = scale * Back(u)`` (``project_back``), ``W -= wd lr W`` (before the
  update), ``W -= u``.

21 steps, refreshes at 1, 6, 11, 16, 21; tall/square/wide projected matrices, a 1-D and
a 2-D plain leaf (the same Adafactor without projection), both layouts. Our SVD basis is
checked against the float64 SVD (each column within 1e-4, up to sign) and then used
(``tests/test_galore_torch.py`` runs the official optimizer side by side, with its own
SVD).
"""

from __future__ import annotations

import numpy as np
import parity_support as ps
import pytest
from parity_support import PROJECTED, SHAPES, ref

import lowrank_jax as lj

pytestmark = pytest.mark.slow
LR, WD, T, RANK, STEPS, SCALE = 0.02, 0.1, 5, 4, 21, 0.25


def adafactor_reference(w0, grads, bases, side):
    """float64 GaLore-Adafactor on one torch-layout leaf (``side`` None: no projection);
    ``bases[t]``: our ``(d, r)`` basis after step ``t``. The parameters after each step."""
    w = np.asarray(w0, np.float64).copy()
    row = col = v = q = None
    out = []
    for it, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        if side is not None and it % T == 0:
            basis, _ = ref.svd_basis(g, side)
            ref.align_columns(basis[:, :RANK], bases[it])       # the same vectors
            q = bases[it]
        r = ref.project(g, q, side) if side is not None else g
        t = it + 1
        beta2t = 1.0 - t ** -0.8
        sq = r * r + 1e-30
        if r.ndim == 2:
            if row is None:
                row, col = np.zeros(r.shape[0]), np.zeros(r.shape[1])
            row = beta2t * row + (1 - beta2t) * sq.mean(axis=-1)
            col = beta2t * col + (1 - beta2t) * sq.mean(axis=-2)
            u = r / np.sqrt(row / row.mean())[:, None] / np.sqrt(col)[None, :]
        else:
            v = (1 - beta2t) * sq if v is None else beta2t * v + (1 - beta2t) * sq
            u = r / np.sqrt(v)
        u = u / max(np.sqrt(np.mean(u * u)), 1.0) * LR
        if side is not None:
            u = SCALE * ref.project_back(u, q, side)
        w = w - WD * LR * w
        w = w - u
        out.append(w.copy())
    return out


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_galore_adafactor_parity(layout):
    params, grads = ps.make_svd_problem(seed=50, steps=STEPS, rank=RANK, gap=T)
    params = {p: 0.1 * w for p, w in params.items()}
    tx = lj.galore_adafactor(LR, rank=RANK, update_proj_gap=T, scale=SCALE, weight_decay=WD,
                             layout=layout)
    traj, upds, projs = ps.run_jax(tx, params, grads, layout)
    errors = {}
    for path, shape in SHAPES.items():
        side = ref.std_side(shape) if path in PROJECTED else None
        bases = [p[path] for p in projs] if side else None
        r = adafactor_reference(params[path], [g[path] for g in grads], bases, side)
        errors[path] = ps.assert_leaf(f"{path} {layout}", path, params, r, traj, upds, STEPS)
    ps.report_error("galore_adafactor", errors)
