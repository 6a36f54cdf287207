"""Side by side with the official Q-GaLore code (pip ``q-galore-torch``, extra ``reference``).

The official optimizer class cannot run on a CPU-only torch (its step calls
``torch.cuda.synchronize()`` and passes bitsandbytes arguments by position for an older
signature), so the official step is driven here from its parts, as
``q_galore_torch/q_galore_adamw8bit.py`` L65-110 does: the official projector object
``q_galore_torch.q_galore_projector.GaLoreProjector`` (SVD, INT4 quantisation, lazy
refresh, project / project_back) and bitsandbytes' 32-bit Adam kernel
``bitsandbytes.functional.optimizer_update_32bit`` (what the official optimizer uses for
states under 4096 elements) writing into a zero tensor of the projected shape, then
``W += update`` and ``W -= lr wd W`` (``W`` kept in float64 here). The only intervention is the sign of each singular
vector, which the projector's SVD leaves free: it is set to the implementation's.

Requires ``pip install -e '.[reference]'`` (torch 2.13 CPU, q-galore-torch, bitsandbytes).
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    import bitsandbytes.functional as bnbf
    import torch
    from q_galore_torch.q_galore_adamw8bit_simulate import AdamW8bit as SimulatedAdamW8bit
    from q_galore_torch.q_galore_projector import GaLoreProjector
except ImportError as err:  # pragma: no cover - the extra is part of CI
    raise ImportError("tests/test_qgalore_torch.py needs the 'reference' extra: "
                      "pip install -e '.[reference]'") from err

import jax.numpy as jnp
from methods_support import assert_updates_match
from parity_support import PROJECTED
from test_qgalore import LAZY, LR, RANK, SCALE, STEPS, WD, run_case

from lowrank_jax.qgalore import int8_weight_rounding

pytestmark = pytest.mark.slow
B1, B2, EPS = 0.9, 0.95, 1e-8


class SignedProjector(GaLoreProjector):
    """The official projector whose SVD column signs follow ``targets[step]``."""

    def __init__(self, targets, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.targets = targets
        self.step = 0

    def get_orthogonal_matrix(self, weights, rank, type):
        out = super().get_orthogonal_matrix(weights, rank, type)
        target = torch.as_tensor(self.targets[self.step], dtype=out.dtype)   # (d, r)
        cols = out.T if type == "right" else out
        signs = torch.where((cols * target).sum(0) < 0, -1.0, 1.0)
        return (cols * signs).T if type == "right" else cols * signs


def official_run(w0, grads, targets, bits, group):
    proj = SignedProjector(targets, RANK, update_proj_gap=2, scale=SCALE, proj_type="std",
                           quant=bits is not None, group_size=group, n_bit=bits or 8, **LAZY)
    w = np.asarray(w0, np.float64)       # kept in float64: float32 storage of W would blur
    #                                      the per-step updates the comparison looks at
    s1 = s2 = None
    params, gaps = [], []
    for it, g in enumerate(grads):
        proj.step = it
        low = proj.project(torch.tensor(g, dtype=torch.float32), it)
        if s1 is None:
            s1, s2 = torch.zeros_like(low), torch.zeros_like(low)
        update = torch.zeros_like(low)
        bnbf.optimizer_update_32bit("adam", low, update, s1, B1, EPS, it + 1, LR, s2, B2,
                                    weight_decay=0.0)
        w = w + proj.project_back(update).double().numpy()
        w = w - LR * WD * w
        params.append(w.copy())
        gaps.append(proj.update_proj_gap)
    return params, gaps, proj.svd_count


@pytest.mark.parametrize("case", ["int4_groups", "int4_rows"])
@pytest.mark.parametrize("path", list(PROJECTED))
def test_official_qgalore_step_matches(case, path):
    c = run_case("torch", case)
    targets = [c["basis"](path, t) for t in range(STEPS)]
    params, gaps, svds = official_run(c["params"][path], [g[path] for g in c["grads"]],
                                      targets, c["bits"], c["group"])
    worst = assert_updates_match(f"official {case} {path}", c["params"][path], params,
                                 [x[path] for x in c["traj"]], [x[path] for x in c["upds"]],
                                 STEPS)
    assert worst < 1e-5
    assert gaps == [int(c["states"][t][path].gap) for t in range(STEPS)]
    assert svds == int(c["states"][-1][path].svds)


def test_int8_weight_rounding_matches_official_simulation():
    """Deterministic rounding of ``W + u`` equals the official simulation's ``_quantize``
    of it (groups of the torch-layout weight); ``u`` is a non-zero update (a zero one
    leaves the weight alone)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 64)).astype(np.float32)                # torch (out, in)
    u = (1e-3 * rng.standard_normal(w.shape)).astype(np.float32)
    want = SimulatedAdamW8bit._quantize(None, torch.tensor(w + u), q_group_size=128).numpy()
    tx = int8_weight_rounding(group_size=128, stochastic=False, layout="torch")
    out, _ = tx.update({"k": jnp.asarray(u)}, tx.init({"k": jnp.asarray(w)}),
                       {"k": jnp.asarray(w)})
    np.testing.assert_allclose(w + np.asarray(out["k"]), want, atol=1e-6)
