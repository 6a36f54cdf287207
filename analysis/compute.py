"""Every metric of the study for every checkpoint of every run, cached on disk.

Work is split into units, each cached as one JSON file under ``cache_dir``
keyed by (unit, run directory, step(s), checkpoint fingerprints, settings):

* ``point``    (run, step): loss at the centre, the random 1-D landscape
  (expected sharpness, direction variance, centred mean profile) and the
  spectra of the weights (dense-equivalent when the layers have one);
* ``previous`` (run, step, previous step): spectra of dW, CCBH, projector
  overlap with the previous checkpoint and with the first one (anchor);
* ``baseline`` (run, step, baseline run at the same step): IMBH on dense
  weights and per-layer activation L2 / cosine / linear CKA / debiased CKA;
* ``pair``     (run, other run, their latest common step): IMBH between two
  runs (the cells of the barrier matrix);
* ``trajectory`` (run, all steps): explained variance of Li et al.'s
  trajectory PCA over the run's checkpoints.

A second call with the same runs and settings reads every unit from the cache
and restores no checkpoint. Problems (missing baseline step, mismatched
architecture, CoLA without dense weights) are collected as one-line messages
and the rest of the work goes on.
"""

from __future__ import annotations

import json
import math
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from analysis import runs as R
from analysis.forward import layer_activations, layer_names
from lowrank_jax import metrics as M
from lowrank_jax.metrics.landscape import scalar_loss
from rundir import groups as G

__all__ = ["Results", "Settings", "analyse"]

REFERENCE_ALPHAS = tuple(float(a) for a in np.round(M.DEFAULT_ALPHAS, 6))


@dataclass(frozen=True)
class Settings:
    """Metric settings (all part of the cache key).

    Attributes:
      directions: random directions per landscape (the paper uses 100).
      alpha_max / alpha_points: the grid ``linspace(-alpha_max, alpha_max, alpha_points)``
        (odd; the paper: 0.003 and 25 points).
      direction_kind: ``"gaussian"`` (the paper's, unnormalised) or ``"filter"`` (Li et al.).
      one_d: 1-D leaves of filter-normalised directions: ``zero``/``keep``/``copy``.
      sequences: validation sequences in the evaluation batch.
      interp_points: points of each interpolation path (the paper: 21).
      threshold: singular values counted above this.
      seed: PRNG seed of the directions (the same directions for every run and step).
      chunk_size / alpha_chunk_size: landscape chunking (memory bound; see
        ``lowrank_jax.metrics.landscape_1d``).
      steps: analyse only these checkpoint steps (``None``: all).
      trajectory_components: components of the trajectory PCA.
    """

    directions: int = 8
    alpha_max: float = 0.003
    alpha_points: int = 13
    direction_kind: str = "gaussian"
    one_d: str = "zero"
    sequences: int = 8
    interp_points: int = 11
    threshold: float = 0.1
    seed: int = 0
    chunk_size: int = 1
    alpha_chunk_size: int = 1
    steps: tuple[int, ...] | None = None
    trajectory_components: int = 2

    def __post_init__(self) -> None:
        if self.alpha_points < 3 or self.alpha_points % 2 == 0:
            raise ValueError(f"alpha_points must be odd and >= 3 (the centre is alpha=0), "
                             f"got {self.alpha_points}")
        if self.directions < 1:
            raise ValueError(f"directions must be >= 1, got {self.directions}")
        if self.interp_points < 3:
            raise ValueError(f"interp_points must be >= 3, got {self.interp_points}")
        if self.sequences < 4:
            raise ValueError(f"sequences must be >= 4 (debiased CKA), got {self.sequences}")
        if self.direction_kind not in ("gaussian", "filter"):
            raise ValueError(f"direction_kind must be 'gaussian' or 'filter', "
                             f"got {self.direction_kind!r}")

    @property
    def alphas(self) -> np.ndarray:
        """``(alpha_points,)`` float32 grid, centre at index ``alpha_points // 2``."""
        return np.linspace(-self.alpha_max, self.alpha_max, self.alpha_points).astype(np.float32)

    @property
    def centre(self) -> int:
        return self.alpha_points // 2


