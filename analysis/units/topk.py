"""The "top-k PCA" landscapes of one checkpoint: the loss along the k-th rank-1 SVD term.

Direction ``k`` moves every 2-D variable ``W`` along ``sigma_k u_k v_k^T`` (``k`` clamped to
the last component of a smaller matrix, zero on 1-D variables;
:func:`lowrank_jax.metrics.rank1_svd_directions`), for ``k = 1..K``, on the grid of
``Settings.pca_grid``. Per component: the expected sharpness of its curve. Over
components ``1..K'`` for ``K'`` in ``{1, 5, 10, 20}`` (and ``K``): the expected
sharpness of the mean curve and the mean over the grid of the across-component
variance (:func:`lowrank_jax.metrics.aggregate_topk`, as the reference's
``4b_pca_aggregate_subsets.py``). With one direction per component, a single
component has no direction variance: variance is reported for the subsets only
(it is 0 for ``K' = 1`` by construction).

Cost: one SVD per matrix serves every ``k``; the directions are evaluated
``CHUNK`` at a time by one compiled program per architecture
(:func:`lowrank_jax.metrics.landscape_1d`; the last chunk is padded with its last
component, so every call has the same shapes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.units.base import CheckpointUnit, Metric, Study, Unit, UnitContext, row
from analysis.variables import probe_variables
from lowrank_jax import metrics as M

__all__ = ["CHUNK", "TopK", "subsets"]

#: components evaluated by one call of the compiled landscape program
CHUNK = 5

_PLOTS = ("topk_profiles", "topk_over_steps")


def subsets(topk: int) -> list[int]:
    """The aggregated ``K'``: the reference's ``{1, 5, 10, 20}`` up to ``topk``, and ``topk``.

    >>> subsets(20), subsets(7)
    ([1, 5, 10, 20], [1, 5, 7])
    """
    return sorted({k for k in M.TOPK_SUBSETS if k <= topk} | {int(topk)})


def _chunks(ks: list[int], size: int) -> list[list[int]]:
    """``ks`` in groups of ``size``, the last padded with its last element."""
    out = [ks[i:i + size] for i in range(0, len(ks), size)]
    out[-1] = out[-1] + [out[-1][-1]] * (size - len(out[-1]))
    return out


@dataclass(frozen=True)
class TopK(CheckpointUnit):
    """Loss along the top-k rank-1 SVD directions of one checkpoint, k = 1..``Settings.topk``."""

    kind = "topk"
    settings_used = ("topk", "pca_grid", "sequences", "perturb")
    metrics = (
        Metric("pca_sharpness", "top-1 PCA sharpness", "top1", unit="nats", summary=True,
               plots=_PLOTS, findings=("random_vs_pca_sharpness",)),
        Metric("pca_variance", "top-K PCA direction variance", "top20", unit="nats^2",
               plots=_PLOTS),
        Metric("pca_component_sharpness", "sharpness along component k", "k1", unit="nats",
               plots=("topk_components",)),
    )

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        s = study.settings
        if s.topk < 1:
            return
        for p in study.plans:
            steps = p.steps[-1:] if s.topk_steps == "final" else p.steps
            for step in steps:
                yield cls(p.run, step)

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        s, run, step = ctx.settings, self.run, self.step
        ckpt = ctx.load(run, step)
        probe = probe_variables(ckpt, s.perturb == "all")
        inputs = probe.inputs(ctx.batch(run))
        ks = list(range(1, s.topk + 1))
        factors = M.svd_factors(probe.tree)
        size = min(CHUNK, len(ks))
        parts = []
        for chunk in _chunks(ks, size):
            dirs = M.rank1_svd_directions(probe.tree, chunk, factors=factors)
            parts.append(np.asarray(M.landscape_1d(probe.loss_fn, probe.tree, dirs,
                                                   s.pca_alphas, inputs,
                                                   chunk_size=s.chunk_size,
                                                   alpha_chunk_size=s.alpha_chunk_size)))
        curves = np.concatenate(parts)[:len(ks)].astype(np.float64)
        centre = s.pca_centre
        rows = [row(run, step, "pca_component_sharpness", f"k{k}",
                    float(M.expected_sharpness(curves[i], centre))) for i, k in enumerate(ks)]
        agg = M.aggregate_topk(curves, ks, subsets(s.topk), center_index=centre)
        for top, a in agg.items():
            rows.append(row(run, step, "pca_sharpness", f"top{top}", a["expected_sharpness"]))
            rows.append(row(run, step, "pca_variance", f"top{top}", a["direction_variance"]))
        curve = {"alphas": s.pca_alphas.tolist(), "centre": centre, "ks": ks,
                 "centered": (curves - curves[:, centre:centre + 1]).tolist()}
        return {"rows": rows, "curves": {"topk": curve}}
