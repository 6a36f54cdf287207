"""The reference's rank table of W and dW, the update norms and the per-layer means.

Written from NamrataRShivagunde/low-rank-geometry
``loss-landscape/scripts/single_checkpoint_scripts/5_ranks.py`` (rank, rank ratio,
effective rank / min dim, ``s_2 / s_1``, the count ratio; statistics over the
singular values above 1e-12) and ``5_ranks_updates.py`` (``||dW||_F`` and
``||dW||_F / ||W_prev||_F`` per matrix, their mean and the totals over matrices), both
with per-layer means (``layer_000``, ...). The functions are
:func:`lowrank_jax.metrics.matrix_rank_metrics` and :func:`lowrank_jax.metrics.update_norms`;
these units add their rows (matrix path, ``mean``, ``layer_<i>``) to the metric table.
The matrices are :func:`analysis.units.checkpoint.spectral_params` (``--spectra-of``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jax

from analysis import runs as R
from analysis.settings import Settings
from analysis.units.base import CheckpointUnit, Metric, Study, Unit, UnitContext, row
from analysis.units.checkpoint import spectral_params
from lowrank_jax import metrics as M

__all__ = ["RANK_TABLE", "Ranks", "Updates", "rank_rows"]

#: the reference's statistics that the spectra of ``analysis.units.checkpoint`` lack
RANK_TABLE = (("rank", "rank"), ("rank_ratio", "rank ratio"),
              ("effective_rank_ratio", "effective rank / min dim"),
              ("singular_value_ratio", "s2 / s1"), ("count_above_ratio", "count ratio"))
_NEW = {name for name, _ in RANK_TABLE}


def rank_rows(run: R.RunInfo, step: int, prefix: str, table: dict[str, Any]
              ) -> list[dict[str, Any]]:
    """Rows of :func:`lowrank_jax.metrics.matrix_rank_metrics` output: the new statistics
    per matrix and their mean, and every statistic's mean per layer."""
    rows = []
    for name, values in table["per_matrix"].items():
        rows += [row(run, step, f"{prefix}{k}", name, v) for k, v in values.items() if k in _NEW]
    rows += [row(run, step, f"{prefix}{k}", "mean", v) for k, v in table["mean"].items()
             if k in _NEW]
    for layer, values in table["per_layer"].items():
        rows += [row(run, step, f"{prefix}{k}", layer, v) for k, v in values.items()]
    return rows


def _table_metrics(prefix: str, matrix: str, plots: tuple[str, ...]) -> tuple[Metric, ...]:
    return tuple(Metric(f"{prefix}{name}", f"{matrix} {label}", "mean", plots=plots)
                 for name, label in RANK_TABLE)


@dataclass(frozen=True)
class Ranks(CheckpointUnit):
    """Rank, rank ratio, effective rank / min dim, ``s2/s1`` and count ratio of W, and the
    per-layer means of every statistic."""

    kind = "ranks"
    settings_used = ("threshold", "spectra_of")
    metrics = _table_metrics("w_", "W", ("rank_table",))

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        s = ctx.settings
        params = spectral_params(ctx.load(self.run, self.step), s.spectra_of)
        table = M.matrix_rank_metrics(params, threshold=s.threshold)
        return {"rows": rank_rows(self.run, self.step, "w_", table), "curves": {}}


_UPDATE_PLOTS = ("rank_table",)
_weight_delta = jax.jit(M.weight_delta)


@dataclass(frozen=True)
class Updates(Unit):
    """``||dW||_F``, ``||dW||_F / ||W_prev||_F`` (per matrix, mean, per layer, total) and the
    rank table of ``dW`` between the previous analysed checkpoint and this one."""

    prev: int

    kind = "updates"
    settings_used = ("threshold", "spectra_of")
    metrics = (
        Metric("dw_total_ratio", "||dW|| / ||W_prev||", unit="ratio", summary=True,
               plots=_UPDATE_PLOTS),
        Metric("dw_total_norm", "||dW||_F (all matrices)", plots=_UPDATE_PLOTS),
        Metric("dw_norm", "||dW||_F (mean over matrices)", "mean", plots=_UPDATE_PLOTS),
        Metric("dw_ratio", "||dW|| / ||W_prev|| (mean over matrices)", "mean", unit="ratio",
               plots=_UPDATE_PLOTS),
        *_table_metrics("dw_", "dW", _UPDATE_PLOTS),
    )

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        for p in study.plans:
            for prev, step in zip(p.steps, p.steps[1:]):
                yield cls(p.run, step, prev)

    def key_parts(self, settings: Settings) -> dict[str, Any]:
        return {"prev": self.prev, "fp_prev": R.checkpoint_fingerprint(self.run, self.prev)}

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        s, run, step = ctx.settings, self.run, self.step
        prev = spectral_params(ctx.load(run, self.prev), s.spectra_of)
        curr = spectral_params(ctx.load(run, step), s.spectra_of)
        norms = M.update_norms(prev, curr)
        rows = [row(run, step, "dw_total_norm", "all", norms["total"]["total_update_fro_norm"]),
                row(run, step, "dw_total_ratio", "all",
                    norms["total"]["total_update_to_prev_ratio"])]
        names = {"update_fro_norm": "dw_norm", "update_to_prev_ratio": "dw_ratio"}
        for path, values in norms["per_matrix"].items():
            rows += [row(run, step, names[k], path, v) for k, v in values.items() if k in names]
        rows += [row(run, step, names[k], "mean", v) for k, v in norms["mean"].items()
                 if k in names]
        for layer, values in norms["per_layer"].items():
            rows += [row(run, step, names[k], layer, v) for k, v in values.items()
                     if k in names]
        table = M.matrix_rank_metrics(_weight_delta(prev, curr), threshold=s.threshold)
        rows += rank_rows(run, step, "dw_", table)
        return {"rows": rows, "curves": {}}