@dataclass
class Results:
    """Rows (``run, method, step, metric, layer, value``), curves for plots, problems."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    baseline: str | None = None
    computed_units: int = 0
    cached_units: int = 0


def _row(run: R.RunInfo, step: int, metric: str, layer: str, value: float) -> dict[str, Any]:
    return {"run": run.name, "method": run.method, "step": int(step), "metric": metric,
            "layer": layer, "value": float(value)}


class _Loader:
    """Restores checkpoints on demand and keeps the last few (LRU)."""

    def __init__(self, size: int = 6):
        self.size = size
        self.items: OrderedDict[tuple[str, int], R.Checkpoint] = OrderedDict()
        self.loads = 0

    def __call__(self, run: R.RunInfo, step: int) -> R.Checkpoint:
        key = (str(run.path), step)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        ckpt = R.load_checkpoint(run, step)
        self.loads += 1
        self.items[key] = ckpt
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return ckpt


class _Cache:
    """One JSON file per unit under ``directory`` (``None``: no cache)."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.directory is None:
            return
        path = self.directory / f"{key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, allow_nan=True), encoding="utf-8")
        tmp.replace(path)


# ----------------------------------------------------------------------------- units

def _spectra_rows(run: R.RunInfo, step: int, prefix: str, out: dict[str, dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    rows = []
    for name, vals in out["per_matrix"].items():
        for metric, value in vals.items():
            rows.append(_row(run, step, f"{prefix}{metric}", name, value))
    for metric, value in out["mean"].items():
        rows.append(_row(run, step, f"{prefix}{metric}", "mean", value))
    return rows


def _spectral_params(ckpt: R.Checkpoint) -> Any:
    """Dense-equivalent weights where they exist, else the trainable parameters."""
    try:
        return ckpt.dense_params()
    except (ValueError, KeyError, TypeError):
        return nnx.to_pure_dict(ckpt.params)


def _directions(params: Any, s: Settings) -> Any:
    key = jax.random.key(s.seed)
    if s.direction_kind == "filter":
        return M.random_directions(key, params, s.directions, "filter", one_d=s.one_d)
    return M.random_directions(key, params, s.directions, "gaussian")


def unit_point(run: R.RunInfo, ckpt: R.Checkpoint, batch: dict[str, Any], s: Settings
               ) -> dict[str, Any]:
    """Centre loss, landscape statistics and weight spectra of one checkpoint."""
    loss_fn, inputs = ckpt.loss_fn(), ckpt.loss_inputs(batch)
    centre_loss = float(jax.jit(scalar_loss, static_argnums=0)(loss_fn, ckpt.params, inputs))
    curves = np.asarray(M.landscape_1d(loss_fn, ckpt.params, _directions(ckpt.params, s),
                                       s.alphas, inputs, chunk_size=s.chunk_size,
                                       alpha_chunk_size=s.alpha_chunk_size))
    mean = curves.mean(axis=0)
    # Sharpness is linear in the curve: its per-direction values give the standard error.
    per_direction = np.asarray(M.expected_sharpness(curves, s.centre))
    step = ckpt.step
    rows = [
        _row(run, step, "val_loss", "all", centre_loss),
        _row(run, step, "sharpness", "all", float(M.expected_sharpness(mean, s.centre))),
        _row(run, step, "sharpness_se", "all", float(np.std(per_direction) / math.sqrt(
            max(len(per_direction) - 1, 1)))),
        _row(run, step, "direction_variance", "all", float(M.direction_variance(curves))),
        _row(run, step, "landscape_max_rise", "all",
             float(np.max(M.centered_profile(mean, s.centre)))),
    ]
    rows += _spectra_rows(run, step, "w_", M.matrix_spectra(_spectral_params(ckpt),
                                                            threshold=s.threshold))
    curve = {"alphas": s.alphas.tolist(), "mean": mean.tolist(),
             "centered": np.asarray(M.centered_profile(mean, s.centre)).tolist(),
             "centered_std": np.asarray(M.centered_profile(curves, s.centre)).std(0).tolist()}
    return {"rows": rows, "curves": {"landscape": curve}}


def _projector_bases(opt_state: Any) -> dict[str, np.ndarray]:
    """``{layer path: basis (d, r)}`` of every 2-D projector in the optimizer state."""
    from lowrank_jax import find_lowrank_states

    out: dict[str, np.ndarray] = {}
    if opt_state is None:
        return out
    states = find_lowrank_states(opt_state)
    for i, st in enumerate(states):
        for path, leaf in jax.tree_util.tree_flatten_with_path(st.projector)[0]:
            if getattr(leaf, "ndim", 0) != 2:
                continue
            name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
            out[f"{i}:{name}" if len(states) > 1 else name] = np.asarray(leaf)
    return out


def _overlap_rows(run: R.RunInfo, step: int, metric: str, a: dict[str, np.ndarray],
                  b: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows, vals = [], []
    for name in sorted(set(a) & set(b)):
        if a[name].shape != b[name].shape or not np.any(a[name]) or not np.any(b[name]):
            continue
        v = float(M.subspace_overlap(a[name], b[name]))
        vals.append(v)
        rows.append(_row(run, step, metric, name, v))
    if vals:
        rows.append(_row(run, step, metric, "mean", float(np.mean(vals))))
    return rows


def unit_previous(run: R.RunInfo, prev: R.Checkpoint, ckpt: R.Checkpoint, first: R.Checkpoint,
                  batch: dict[str, Any], s: Settings) -> dict[str, Any]:
    """dW spectra, CCBH and projector overlaps between ``prev`` (and ``first``) and ``ckpt``."""
    step = ckpt.step
    delta = _weight_delta(_spectral_params(prev), _spectral_params(ckpt))
    rows = _spectra_rows(run, step, "dw_", M.matrix_spectra(delta, threshold=s.threshold))
    path = np.asarray(M.interpolate_losses(ckpt.loss_fn(), prev.params, ckpt.params,
                                           ckpt.loss_inputs(batch), s.interp_points))
    rows.append(_row(run, step, "ccbh", "all", float(M.barrier_height(path))))
    bases = _projector_bases(ckpt.opt_state)
    if bases:
        rows += _overlap_rows(run, step, "proj_overlap_prev", _projector_bases(prev.opt_state),
                              bases)
        rows += _overlap_rows(run, step, "proj_overlap_anchor",
                              _projector_bases(first.opt_state), bases)
    return {"rows": rows, "curves": {"ccbh": path.tolist()}}


def unit_baseline(run: R.RunInfo, ckpt: R.Checkpoint, base: R.Checkpoint,
                  batch: dict[str, Any], s: Settings, skip_imbh: str | None) -> dict[str, Any]:
    """IMBH (dense weights) and per-layer activation similarity against the baseline."""
    step = ckpt.step
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    if skip_imbh is None:
        path = _dense_path(base, ckpt, batch, s)
        rows.append(_row(run, step, "imbh", "all", float(M.barrier_height(path))))
        curves["imbh"] = path.tolist()
    tokens = jnp.asarray(batch["tokens"][:, :-1])
    xa = layer_activations(ckpt.graphdef, ckpt.params, ckpt.model_state, tokens)
    xb = layer_activations(base.graphdef, base.params, base.model_state, tokens)
    per_layer = jax.device_get(_activation_metrics(xa, xb))
    for i, name in enumerate(layer_names(ckpt.model.num_layers)):
        rows += [_row(run, step, metric, name, float(values[i]))
                 for metric, values in per_layer.items()]
    return {"rows": rows, "curves": curves}


def _dense_path(a: R.Checkpoint, b: R.Checkpoint, batch: dict[str, Any], s: Settings
                ) -> np.ndarray:
    """Losses on the straight path from ``a`` to ``b`` in dense-equivalent weights."""
    graphdef, abstract, empty = R.eval_model(a.model.replace(linear="dense"))
    pa, pb = _fill(abstract, a.dense_params()), _fill(abstract, b.dense_params())
    return np.asarray(M.interpolate_losses(R._loss_fn(graphdef), pa, pb, (batch, empty),
                                           s.interp_points))


def unit_pair(run: R.RunInfo, ckpt: R.Checkpoint, other: R.RunInfo, other_ckpt: R.Checkpoint,
              batch: dict[str, Any], s: Settings) -> dict[str, Any]:
    """IMBH between two runs at the same step (the cells of the barrier matrix)."""
    path = _dense_path(ckpt, other_ckpt, batch, s)
    return {"rows": [_row(run, ckpt.step, "imbh_pair", other.name,
                          float(M.barrier_height(path)))], "curves": {}}


@jax.jit
def _activation_metrics(xa: jax.Array, xb: jax.Array) -> dict[str, jax.Array]:
    """Per-layer metrics of ``xa, xb (n_layers, n_examples, d)``: ``{metric: (n_layers,)}``."""
    def one(a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
        return {"act_l2": M.l2_distance(a, b), "act_cosine": M.cosine_similarity(a, b),
                "act_cka": M.linear_cka(a, b), "act_cka_debiased": M.debiased_linear_cka(a, b)}

    return jax.lax.map(lambda ab: one(*ab), (xa, xb))


_weight_delta = jax.jit(M.weight_delta)


def _fill(abstract: Any, pure: dict[str, Any]) -> Any:
    """An ``nnx.State`` shaped like the dense model's params, holding ``pure``'s arrays."""
    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, pure)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state)


def unit_trajectory(run: R.RunInfo, ckpts: list[R.Checkpoint], s: Settings) -> dict[str, Any]:
    """Explained-variance ratios of the trajectory PCA over the run's checkpoints."""
    n = min(s.trajectory_components, len(ckpts) - 1)
    _, ratio = M.trajectory_pca_directions([c.params for c in ckpts], n=n)
    rows = [_row(run, ckpts[-1].step, "trajectory_pca_ratio", f"pc{i + 1}", float(r))
            for i, r in enumerate(ratio)]
    return {"rows": rows, "curves": {}}


# ----------------------------------------------------------------------------- driver

def _say(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _imbh_skip_reason(run: R.RunInfo, base: R.RunInfo) -> str | None:
    for r in (run, base):
        if r.linear == "cola":
            return (f"run {r.name!r} uses CoLA layers (a nonlinearity between the factors: "
                    "no dense-equivalent weights), so IMBH with it is not computed")
    return None


def analyse(run_dirs: list[str | Path], baseline: str | Path | None, settings: Settings,
            cache_dir: Path | None = None, progress: bool = True,
            warn: Callable[[str], None] = _say) -> Results:
    """Compute every metric for every checkpoint of ``run_dirs`` (and of the baseline).

    Args:
      run_dirs: run directories written by ``lowrank-train``.
      baseline: the full-rank reference run (activations, IMBH), or ``None``.
      settings: :class:`Settings`.
      cache_dir: where unit results are cached (``None``: no cache).
      progress: show a tqdm bar on stderr.
      warn: called with each problem (one line) as it is found.

    Returns:
      :class:`Results`; problems are also listed in ``results.problems``.
    """
    res = Results()

    def problem(msg: str) -> None:
        res.problems.append(msg)
        warn(msg)

    base_runs: list[R.RunInfo] = []
    if baseline is not None:
        for m in G.expand(baseline):
            try:
                base_runs.append(_open_member(m))
            except R.AnalysisInputError as err:
                problem(f"baseline: {err}; comparisons with a baseline are skipped")
        if base_runs:
            res.baseline = base_runs[0].group if G.is_group(baseline) else base_runs[0].name
    base_run = base_runs[0] if base_runs else None
    runs: list[R.RunInfo] = list(base_runs)
    seen = {str(r.path) for r in base_runs}
    for d in run_dirs:
        for m in G.expand(d):
            try:
                run = _open_member(m)
            except R.AnalysisInputError as err:
                problem(str(err))
                continue
            if str(run.path) in seen:
                continue
            seen.add(str(run.path))
            runs.append(run)
    names = [r.name for r in runs]
    for r in runs:                          # unique labels
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.name}"
        if r.seed is None:
            r.group = r.name
    if base_run is not None and base_run.seed is None:
        res.baseline = base_run.name
    by_seed = {r.seed: r for r in base_runs}
    base_ids = {id(r) for r in base_runs}

    def base_for(run: R.RunInfo) -> R.RunInfo | None:
        """Seed k of the baseline for seed k of a run; a one-run baseline for every run."""
        if not base_runs or id(run) in base_ids:
            return None
        if len(base_runs) == 1:
            return base_runs[0]
        if run.seed is None:
            return base_runs[0]
        return by_seed.get(run.seed)

    cache = _Cache(cache_dir)
    loader = _Loader()
    batches: dict[str, dict[str, Any]] = {}

    def batch_of(run: R.RunInfo) -> dict[str, Any]:
        if str(run.path) not in batches:
            raw = R.validation_batch(run, s.sequences)
            batches[str(run.path)] = {k: jnp.asarray(v) for k, v in raw.items()}
        return batches[str(run.path)]

    s = settings
    plan: list[tuple[str, R.RunInfo, int, Any]] = []   # (unit, run, step, previous step/other run)
    for run in runs:
        steps = run.steps if s.steps is None else [t for t in run.steps if t in s.steps]
        if s.steps is not None:
            missing = [t for t in s.steps if t not in run.steps]
            if missing:
                problem(f"run {run.name!r} has no checkpoint at step(s) {missing} "
                        f"(it has {run.steps}); those steps are skipped for it")
        base = base_for(run)
        if base is None and base_runs and id(run) not in base_ids:
            problem(f"run {run.name!r} (seed {run.seed}) has no baseline run of the same seed "
                    f"(baseline seeds {sorted(by_seed)}); its comparisons with the baseline "
                    "are skipped — train the baseline with the same seeds")
        mismatch = None if base is None else R.architecture_mismatch(run, base)
        if mismatch:
            problem(mismatch)
        imbh_skip = None if base is None or mismatch else _imbh_skip_reason(run, base)
        if imbh_skip:
            problem(imbh_skip)
        res.runs.append({"name": run.name, "method": run.method, "linear": run.linear,
                         "path": str(run.path), "steps": steps,
                         "baseline": id(run) in base_ids, "architecture": R.architecture(run),
                         "group": run.group, "seed": run.seed,
                         "compared_with": None if base is None else base.name})
        prev = None
        for step in steps:
            plan.append(("point", run, step, None))
            if prev is not None:
                plan.append(("previous", run, step, prev))
            if base is not None and not mismatch:
                if step in base.steps:
                    plan.append(("baseline", run, step, base))
                else:
                    problem(f"baseline {base.name!r} has no checkpoint at step {step} "
                            f"(it has {base.steps}); comparisons of {run.name!r} at that "
                            "step are skipped — save the baseline at the same steps")
            prev = step
        if len(steps) >= 3:
            plan.append(("trajectory", run, steps[-1], None))

    plan += _pair_plan(_pair_candidates(runs), base_run, problem)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), desc="analyse", dynamic_ncols=True, file=sys.stderr)
    try:
        for kind, run, step, prev in plan:
            if bar is not None:
                bar.set_postfix_str(f"{run.name} {kind} {step}")
            try:
                _do_unit(kind, run, step, prev, base_run, s, cache, loader, batch_of, res)
            except R.AnalysisInputError as err:
                problem(str(err))
            except Exception as err:  # noqa: BLE001 - one failed unit must not stop the report
                first = (str(err).strip().splitlines() or [""])[0][:200]
                problem(f"run {run.name!r} step {step}: {kind} metrics failed "
                        f"({type(err).__name__}: {first})")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    for run in runs:
        for t in R.telemetry_overlaps(run):
            res.rows.append(_row(run, t["step"], "telemetry_overlap", "mean", t["overlap_mean"]))
    return res


