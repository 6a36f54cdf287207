"""Runs written by ``lowrank-train``: discovery, configs, checkpoints, telemetry, data.

A run directory holds ``checkpoints/<step>/`` (orbax, with the run's config),
``checkpoint_manifests/<step>.json`` and ``metrics.jsonl``. :func:`open_run`
checks the directory and reads the config without building anything;
:func:`load_checkpoint` rebuilds the run's trainer from that config and
restores ``trainer.abstract_state`` (so it follows whatever the train state
holds), then returns the pieces the metrics need.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from rundir import layout

__all__ = [
    "AnalysisInputError",
    "Checkpoint",
    "RunInfo",
    "architecture",
    "architecture_mismatch",
    "checkpoint_fingerprint",
    "checkpoint_loss",
    "load_checkpoint",
    "method_label",
    "open_run",
    "telemetry_overlaps",
    "validation_batch",
]

# Model fields that must agree for two runs' weights/activations to be compared
# (the projection type may differ: comparisons use dense-equivalent weights).
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers")


class AnalysisInputError(ValueError):
    """A run directory (or a pair of runs) that cannot be analysed; one-line message."""


@dataclass
class RunInfo:
    """A run directory that holds at least one checkpoint.

    Attributes:
      path: absolute run directory.
      name: short label (the directory name).
      method: optimizer name (``optimizer.name`` of the saved config).
      config: the saved config dict (of the newest checkpoint).
      steps: checkpoint steps, ascending.
      model: the run's ``LlamaConfig``.
      group: the seed group it belongs to (``rundir.groups``; its own name for a plain run).
      seed: its seed within the group, ``None`` for a plain run.
    """

    path: Path
    name: str
    method: str
    config: dict[str, Any]
    steps: list[int]
    model: Any
    group: str = ""
    seed: int | None = None
    _trainer: Any = field(default=None, repr=False)

    @property
    def linear(self) -> str:
        """The projection type of the model (``dense``, ``cola``, ``lora``, ``sltrain``)."""
        return str(getattr(self.model, "linear", "dense"))

    def trainer(self) -> Any:
        """The run's :class:`train.step.Trainer`, built once from the saved config."""
        if self._trainer is None:
            from train.config import config_from_dict
            from train.step import build_trainer

            self._trainer = build_trainer(config_from_dict(self.config))
        return self._trainer


def _reader(ckpt_dir: Path) -> Any:
    """A read-only orbax manager: creates, deletes and cleans up nothing (safe on live runs)."""
    import orbax.checkpoint as ocp

    from train.checkpoint import ITEMS

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)          # drop orbax's notes about read-only managers
    try:
        options = ocp.CheckpointManagerOptions(create=False, read_only=True,
                                               cleanup_tmp_directories=False)
        return ocp.CheckpointManager(ckpt_dir, options=options, item_names=ITEMS)
    finally:
        absl.setLevel(level)


