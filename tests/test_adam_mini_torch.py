"""Side by side with the official Adam-mini (pip ``adam-mini`` 1.1.1, extra ``reference``).

``adam_mini.Adam_mini`` (``adam_mini/adam_mini.py``: one second moment per head for
query/key, per output neuron for value / attention output / MLP / "linear", per token
for embeddings and the output layer, plain Adam for biases, one per tensor otherwise;
no weight decay for names with "norm", "ln" or "bias") runs on CPU torch in float32
against ``lj.adam_mini`` on the same gradients, 22 steps, with the parameter names of a
LLaMA-style and a GPT-2-style model (our ``a/b/kernel`` is the official ``a.b.weight``;
our kernels are stored ``(in, out)`` and handed over transposed).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from parity_support import report_error
from test_adam_mini import (
    DIM,
    EPS,
    GPT2_SHAPES,
    HEADS,
    LR,
    STEPS,
    TORCH_SHAPES,
    WD,
    _get,
    _to_ours,
    _tree,
)
from torch_reference_support import import_official, relative_update_errors, torch_trajectory

import lowrank_jax as lj

pytestmark = pytest.mark.slow


def torch_name(name: str) -> str:
    return name.replace("/kernel", "/weight").replace("/", ".")


@pytest.mark.parametrize("names", ["llama", "gpt2"])
def test_adam_mini_matches_the_official_optimizer(names):
    adam_mini = import_official("adam_mini")
    shapes = TORCH_SHAPES if names == "llama" else GPT2_SHAPES
    rng = np.random.default_rng(2)
    w0 = {n: rng.standard_normal(s) * 0.1 for n, (s, _, _) in shapes.items()}
    grads = [{n: rng.standard_normal(s) * (1 + 0.3 * t) for n, (s, _, _) in shapes.items()}
             for t in range(STEPS)]
    tx = lj.adam_mini(LR, weight_decay=WD, eps=EPS, num_heads=HEADS)
    params = _tree({n: _to_ours(n, x) for n, x in w0.items()})
    state = tx.init(params)
    step = jax.jit(tx.update)
    upds = []
    for g in grads:
        u, state = step(_tree({n: _to_ours(n, x) for n, x in g.items()}), state, params)
        params = optax.apply_updates(params, u)
        upds.append({n: _to_ours(n, _get(u, n)) for n in shapes})     # back to torch layout

    def make(torch_params):
        return adam_mini.Adam_mini([(torch_name(n), p) for n, p in torch_params.items()],
                                   lr=LR, betas=(0.9, 0.999), eps=EPS, weight_decay=WD,
                                   dim=DIM, n_heads=HEADS, verbose=False)

    ref_params = torch_trajectory(make, w0, grads)
    errors = {n: float(relative_update_errors([u[n] for u in upds], [w[n] for w in ref_params],
                                              w0[n]).max()) for n in shapes}
    report_error(f"adam_mini ({names} names) vs official adam_mini", errors)
