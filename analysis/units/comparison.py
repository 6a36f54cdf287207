"""Units comparing two runs: against the baseline (IMBH, activations) and run against run."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis import runs as R
from analysis.forward import layer_activations, layer_names
from analysis.settings import Settings
from analysis.units.base import Metric, Study, Unit, UnitContext, row
from lowrank_jax import metrics as M

__all__ = ["Baseline", "Pair", "imbh_skip_reason"]


def imbh_skip_reason(run: R.RunInfo, base: R.RunInfo) -> str | None:
    """Why IMBH between ``run`` and ``base`` cannot be computed (CoLA), or ``None``."""
    for r in (run, base):
        if r.linear == "cola":
            return (f"run {r.name!r} uses CoLA layers (a nonlinearity between the factors: "
                    "no dense-equivalent weights), so IMBH with it is not computed")
    return None


def _fill(abstract: Any, pure: dict[str, Any]) -> Any:
    """An ``nnx.State`` shaped like the dense model's params, holding ``pure``'s arrays."""
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state)


def _dense_path(a: R.Checkpoint, b: R.Checkpoint, batch: dict[str, Any], s: Settings
                ) -> np.ndarray:
    """Losses on the straight path from ``a`` to ``b`` in dense-equivalent weights."""
    graphdef, abstract, empty = R.eval_model(a.model.replace(linear="dense"))
    pa, pb = _fill(abstract, a.dense_params()), _fill(abstract, b.dense_params())
    return np.asarray(M.interpolate_losses(R.checkpoint_loss(graphdef), pa, pb, (batch, empty),
                                           s.interp_points))


@jax.jit
def _activation_metrics(xa: jax.Array, xb: jax.Array) -> dict[str, jax.Array]:
    """Per-layer metrics of ``xa`` (the run) and ``xb`` (the baseline), both
    ``(n_layers, n_examples, d)``: ``{metric: (n_layers,)}``."""
    def one(a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
        return {"act_l2": M.l2_distance(a, b), "act_cosine": M.cosine_similarity(a, b),
                "act_rel_l2": M.relative_l2_distance(b, a), "act_mean_norm": M.mean_norm(a),
                "act_base_mean_norm": M.mean_norm(b),
                "act_cka": M.linear_cka(a, b), "act_cka_debiased": M.debiased_linear_cka(a, b)}

    return jax.lax.map(lambda ab: one(*ab), (xa, xb))


_ACTIVATIONS = ("activation_heatmaps",)


@dataclass(frozen=True)
class Baseline(Unit):
    """IMBH (dense weights) and per-layer activation similarity against the baseline run
    at the same step."""

    base: R.RunInfo
    imbh_skip: str | None = None

    kind = "baseline"
    version = 2
    settings_used = ("sequences", "interp_points")
    metrics = (
        Metric("imbh", "IMBH", unit="nats", summary=True,
               plots=("barrier_matrices", "interpolation_paths"),
               findings=("same_loss_different_solutions",)),
        Metric("act_cka", "CKA (final)", "final_norm", summary=True, plots=_ACTIVATIONS,
               findings=("same_loss_different_solutions",)),
        Metric("act_cka_debiased", "debiased CKA", "final_norm", plots=_ACTIVATIONS),
        Metric("act_cosine", "cosine similarity", "final_norm", plots=_ACTIVATIONS),
        Metric("act_l2", "L2 distance", "final_norm", plots=_ACTIVATIONS),
        Metric("act_rel_l2", "relative L2 distance", "final_norm", summary=True,
               plots=_ACTIVATIONS),
        Metric("act_mean_norm", "mean activation norm", "final_norm", plots=_ACTIVATIONS),
        Metric("act_base_mean_norm", "baseline mean activation norm", "final_norm"),
        Metric("act_cka", "CKA (mean over layers)", "mean"),
        Metric("act_rel_l2", "relative L2 distance (mean over layers)", "mean"),
    )

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        for p in study.plans:
            if p.base is None:
                continue
            for step in p.steps:
                if step in p.base.steps:
                    yield cls(p.run, step, p.base, p.imbh_skip)
                else:
                    study.problem(
                        f"baseline {p.base.name!r} has no checkpoint at step {step} (it has "
                        f"{p.base.steps}); comparisons of {p.run.name!r} at that step are "
                        "skipped — save the baseline at the same steps")

    def key_parts(self, settings: Settings) -> dict[str, Any]:
        return {"base": str(self.base.path),
                "fp_base": R.checkpoint_fingerprint(self.base, self.step)}

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        run, step = self.run, self.step
        ckpt, base, batch = ctx.load(run, step), ctx.load(self.base, step), ctx.batch(run)
        rows: list[dict[str, Any]] = []
        curves: dict[str, Any] = {}
        if self.imbh_skip is None:
            path = _dense_path(base, ckpt, batch, ctx.settings)
            rows.append(row(run, step, "imbh", "all", float(M.barrier_height(path))))
            curves["imbh"] = path.tolist()
        tokens = jnp.asarray(batch["tokens"][:, :-1])
        xa = layer_activations(ckpt.graphdef, ckpt.params, ckpt.model_state, tokens)
        xb = layer_activations(base.graphdef, base.params, base.model_state, tokens)
        per_layer = jax.device_get(_activation_metrics(xa, xb))
        names = layer_names(ckpt.model.num_layers)
        by_layer = {name: {metric: float(values[i]) for metric, values in per_layer.items()}
                    for i, name in enumerate(names)}
        for name, values in by_layer.items():
            rows += [row(run, step, metric, name, v) for metric, v in values.items()]
        # the reference's summary over layers (6_activations_comparison_plots.py)
        rows += [row(run, step, metric, "mean", v)
                 for metric, v in M.mean_over_layers(by_layer).items()]
        return {"rows": rows, "curves": curves}


def _pair_candidates(study: Study) -> list[R.RunInfo]:
    """Plain runs and the lowest seed of each group (one barrier-matrix cell per method)."""
    out, seen = [], set()
    for p in study.plans:
        r = p.run
        if r.seed is None:
            out.append(r)
        elif r.group not in seen:
            seen.add(r.group)
            out.append(r)
    return out


def _comparable(runs: list[R.RunInfo], ref: R.RunInfo | None) -> list[R.RunInfo]:
    return [r for r in runs if ref is not None and R.architecture_mismatch(r, ref) is None
            and r.linear != "cola"]


@dataclass(frozen=True)
class Pair(Unit):
    """IMBH between two runs at their latest common step (a cell of the barrier matrix)."""

    other: R.RunInfo

    kind = "pair"
    settings_used = ("sequences", "interp_points")
    metrics = (Metric("imbh_pair", "IMBH between runs", "(other run)", unit="nats",
                      plots=("barrier_matrices",)),)
    phase = 1

    @classmethod
    def plan(cls, study: Study) -> Iterable[Unit]:
        runs = _pair_candidates(study)
        ok = _comparable(runs, study.base_run or (runs[0] if runs else None))
        problem: Callable[[str], None] = study.problem
        for i, a in enumerate(ok):
            for b in ok[i + 1:]:
                common = sorted(set(a.steps) & set(b.steps))
                if common:
                    yield cls(a, common[-1], b)
                else:
                    problem(f"runs {a.name!r} and {b.name!r} share no checkpoint step; their "
                            "pairwise barrier is skipped")

    def key_parts(self, settings: Settings) -> dict[str, Any]:
        return {"other": str(self.other.path),
                "fp_other": R.checkpoint_fingerprint(self.other, self.step)}

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        path = _dense_path(ctx.load(self.run, self.step), ctx.load(self.other, self.step),
                           ctx.batch(self.run), ctx.settings)
        return {"rows": [row(self.run, self.step, "imbh_pair", self.other.name,
                             float(M.barrier_height(path)))], "curves": {}}
