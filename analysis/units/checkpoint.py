"""Units on one checkpoint of one run: the random 1-D landscape and the weight spectra."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis import runs as R
from analysis.settings import Settings
from analysis.units.base import CheckpointUnit, Metric, UnitContext, row
from analysis.variables import probe_variables
from lowrank_jax import metrics as M
from lowrank_jax.metrics.landscape import scalar_loss

__all__ = ["SPECTRAL", "ParamNorm", "Point", "spectra_metrics", "spectra_rows", "spectral_params",
           "stored_params"]

#: the spectral statistics of :func:`lowrank_jax.metrics.matrix_spectra`, with labels
SPECTRAL = (("effective_rank", "effective rank"), ("stable_rank", "stable rank"),
            ("spectral_gap", "spectral gap"), ("top_singular", "sigma_1"),
            ("count_above", "count above threshold"))


def spectra_metrics(prefix: str, matrix: str, summary: tuple[str, ...] = (),
                    seed_test: tuple[str, ...] = (), geometry: tuple[str, ...] = ()
                    ) -> tuple[Metric, ...]:
    """Table rows of the five spectral statistics of ``matrix`` (``W`` or ``dW``), mean layer."""
    return tuple(Metric(f"{prefix}{name}", f"{matrix} {label}", "mean",
                        summary=name in summary, seed_test=name in seed_test,
                        geometry=name in geometry, plots=("spectra_over_steps",),
                        findings=("spectra_differ",) if name == "effective_rank" else ())
                 for name, label in SPECTRAL)


def spectra_rows(run: R.RunInfo, step: int, prefix: str, out: dict[str, dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Rows of :func:`lowrank_jax.metrics.matrix_spectra` output: per matrix and the mean."""
    rows = []
    for name, vals in out["per_matrix"].items():
        for metric, value in vals.items():
            rows.append(row(run, step, f"{prefix}{metric}", name, value))
    for metric, value in out["mean"].items():
        rows.append(row(run, step, f"{prefix}{metric}", "mean", value))
    return rows


def stored_params(ckpt: R.Checkpoint) -> dict[str, Any]:
    """Every float variable as stored, as a pure dict: the trainable parameters and the
    frozen weights of the model state (ReLoRA's base kernel); SLTrain's int32 support and
    RNG streams are left out (``None``)."""
    state = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.floating) else None,
                         nnx.to_pure_dict(ckpt.model_state))
    return R.merge_dicts(nnx.to_pure_dict(ckpt.params), state)


def spectral_params(ckpt: R.Checkpoint, spectra_of: str = "dense") -> Any:
    """The matrices whose spectra are measured.

    ``"dense"``: dense-equivalent weights where they exist (LoRA/ReLoRA ``W + A B s``,
    SLTrain ``B A s + S``), else the trainable parameters (CoLA's factors, which have no
    dense equivalent). ``"stored"``: :func:`stored_params`, the reference's choice
    (5_ranks.py measures every 2-D ``named_parameters()`` tensor of the attention/MLP
    modules: LoRA/SLTrain factors and ReLoRA's frozen base separately).
    """
    if spectra_of == "stored":
        return stored_params(ckpt)
    try:
        return ckpt.dense_params()
    except (ValueError, KeyError, TypeError):
        return nnx.to_pure_dict(ckpt.params)


def _directions(tree: Any, s: Settings) -> Any:
    key = jax.random.key(s.seed)
    if s.direction_kind == "filter":
        return M.random_directions(key, tree, s.directions, "filter", one_d=s.one_d)
    return M.random_directions(key, tree, s.directions, "gaussian")


_SHARPNESS = ("sharpness_over_steps",)
_centre_loss = jax.jit(scalar_loss, static_argnums=0)


@dataclass(frozen=True)
class Point(CheckpointUnit):
    """Centre loss, random 1-D landscape statistics and weight spectra of one checkpoint."""

    kind = "point"
    version = 2
    settings_used = ("directions", "alpha_max", "alpha_points", "direction_kind", "one_d",
                     "sequences", "threshold", "seed", "perturb", "spectra_of")
    metrics = (
        Metric("val_loss", "loss", unit="nats", summary=True, seed_test=True, plots=_SHARPNESS,
               findings=("same_loss_different_solutions",)),
        Metric("sharpness", "sharpness", unit="nats", summary=True, seed_test=True,
               geometry=True, plots=_SHARPNESS, findings=("landscape_differs",)),
        Metric("sharpness_se", "sharpness s.e.", unit="nats", plots=_SHARPNESS,
               findings=("landscape_differs",)),
        Metric("direction_variance", "direction variance", unit="nats^2", summary=True,
               seed_test=True, plots=_SHARPNESS),
        Metric("landscape_max_rise", "largest landscape rise", unit="nats"),
        *spectra_metrics("w_", "W", summary=("effective_rank", "stable_rank", "top_singular"),
                         seed_test=("effective_rank", "top_singular"),
                         geometry=("effective_rank",)),
    )

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        s, run, step = ctx.settings, self.run, self.step
        ckpt = ctx.load(run, step)
        probe = probe_variables(ckpt, s.perturb == "all")
        inputs = probe.inputs(ctx.batch(run))
        centre_loss = float(_centre_loss(probe.loss_fn, probe.tree, inputs))
        curves = np.asarray(M.landscape_1d(probe.loss_fn, probe.tree,
                                           _directions(probe.tree, s), s.alphas, inputs,
                                           chunk_size=s.chunk_size,
                                           alpha_chunk_size=s.alpha_chunk_size))
        mean = curves.mean(axis=0)
        # Sharpness is linear in the curve: its per-direction values give the standard error.
        per_direction = np.asarray(M.expected_sharpness(curves, s.centre))
        se = float(np.std(per_direction) / math.sqrt(max(len(per_direction) - 1, 1)))
        rows = [
            row(run, step, "val_loss", "all", centre_loss),
            row(run, step, "sharpness", "all", float(M.expected_sharpness(mean, s.centre))),
            row(run, step, "sharpness_se", "all", se),
            row(run, step, "direction_variance", "all", float(M.direction_variance(curves))),
            row(run, step, "landscape_max_rise", "all",
                float(np.max(M.centered_profile(mean, s.centre)))),
        ]
        rows += spectra_rows(run, step, "w_", M.matrix_spectra(
            spectral_params(ckpt, s.spectra_of), threshold=s.threshold))
        curve = {"alphas": s.alphas.tolist(), "mean": mean.tolist(),
                 "centered": np.asarray(M.centered_profile(mean, s.centre)).tolist(),
                 "centered_std": np.asarray(M.centered_profile(curves, s.centre)).std(0).tolist()}
        return {"rows": rows, "curves": {"landscape": curve}}


@dataclass(frozen=True)
class ParamNorm(CheckpointUnit):
    """The global L2 norm of the trainable parameters, ``||theta||_2`` (the vector the
    random directions perturb, so the scale their sharpness is read against)."""

    kind = "param_norm"
    metrics = (Metric("param_norm", "parameter norm", summary=True),)

    def compute(self, ctx: UnitContext) -> dict[str, Any]:
        leaves = jax.tree.leaves(ctx.load(self.run, self.step).params)
        norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                             for x in leaves))
        return {"rows": [row(self.run, self.step, "param_norm", "all", norm)], "curves": {}}