# The settings each unit's result depends on (its cache key holds only these).
UNIT_SETTINGS = {
    "point": ("directions", "alpha_max", "alpha_points", "direction_kind", "one_d", "sequences",
              "threshold", "seed"),
    "previous": ("sequences", "interp_points", "threshold"),
    "baseline": ("sequences", "interp_points"),
    "pair": ("sequences", "interp_points"),
    "trajectory": ("trajectory_components",),
}


def _open_member(m: G.Member) -> R.RunInfo:
    """Open one run directory of an argument and attach its group label and seed."""
    run = R.open_run(m.path)
    if m.name is not None:
        run.name = m.name
    run.group, run.seed = m.group, m.seed
    return run


def _pair_candidates(runs: list[R.RunInfo]) -> list[R.RunInfo]:
    """Plain runs and the lowest seed of each group (the barrier matrix stays one cell per method)."""
    out, groups = [], set()
    for r in runs:
        if r.seed is None:
            out.append(r)
        elif r.group not in groups:
            groups.add(r.group)
            out.append(r)
    return out


def _pair_plan(runs: list[R.RunInfo], base_run: R.RunInfo | None,
               problem: Callable[[str], None]) -> list[tuple[str, R.RunInfo, int, Any]]:
    """IMBH between every two comparable runs at their latest common step."""
    ref = base_run or (runs[0] if runs else None)
    ok = [r for r in runs if ref is not None and R.architecture_mismatch(r, ref) is None
          and r.linear != "cola"]
    plan = []
    for i, a in enumerate(ok):
        for b in ok[i + 1:]:
            common = sorted(set(a.steps) & set(b.steps))
            if common:
                plan.append(("pair", a, common[-1], b))
            else:
                problem(f"runs {a.name!r} and {b.name!r} share no checkpoint step; their "
                        "pairwise barrier is skipped")
    return plan