def _step_dirs(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def open_run(run_dir: str | Path) -> RunInfo:
    """Check ``run_dir`` and read its config; nothing is compiled or restored.

    Raises:
      AnalysisInputError: no such directory, no checkpoints, or an unreadable config.
    """
    import orbax.checkpoint as ocp

    from train.config import ConfigError, config_from_dict, model_config

    path = Path(run_dir).absolute()
    if not path.is_dir():
        raise AnalysisInputError(
            f"run {str(run_dir)!r}: no such directory; pass a run directory written by "
            "lowrank-train (it holds checkpoints/ and metrics.jsonl)")
    ckpt_dir = path / layout.CHECKPOINTS
    if not ckpt_dir.is_dir() or not _step_dirs(ckpt_dir):
        raise AnalysisInputError(
            f"run {str(run_dir)!r} has no checkpoints under {ckpt_dir}; train it with "
            "lowrank-train (checkpoint.every > 0) or leave it out")
    manager = _reader(ckpt_dir)
    try:
        steps = sorted(manager.all_steps())
        raw = None
        if steps:
            try:
                raw = dict(manager.restore(steps[-1], args=ocp.args.Composite(
                    config=ocp.args.JsonRestore())).config)
            except Exception:  # noqa: BLE001 - any damage means "no config"
                raw = None
    finally:
        manager.close()
    if not steps:
        raise AnalysisInputError(
            f"run {str(run_dir)!r} has no finalized checkpoints under {ckpt_dir}; "
            "let lowrank-train finish a save or leave the run out")
    if raw is None:
        raise AnalysisInputError(
            f"run {str(run_dir)!r}: the config saved with step {steps[-1]} is unreadable; "
            "the checkpoint is damaged, leave the run out or retrain it")
    try:
        cfg = config_from_dict(raw)
        model = model_config(cfg)
    except (ConfigError, ValueError, TypeError) as err:
        raise AnalysisInputError(
            f"run {str(run_dir)!r}: its saved config does not parse ({err})") from None
    return RunInfo(path, path.name, cfg.optimizer.name, raw, steps, model)


def architecture(run: RunInfo) -> dict[str, int]:
    """The model fields that must agree between compared runs."""
    return {k: int(getattr(run.model, k)) for k in ARCH_FIELDS}


def architecture_mismatch(run: RunInfo, other: RunInfo) -> str | None:
    """``None`` when the shapes agree, else a one-line description of the differences."""
    a, b = architecture(run), architecture(other)
    diffs = [f"{k} {a[k]} vs {b[k]}" for k in ARCH_FIELDS if a[k] != b[k]]
    if not diffs:
        return None
    return (f"runs {run.name!r} and {other.name!r} have different architectures "
            f"({', '.join(diffs)}); comparisons between them are skipped — compare runs of "
            "the same model preset")


def checkpoint_fingerprint(run: RunInfo, step: int) -> str:
    """A short hash that changes when the checkpoint of ``step`` is rewritten."""
    manifest = run.path / layout.MANIFESTS / f"{step}.json"
    step_dir = run.path / layout.CHECKPOINTS / str(step)
    parts = [str(run.path), str(step)]
    if manifest.is_file():
        parts.append(manifest.read_text(encoding="utf-8"))
    if step_dir.exists():
        parts.append(str(step_dir.stat().st_mtime_ns))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """What the metrics need from one restored checkpoint.

    Attributes:
      step: the optimizer step.
      params: the trainable parameters (``nnx.State``).
      model_state: every other model variable (LoRA's frozen kernels, SLTrain's
        sparse supports; empty for dense models), ``nnx.State``.
      opt_state: the optimizer state (projectors live here).
      graphdef: the model's graph definition in eval mode (dropout off):
        ``nnx.merge(graphdef, params, model_state)`` is the model.
      model: the ``LlamaConfig``.
    """

    step: int
    params: Any
    model_state: Any
    opt_state: Any
    graphdef: Any
    model: Any

    def loss_fn(self) -> Any:
        """``loss(params, inputs) -> (loss, aux)`` with ``inputs = self.loss_inputs(batch)``.

        The train step's next-token loss. The model state travels in ``inputs``,
        so one callable (and one compiled program) serves every checkpoint of an
        architecture.
        """
        return checkpoint_loss(self.graphdef)

    def loss_inputs(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The second argument of :meth:`loss_fn` for ``batch``."""
        return batch, self.model_state

    def dense_params(self) -> dict[str, Any]:
        """Dense-equivalent weights as a pure dict (raises ``ValueError`` for CoLA)."""
        from lowrank_jax.models import effective_weights

        full = merge_dicts(nnx.to_pure_dict(self.params), nnx.to_pure_dict(self.model_state))
        return effective_weights(full, self.model)


def merge_dicts(a: dict, b: dict) -> dict:
    """``a`` with ``b``'s entries added (nested dicts merged, ``b`` wins elsewhere)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def _loss_with_state(graphdef: Any, params: Any, inputs: tuple[dict[str, Any], Any]) -> Any:
    from lowrank_jax.models import loss_from_state

    batch, model_state = inputs
    return loss_from_state(graphdef, params, batch, model_state)


@functools.lru_cache(maxsize=32)
def checkpoint_loss(graphdef: Any) -> Any:
    """``loss(params, (batch, model_state)) -> (loss, aux)``: the model's own
    :func:`lowrank_jax.models.loss_from_state` (the train step's loss) in the
    ``loss(params, inputs)`` form of :mod:`lowrank_jax.metrics`.

    One callable per graph definition, so that jitted metrics (which take it as a
    static argument) compile once per architecture.
    """
    return functools.partial(_loss_with_state, graphdef)


def _standard_layout(run: RunInfo, fields: dict[str, Any]) -> dict[str, Any]:
    """Restored fields of a scanned or per-layer run in the standard (``layers/<i>``) layout."""
    from train.config import config_from_dict

    cfg = config_from_dict(run.config)
    if not (cfg.model.scan_layers or cfg.per_layer_update):
        return fields
    if "opt_state" not in fields:
        if not cfg.model.scan_layers:
            return fields
        from lowrank_jax.models import unstack_layers

        n = run.model.num_layers
        return {**fields, **{k: unstack_layers(fields[k], n) for k in ("params", "model_state")
                             if fields.get(k) is not None}}
    from train.layout import to_layout
    from train.schedule import make_schedule
    from train.step import TrainState, build_optimizer

    standard = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_layers=False),
                                   per_layer_update=False)
    tx = build_optimizer(cfg.optimizer, make_schedule(cfg), cfg.seed)
    state = TrainState(fields["params"], fields["opt_state"], None, None,
                       fields.get("model_state"))
    state = to_layout(state, cfg, standard, tx)
    return {**fields, "params": state.params, "opt_state": state.opt_state,
            "model_state": state.model_state}


