"""Side by side with the official Flora optimizer (pip ``flora-opt`` 0.0.3, extra ``reference``).

``flora_opt.optimizers.torch.flora.Flora`` (Adafactor with the first moment of each
factorised matrix compressed by a random projection, output ``(1 - b1) u + b1 up(C)``,
resampled after the output at steps kappa, 2 kappa, ...; clipping after the momentum;
``scale_parameter``) runs on CPU torch in float32 against ``lj.flora`` on the same
gradients: 22 steps with kappa 7 (three resamples), a tall ``(24, 12)``, square
``(10, 10)`` and wide ``(8, 20)`` factorised matrix, a 1-D leaf and a 2-D leaf outside the
compressed set (aspect ratio 5). The random projections cannot be matched across RNGs:
the official ``stable_randn`` is handed, for each new seed, the matrix our optimizer
holds after that step (read with ``lj.projector_bases``, times ``sqrt(rank)``, as the
official code divides by it), so everything else is compared exactly.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
import parity_support as ps
import pytest
from torch_reference_support import (
    import_official,
    max_relative_update_error,
    patched,
    torch_trajectory,
)

import lowrank_jax as lj
from lowrank_jax.tree_util import path_string

pytestmark = pytest.mark.slow
FACTORED = {("attn", "q"): (24, 12), ("attn", "k"): (10, 10), ("mlp", "up"): (8, 20)}
SHAPES = {**FACTORED, ("norm",): (12,), ("embed",): (25, 5)}
# lr 0.1: steps of ~1e-2 of |W|, so that the float32 storage of the official W (whose
# differences are compared) stays two decades below the 1e-5 checked
KAPPA, STEPS, LR, RANK, WD, B1 = 7, 22, 0.1, 4, 0.1, 0.9


def run_ours(w0, grads):
    """Our flora (torch layout); per step the updates and ``{path: basis (d, r)}``."""
    tx = lj.flora(LR, rank=RANK, update_proj_gap=KAPPA, b1=B1, weight_decay=WD,
                  layout="torch", seed=4)
    params = ps.nest({p: np.asarray(w, np.float32) for p, w in w0.items()})
    state = tx.init(params)
    step = jax.jit(tx.update)
    names = {path_string(tuple(jax.tree_util.DictKey(k) for k in p)): p for p in FACTORED}
    upds, bases = [], []
    for g in grads:
        u, state = step(ps.nest({p: np.asarray(x, np.float32) for p, x in g.items()}),
                        state, params)
        params = optax.apply_updates(params, u)
        upds.append({p: np.asarray(ps.get(u, p), np.float64) for p in SHAPES})
        found = lj.projector_bases(state)
        bases.append({names[n]: np.asarray(b[0], np.float64) for n, b in found.items()})
    return upds, bases


def test_flora_matches_the_official_optimizer():
    flora_mod = import_official("flora_opt.optimizers.torch.flora")
    torch = import_official("torch")
    rng = np.random.default_rng(6)
    w0 = {p: 0.1 * rng.standard_normal(s) for p, s in SHAPES.items()}
    grads = [{p: rng.standard_normal(s) * (1 + 0.1 * t) for p, s in SHAPES.items()}
             for t in range(STEPS)]
    upds, bases = run_ours(w0, grads)
    assert set(bases[0]) == set(FACTORED)
    # the official projection shapes: (rank, m) on the left when m < n, else (n, rank)
    side_of = {}
    for path, (m, n) in FACTORED.items():
        side_of[(RANK, m) if m < n else (n, RANK)] = path
    assert len(side_of) == len(FACTORED)
    step, given = [0], {}

    def ours(shape, seed, device=None, dtype=None):
        shape = tuple(shape)
        if (shape, seed) not in given:     # a new seed: our matrix after this step
            basis = bases[step[0]][side_of[shape]] * math.sqrt(RANK)     # (d, r)
            mat = basis.T if shape[0] == RANK and shape[1] != RANK else basis
            given[(shape, seed)] = torch.tensor(np.ascontiguousarray(mat), dtype=dtype)
        return given[(shape, seed)].clone()

    def make(params):
        return flora_mod.Flora([params[p] for p in SHAPES], lr=LR, rank=RANK, kappa=KAPPA,
                               beta1=B1, weight_decay=WD)

    with patched(flora_mod, "stable_randn", ours):
        ref_params = torch_trajectory(make, w0, grads, lambda t: step.__setitem__(0, t))
    # one matrix per factorised leaf for the start and for each of the three resamples
    assert len(given) == len(FACTORED) * (1 + STEPS // KAPPA), len(given)
    ps.report_error("flora vs official flora_opt", max_relative_update_error(upds, ref_params, w0))
