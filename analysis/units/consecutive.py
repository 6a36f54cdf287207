"""Units along one run's checkpoints: changes between consecutive ones, the trajectory."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from analysis import runs as R
from analysis.settings import Settings
from analysis.units.base import Metric, Study, Unit, UnitContext, row
from analysis.units.checkpoint import spectra_metrics, spectra_rows, spectral_params
from analysis.variables import probe_variables
from lowrank_jax import metrics as M
from lowrank_jax import projector_bases

__all__ = ["Previous", "Trajectory", "ccbh_path"]

_weight_delta = jax.jit(M.weight_delta)


def _bases(opt_state: Any) -> dict[str, np.ndarray]:
    """``{param path: basis (d, r)}`` of each projector (its first reduced side)."""
    if opt_state is None:
        return {}
    return {name: np.asarray(sides[0]) for name, sides in projector_bases(opt_state).items()}


def _overlap_rows(run: R.RunInfo, step: int, metric: str, a: dict[str, np.ndarray],
                  b: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows, vals = [], []
    for name in sorted(set(a) & set(b)):
        if a[name].shape != b[name].shape or not np.any(a[name]) or not np.any(b[name]):
            continue
        v = float(M.subspace_overlap(a[name], b[name]))
        vals.append(v)
        rows.append(row(run, step, metric, name, v))
    if vals:
        rows.append(row(run, step, metric, "mean", float(np.mean(vals))))
    return rows


def ccbh_path(prev: R.Checkpoint, ckpt: R.Checkpoint, batch: dict[str, Any], points: int
              ) -> np.ndarray:
    """Losses on the straight path ``prev -> ckpt`` of every float model variable.

    The trainable parameters and the frozen ones (ReLoRA's base kernel, which a merge
    changes) are interpolated together, as the reference interpolates every
    ``named_parameters()`` tensor (7_1d_interpolation.py ``_interpolate_and_eval``), so
    the path starts at ``prev`` and ends at ``ckpt`` also across a ReLoRA merge.
    Variables that are not floats (SLTrain's support, RNG streams) are ``ckpt``'s.

    Returns:
      ``(points,)`` float losses, ``a = 0`` (``prev``) to ``a = 1`` (``ckpt``).
    """
    a, b = probe_variables(prev, True), probe_variables(ckpt, True)
    return np.asarray(M.interpolate_losses(b.loss_fn, a.tree, b.tree, b.inputs(batch), points))


def _first_step(run: R.RunInfo, s: Settings) -> int:
    return run.steps[0] if s.steps is None else min(t for t in run.steps if t in s.steps)


_OVERLAP = ("subspace_overlap",)


@dataclass(frozen=True)
class Previous(Unit):
    """dW spectra, CCBH and projector overlaps between checkpoint ``prev`` (and the first
    analysed one, the anchor) and ``step``."""

    prev: int

    kind = "previous"
    version = 2
    settings_used = ("sequences", "interp_points", "threshold", "spectra_of")
    metrics = (
        *spectra_metrics("dw_", "dW", summary=("effective_rank",),
                         seed_test=("effective_rank",), geometry=("effective_rank",)),
        Metric("ccbh", "CCBH", unit="nats", summary=True,
               plots=("barrier_matrices", "interpolation_paths")),
        Metric("proj_overlap_prev", "checkpoint overlap", "mean", unit="ratio", summary=True,
               plots=_OVERLAP),
        Metric("proj_overlap_anchor", "overlap with the first checkpoint", "mean",
               unit="ratio", plots=_OVERLAP),
    )

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        for p in study.plans:
            for prev, step in zip(p.steps, p.steps[1:]):
                yield cls(p.run, step, prev)

    def key_parts(self, settings: Settings) -> dict[str, Any]:
        fp, first = R.checkpoint_fingerprint, _first_step(self.run, settings)
        return {"prev": self.prev, "fp_prev": fp(self.run, self.prev), "first": first,
                "fp_first": fp(self.run, first)}

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        s, run, step = ctx.settings, self.run, self.step
        prev, ckpt = ctx.load(run, self.prev), ctx.load(run, step)
        first = ctx.load(run, _first_step(run, s))
        delta = _weight_delta(spectral_params(prev, s.spectra_of),
                              spectral_params(ckpt, s.spectra_of))
        rows = spectra_rows(run, step, "dw_", M.matrix_spectra(delta, threshold=s.threshold))
        path = ccbh_path(prev, ckpt, ctx.batch(run), s.interp_points)
        rows.append(row(run, step, "ccbh", "all", float(M.barrier_height(path))))
        bases = _bases(ckpt.opt_state)
        if bases:
            rows += _overlap_rows(run, step, "proj_overlap_prev", _bases(prev.opt_state), bases)
            rows += _overlap_rows(run, step, "proj_overlap_anchor", _bases(first.opt_state),
                                  bases)
        return {"rows": rows, "curves": {"ccbh": path.tolist()}}


@dataclass(frozen=True)
class Trajectory(Unit):
    """Explained-variance ratios of the trajectory PCA over the run's checkpoints (at the last)."""

    steps: tuple[int, ...]

    kind = "trajectory"
    settings_used = ("trajectory_components",)
    metrics = (Metric("trajectory_pca_ratio", "trajectory PCA explained variance", "pc1",
                      unit="ratio"),)

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        for p in study.plans:
            if len(p.steps) >= 3:
                yield cls(p.run, p.steps[-1], tuple(p.steps))

    def key_parts(self, settings: Settings) -> dict[str, Any]:
        return {"steps": list(self.steps),
                "fps": [R.checkpoint_fingerprint(self.run, t) for t in self.steps]}

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        ckpts = [ctx.load(self.run, t) for t in self.steps]
        n = min(ctx.settings.trajectory_components, len(ckpts) - 1)
        _, ratio = M.trajectory_pca_directions([c.params for c in ckpts], n=n)
        rows = [row(self.run, self.step, "trajectory_pca_ratio", f"pc{i + 1}", float(r))
                for i, r in enumerate(ratio)]
        return {"rows": rows, "curves": {}}