@functools.lru_cache(maxsize=16)
def eval_model(model_cfg: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, abstract params, abstract model_state)`` of the model in eval mode.

    Always the unrolled model (``layers/<i>/...``): checkpoints of scanned runs are
    unstacked by :func:`load_checkpoint`.
    """
    from lowrank_jax.models import Llama

    model_cfg = model_cfg.replace(scan_layers=False)
    abstract = nnx.eval_shape(lambda: Llama(model_cfg, rngs=nnx.Rngs(0)))
    abstract.eval()
    return nnx.split(abstract, nnx.Param, ...)


def _disk_fields(run: RunInfo, step: int) -> list[str]:
    """Top-level fields of the train state saved at ``step`` (from orbax's ``_METADATA``)."""
    path = run.path / layout.CHECKPOINTS / str(step) / "state" / "_METADATA"
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["tree_metadata"].keys()
    except (OSError, ValueError, KeyError):
        return []
    fields = []
    for key in keys:
        try:
            name = str(ast.literal_eval(key)[0])
        except (ValueError, SyntaxError, IndexError, TypeError):
            continue
        if name not in fields:
            fields.append(name)
    return fields


def _restore(run: RunInfo, step: int, target: Any) -> Any:
    import orbax.checkpoint as ocp

    manager = _reader(run.path / layout.CHECKPOINTS)
    try:
        return manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()


def load_checkpoint(run: RunInfo, step: int) -> Checkpoint:
    """Restore ``step`` of ``run`` into the run's own ``trainer.abstract_state``.

    A checkpoint written when the train state had fewer fields (e.g. before
    ``model_state`` existed) is restored field by field into the same abstract
    leaves; missing model state is taken as empty.

    Raises:
      AnalysisInputError: the step is missing, does not restore or fails its checksums.
    """
    from train.checkpoint import state_checksums

    if step not in run.steps:
        raise AnalysisInputError(
            f"run {run.name!r} has no checkpoint at step {step} (it has {run.steps})")
    abstract = run.trainer().abstract_state
    names = list(getattr(abstract, "_fields", ()))
    try:
        out = _restore(run, step, abstract)
        fields = {n: getattr(out.state, n) for n in names}
        order = names
    except Exception as err:  # noqa: BLE001 - retried below, then reported in one line
        on_disk = _disk_fields(run, step)
        order = [n for n in names if n in on_disk]
        if not order or set(on_disk) - set(names):
            raise _restore_error(run, step, err) from None
        try:
            out = _restore(run, step, {n: getattr(abstract, n) for n in order})
        except Exception as err2:  # noqa: BLE001
            raise _restore_error(run, step, err2) from None
        fields = dict(out.state)
    expected = list(out.meta.get("checksums", []))
    if expected and expected != state_checksums([fields[n] for n in order]):
        raise AnalysisInputError(
            f"run {run.name!r}: checkpoint at step {step} fails its checksums (damaged on disk)")
    fields = _standard_layout(run, fields)
    graphdef, _, empty_state = eval_model(run.model)
    model_state = fields.get("model_state")
    if model_state is None:
        model_state = empty_state
    return Checkpoint(step, fields["params"], model_state, fields.get("opt_state"), graphdef,
                      run.model)


def _restore_error(run: RunInfo, step: int, err: BaseException) -> AnalysisInputError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return AnalysisInputError(
        f"run {run.name!r}: checkpoint at step {step} does not restore ({first}); it was "
        "written by an incompatible version of lowrank-train or is damaged — retrain it")


def validation_batch(run: RunInfo, sequences: int, batches: int = 1) -> dict[str, np.ndarray]:
    """Held-out batch of the run's data config, built as ``train/loop.py`` builds its eval batches.

    Returns ``{"tokens": (n, seq_len + 1) int32, "mask": (n, seq_len) float32}`` with
    ``n = min(sequences * batches, available)`` sequences.
    """
    from train.config import config_from_dict
    from train.data import build_batches

    cfg = config_from_dict(run.config)
    it = build_batches(cfg.data, split="validation", seq_len=cfg.seq_len,
                       batch_size=sequences, seed=cfg.seed, num_batches=batches)
    got = list(it)
    if not got:
        raise AnalysisInputError(
            f"run {run.name!r}: its validation split has no complete sequence of "
            f"{cfg.seq_len + 1} tokens; the data it was trained on is not available")
    return {k: np.concatenate([b[k] for b in got]) for k in got[0]}


def telemetry_overlaps(run: RunInfo) -> list[dict[str, Any]]:
    """``[{"step", "overlap_mean", "overlap": {layer: value}}]`` from ``metrics.jsonl``.

    Rows written by ``lowrank-train`` at projector refreshes (empty for AdamW).
    """
    from rundir import read_metrics

    rows = read_metrics(run.path)
    return [{"step": int(r["step"]), "overlap_mean": float(r["overlap_mean"]),
             "overlap": {k: float(v) for k, v in r.get("overlap", {}).items()}}
            for r in rows if "overlap_mean" in r]


def method_label(config: dict[str, Any]) -> str:
    """The training method of a run's saved config, as a study names it.

    ``relora`` (LoRA layers with ``relora.reset_every > 0``), else the projection type for
    the architecture methods (``lora``, ``cola``, ``sltrain``, ...), else the optimizer name
    (``adamw``, ``galore_adamw``, ...).

    >>> method_label({"model": {"linear": "cola"}, "optimizer": {"name": "adamw"}})
    'cola'
    >>> method_label({"model": {"linear": "lora"}, "relora": {"reset_every": 250}})
    'relora'
    >>> method_label({"optimizer": {"name": "galore_adamw"}})
    'galore_adamw'
    """
    linear = str(config.get("model", {}).get("linear", "dense"))
    if linear == "lora" and int(config.get("relora", {}).get("reset_every", 0) or 0) > 0:
        return "relora"
    if linear != "dense":
        return linear
    return str(config.get("optimizer", {}).get("name", "adamw"))


def describe(run: RunInfo) -> str:
    """One line: name, method, projection type, steps."""
    return (f"{run.name}: {run.method} ({run.linear} layers), "
            f"checkpoints at {', '.join(map(str, run.steps))}")


def settings_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