def _do_unit(kind: str, run: R.RunInfo, step: int, prev: Any, base_run: R.RunInfo | None,
             s: Settings, cache: _Cache, loader: _Loader, batch_of: Callable, res: Results
             ) -> None:
    settings = {k: v for k, v in asdict(s).items() if k in UNIT_SETTINGS[kind]}
    fp = R.checkpoint_fingerprint
    key_parts: dict[str, Any] = {"unit": kind, "version": 1, "run": str(run.path), "step": step,
                                 "fp": fp(run, step), "settings": settings}
    if kind == "previous":
        first = run.steps[0] if s.steps is None else min(t for t in run.steps if t in s.steps)
        key_parts.update(prev=prev, fp_prev=fp(run, prev), first=first, fp_first=fp(run, first))
    elif kind == "baseline":
        key_parts.update(base=str(prev.path), fp_base=fp(prev, step))
    elif kind == "pair":
        key_parts.update(other=str(prev.path), fp_other=fp(prev, step))
    elif kind == "trajectory":
        steps = [t for t in run.steps if s.steps is None or t in s.steps]
        key_parts.update(steps=steps, fps=[fp(run, t) for t in steps])
    key = f"{run.name.replace('/', '_')}-{step}-{kind}-{R.settings_hash(key_parts)}"
    out = cache.get(key)
    if out is None:
        out = _compute_unit(kind, run, step, prev, base_run, s, loader, batch_of, key_parts)
        cache.put(key, out)
        res.computed_units += 1
    else:
        res.cached_units += 1
    res.rows.extend(out["rows"])
    for name, curve in out["curves"].items():
        res.curves.setdefault(name, {}).setdefault(run.name, {})[str(step)] = curve


def _compute_unit(kind: str, run: R.RunInfo, step: int, prev: Any,
                  base_run: R.RunInfo | None, s: Settings, loader: _Loader, batch_of: Callable,
                  key_parts: dict[str, Any]) -> dict[str, Any]:
    if kind == "point":
        return unit_point(run, loader(run, step), batch_of(run), s)
    if kind == "previous":
        assert prev is not None
        return unit_previous(run, loader(run, prev), loader(run, step),
                             loader(run, key_parts["first"]), batch_of(run), s)
    if kind == "baseline":
        skip = _imbh_skip_reason(run, prev)
        return unit_baseline(run, loader(run, step), loader(prev, step), batch_of(run), s, skip)
    if kind == "pair":
        return unit_pair(run, loader(run, step), prev, loader(prev, step), batch_of(run), s)
    if kind == "trajectory":
        return unit_trajectory(run, [loader(run, t) for t in key_parts["steps"]], s)
    raise ValueError(f"unknown unit {kind!r}")

