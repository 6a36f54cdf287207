"""AdamW parity: ``lj.adamw`` against a float64 NumPy re-statement of ``torch.optim.AdamW``.

Re-stated from pytorch/pytorch v2.13 ``torch/optim/adam.py`` (``AdamW`` is ``Adam`` with
``decoupled_weight_decay=True``), ``_single_tensor_adam``: L419 ``W *= 1 - lr wd`` first;
L456 ``m = lerp(m, g, 1 - b1)``; L475 ``v = b2 v + (1 - b2) g^2``; L533-546
``W -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``. 21 steps on a tall, a
square and a wide matrix and a 1-D leaf, both layouts (``reference_numpy.
torch_adamw_reference``, the same rule written in torch's other algebraic form);
``tests/test_adamw_torch.py`` runs ``torch.optim.AdamW`` itself side by side.
"""

from __future__ import annotations

import math

import numpy as np
import parity_support as ps
import pytest

import lowrank_jax as lj

LR, WD, STEPS, B1, B2, EPS = 0.01, 0.1, 21, 0.9, 0.999, 1e-8
SHAPES = {("attn", "q"): (24, 10), ("attn", "k"): (10, 10), ("mlp", "up"): (10, 24),
          ("norm",): (10,)}


def torch_adamw(w0, grads):
    """float64 ``torch.optim.AdamW`` on one leaf; the parameters after each step."""
    w = np.asarray(w0, np.float64).copy()
    m, v, out = np.zeros_like(w), np.zeros_like(w), []
    for t, g in enumerate(grads, 1):
        w = w * (1 - LR * WD)
        m = m + (1 - B1) * (g - m)
        v = B2 * v + (1 - B2) * g * g
        w = w - LR / (1 - B1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - B2 ** t) + EPS)
        out.append(w.copy())
    return out


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_adamw_parity(layout):
    rng = np.random.default_rng(70)
    w0 = {p: 0.1 * rng.standard_normal(s) for p, s in SHAPES.items()}
    grads = [{p: rng.standard_normal(s) * (1 + 0.2 * t) for p, s in SHAPES.items()}
             for t in range(STEPS)]
    tx = lj.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    errors = {}
    upds = ps.updates_of_each_step(tx, w0, grads, layout)
    for path in SHAPES:
        ref = torch_adamw(w0[path], [np.asarray(g[path], np.float64) for g in grads])
        other = ps.ref.torch_adamw_reference(w0[path], [g[path] for g in grads], lr=LR,
                                             eps=EPS, weight_decay=WD)["params"]
        np.testing.assert_allclose(ref, other, rtol=1e-12, atol=1e-14)   # two forms agree
        errors[path] = ps.max_update_error([u[path] for u in upds], ref, w0[path])
    ps.report_error("adamw", errors)
