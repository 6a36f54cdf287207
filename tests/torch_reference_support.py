"""Shared helpers of the side-by-side tests against the official torch optimizers.

The official implementations come from PyPI through the optional extra ``reference``
(``pip install -e '.[reference]'``: CPU torch 2.13, galore-torch, fira, apollo-torch,
flora-opt, adam-mini, q-galore-torch). The tests are marked ``slow`` and never skip: a
missing package fails the test with the install command (CI installs the extra).

Both sides are fed the same gradients (independent of the parameters) from the same
float32 start; the official optimizer runs in float32 as it ships. Compared per leaf:
the update of every step, ``max_t ||u_t - u_t^ref||_F / ||u_t^ref||_F`` (``u^ref`` is
``W_t - W_{t-1}`` of the torch parameters, float64 of float32 values), see
:func:`max_relative_update_error`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import parity_support as ps
import pytest

INSTALL_HINT = ("the side-by-side tests need the official implementations: "
                "pip install -e '.[reference]'")


def import_official(module: str) -> Any:
    """Import ``module`` of an official package; a missing one fails the test (no skip)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"cannot import {module!r} ({err}); {INSTALL_HINT}", pytrace=False)


def torch_trajectory(make_optimizer: Callable[[dict], Any], w0: dict, grads: list[dict],
                     before_step: Callable[[int], None] | None = None) -> list[dict]:
    """Run an official torch optimizer over fixed gradients.

    Args:
      make_optimizer: ``{path: torch.nn.Parameter} -> torch.optim.Optimizer``.
      w0: ``{path: (torch-layout) array}``, the start (cast to float32).
      grads: one ``{path: array}`` per step, set as ``.grad`` before each ``step()``.
      before_step: called with the 0-based step index before each ``step()``.

    Returns:
      The parameters after each step, ``{path: float64 array}`` per step.
    """
    torch = import_official("torch")
    params = {p: torch.nn.Parameter(torch.tensor(np.asarray(x, np.float32))) for p, x in w0.items()}
    opt = make_optimizer(params)
    out = []
    for t, g in enumerate(grads):
        for p, x in params.items():
            x.grad = torch.tensor(np.asarray(g[p], np.float32))
        if before_step is not None:
            before_step(t)
        opt.step()
        out.append({p: x.detach().numpy().astype(np.float64) for p, x in params.items()})
    return out


def relative_update_errors(ours: list[np.ndarray], ref_params: list[np.ndarray],
                           w0: np.ndarray) -> np.ndarray:
    """Per step ``||u_t - (W_t - W_{t-1})||_F / ||W_t - W_{t-1}||_F`` (one leaf)."""
    prev = np.asarray(w0, np.float64)
    errs = []
    for u, w in zip(ours, ref_params):
        step = w - prev
        errs.append(np.linalg.norm(np.asarray(u, np.float64) - step) / np.linalg.norm(step))
        prev = w
    return np.asarray(errs)


def max_relative_update_error(our_updates: list[dict], ref_params: list[dict],
                              w0: dict) -> dict:
    """``{path: max over steps of the relative update error}`` for every leaf of ``w0``."""
    return {p: float(relative_update_errors([u[p] for u in our_updates],
                                            [w[p] for w in ref_params], w0[p]).max())
            for p in w0}


def align_rows_or_columns(out, target: np.ndarray, rows: bool):
    """Flip the signs of ``out``'s singular vectors (its rows if ``rows``, else columns) to
    agree with ``target`` (``(d, r)``, our basis), after checking they span the same
    directions (``|cos| > 1 - 1e-3`` each): the SVD leaves each sign free."""
    torch = import_official("torch")
    cols = out.T if rows else out
    tgt = torch.as_tensor(np.asarray(target), dtype=cols.dtype)
    dots = (cols * tgt).sum(0)
    cos = dots.abs() / (cols.norm(dim=0) * tgt.norm(dim=0))
    assert bool((cos > 1 - 1e-3).all()), f"official and our singular vectors differ: {cos}"
    signs = torch.where(dots < 0, -1.0, 1.0).to(cols.dtype)
    cols = cols * signs
    return cols.T if rows else cols


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``obj.name`` (an official class's method, ``torch.cuda.synchronize``)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def svd_optimizer_trajectory(optimizer_cls, projector_cls, w0: dict, grads: list[dict],
                             projs: list[dict], lowrank_group: dict, **kwargs) -> list[dict]:
    """An official SVD-projector optimizer (GaLore, Fira) over ``grads``.

    ``ps.PROJECTED`` leaves form a group with ``lowrank_group`` (rank, gap, scale, ...),
    ``ps.PLAIN`` leaves a plain one. The official projector's singular vectors take the
    signs of ours (``projs[t][path]``, ``(d, r)``, as :func:`parity_support.run_jax`
    returns them): ``projector_cls.get_orthogonal_matrix`` is wrapped for the run."""
    by_shape = {shape: path for path, shape in ps.PROJECTED.items()}
    step = [0]
    original = projector_cls.get_orthogonal_matrix

    def signed(self, weights, rank, type):
        out = original(self, weights, rank, type)
        target = projs[step[0]][by_shape[tuple(weights.shape)]]
        return align_rows_or_columns(out, target, rows=(type == "right"))

    def make(params):
        return optimizer_cls([{"params": [params[p] for p in ps.PLAIN]},
                              {"params": [params[p] for p in ps.PROJECTED], **lowrank_group}],
                             **kwargs)

    with patched(projector_cls, "get_orthogonal_matrix", signed):
        return torch_trajectory(make, w0, grads, before_step=lambda t: step.__setitem__(0, t))
