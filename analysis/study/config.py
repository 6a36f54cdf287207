"""A study config: which methods at which scales and seeds, and how to analyse them.

YAML (``configs/study/<name>.yaml``)::

    name: cpu                                   # a label for the report
    out: runs/study/cpu                         # runs, evaluations and the report go here
    base: base/demo                             # configs/<base>.yaml (or a path)
    seeds: 1                                    # lowrank-train seeds=N per run
    overrides: [steps=400, eval.every=100]      # lowrank-train overrides of every run
    scales:                                     # label -> preset file + overrides
      d64: {preset: presets/llama_demo, overrides: [model.overrides.hidden_size=64]}
      d128: presets/llama_demo                  # a bare file is a scale without overrides
    methods: [adamw, galore, relora]            # configs/methods/<name>.yaml, or a mapping
    method_overrides:                           # per method, added to its runs
      relora: [relora.reset_every=100]
    scale_method_overrides:                     # per "scale/method" (e.g. relora.reset_every)
      d64/relora: [relora.reset_every=50]
    baseline: adamw                             # the full-rank method (default: adamw)
    analysis: {directions: 8, topk: 20}         # lowrank-analyze options (--name, - or _)
    downstream: {tasks: [builtin], max_examples: 200}   # lowrank-eval options
                                                # (+ lm_eval_tasks: [piqa, ...])
    predictor: {model: linear}                  # linear or ridge (alpha)

``methods`` may also map a label to ``{config: FILE, overrides: [...]}`` (a label that
is not a file under ``configs/methods/``). Every run is ``<out>/<scale>/<method>``
(a seed group of ``seed_<s>/`` runs when ``seeds > 1``), trained with
``lowrank-train -c <base> -c <preset> -c <method> run_dir=... <overrides>``, in the
order: common overrides, scale, method, scale/method.

Every (scale, method) config is composed and validated before anything runs
(:func:`load_study`), so a missing file, an unknown method, a bad scale or an
invalid override is one :class:`StudyConfigError` line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CONFIGS", "RunSpec", "Study", "StudyConfigError", "load_study"]

#: where ``base``, presets and methods are looked up (the repository's configs/)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_KEYS = {"name", "out", "base", "seeds", "overrides", "scales", "methods", "method_overrides",
         "scale_method_overrides", "baseline", "analysis", "downstream", "predictor"}
_DOWNSTREAM = {"tasks", "max_examples", "batch_size", "bootstrap_iters", "steps", "seed",
               "max_length", "lm_eval_tasks", "lm_eval_include_path", "lm_eval_limit"}
_PREDICTOR = {"model", "alpha"}


class StudyConfigError(ValueError):
    """A study config that cannot be run; one-line message naming the key and the fix."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study (a seed group when ``seeds > 1``).

    Attributes:
      scale / method: their labels in the study config.
      run_dir: ``<out>/<scale>/<method>``.
      configs: the YAML files composed, in order.
      overrides: ``key=value`` overrides, ``run_dir`` and ``seeds`` included.
      steps: the run's total updates (from the composed config).
    """

    scale: str
    method: str
    run_dir: Path
    configs: tuple[Path, ...]
    overrides: tuple[str, ...]
    steps: int


@dataclass(frozen=True)
class Study:
    """A parsed, validated study config.

    Attributes:
      name / out / seeds / baseline: as in the YAML.
      scales / methods: their labels, in order.
      runs: every :class:`RunSpec`, scale by scale, method by method.
      analysis: ``lowrank-analyze`` options as ``{option: value}`` (``_`` in names).
      downstream: ``lowrank-eval`` options (``tasks`` a list).
      predictor: ``{"model": "linear" | "ridge", "alpha": float}``.
      source: the YAML file.
    """

    name: str
    out: Path
    seeds: int
    baseline: str
    scales: tuple[str, ...]
    methods: tuple[str, ...]
    runs: tuple[RunSpec, ...]
    analysis: dict[str, Any] = field(default_factory=dict)
    downstream: dict[str, Any] = field(default_factory=dict)
    predictor: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def runs_of(self, scale: str) -> list[RunSpec]:
        """The runs of one scale, in method order."""
        return [r for r in self.runs if r.scale == scale]


def _file(value: Any, where: str, folder: str = "") -> Path:
    """A config file: a path that exists, else ``configs/<folder>/<value>.yaml``."""
    if not isinstance(value, str) or not value:
        raise StudyConfigError(f"{where}: expected a config file name, got {value!r}")
    candidates = [Path(value), CONFIGS / value, CONFIGS / f"{value}.yaml"]
    if folder:
        candidates += [CONFIGS / folder / value, CONFIGS / folder / f"{value}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where_to = f"configs/{folder}/" if folder else "configs/"
    raise StudyConfigError(f"{where}: no config file {value!r} (looked for it as a path and "
                           f"under {where_to}); give an existing YAML file")


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence) or \
            not all(isinstance(v, str) and "=" in v for v in value):
        raise StudyConfigError(f"{where}: expected a list of key=value strings, got {value!r}")
    return list(value)


def _scales(raw: Any) -> dict[str, tuple[Path, list[str]]]:
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        raw = {str(Path(str(v)).stem): v for v in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise StudyConfigError("scales: expected a non-empty mapping of label -> preset file "
                               "(e.g. {d128: presets/llama_demo})")
    out = {}
    for label, spec in raw.items():
        where = f"scales.{label}"
        if isinstance(spec, str):
            spec = {"preset": spec}
        if not isinstance(spec, Mapping) or "preset" not in spec or \
                set(spec) - {"preset", "overrides"}:
            raise StudyConfigError(f"{where}: expected a preset file or {{preset: FILE, "
                                   f"overrides: [key=value, ...]}}, got {spec!r}")
        out[str(label)] = (_file(spec["preset"], where, "presets"),
                           _strings(spec.get("overrides"), f"{where}.overrides"))
    return out


def _methods(raw: Any) -> dict[str, tuple[Path, list[str]]]:
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        raw = {str(v): None for v in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise StudyConfigError("methods: expected a non-empty list of method names "
                               "(configs/methods/<name>.yaml) or a mapping")
    known = sorted(p.stem for p in (CONFIGS / "methods").glob("*.yaml"))
    out = {}
    for label, spec in raw.items():
        where = f"methods.{label}"
        if spec is None:
            path = CONFIGS / "methods" / f"{label}.yaml"
            if not path.is_file():
                raise StudyConfigError(f"{where}: unknown method {label!r}; known: "
                                       f"{', '.join(known)} (or map a label to "
                                       "{config: FILE, overrides: [...]})")
            out[str(label)] = (path, [])
            continue
        if not isinstance(spec, Mapping) or "config" not in spec or \
                set(spec) - {"config", "overrides"}:
            raise StudyConfigError(f"{where}: expected {{config: FILE, overrides: [...]}}, "
                                   f"got {spec!r}")
        out[str(label)] = (_file(spec["config"], where, "methods"),
                           _strings(spec.get("overrides"), f"{where}.overrides"))
    return out


def _options(raw: Any, where: str, allowed: set[str] | None = None) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise StudyConfigError(f"{where}: expected a mapping of options, got {raw!r}")
    out = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if allowed is not None and set(out) - allowed:
        bad = sorted(set(out) - allowed)
        raise StudyConfigError(f"{where}: unknown option(s) {', '.join(bad)}; valid: "
                               f"{', '.join(sorted(allowed))}")
    return out


def _analysis_options(raw: Any) -> dict[str, Any]:
    from analysis.cli import build_parser

    opts = _options(raw, "analysis")
    parser = build_parser()
    valid = {a.dest for a in parser._actions if a.option_strings} - {"help", "out", "baseline"}
    bad = sorted(set(opts) - valid)
    if bad:
        raise StudyConfigError(f"analysis: unknown lowrank-analyze option(s) {', '.join(bad)}; "
                               f"valid: {', '.join(sorted(valid))}")
    return opts


def load_study(path: str | Path, out: str | Path | None = None) -> Study:
    """Read, compose and validate a study config.

    Args:
      path: the YAML file.
      out: overrides the config's ``out``.

    Raises:
      StudyConfigError: anything wrong, with a one-line message.
    """
    import yaml

    from train.config import ConfigError, load_config

    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"--config: no such file {str(path)!r}; give a study YAML "
                               "such as configs/study/cpu.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise StudyConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, Mapping):
        raise StudyConfigError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise StudyConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: "
                               f"{', '.join(sorted(_KEYS))}")
    seeds = raw.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise StudyConfigError(f"seeds: expected an integer >= 1, got {seeds!r}")
    scales, methods = _scales(raw.get("scales")), _methods(raw.get("methods"))
    baseline = str(raw.get("baseline", "adamw"))
    if baseline not in methods:
        raise StudyConfigError(f"baseline: {baseline!r} is not one of the methods "
                               f"({', '.join(methods)}); add it or name another")
    base = _file(raw.get("base", "base/demo"), "base")
    common = _strings(raw.get("overrides"), "overrides")
    per_method = _options(raw.get("method_overrides"), "method_overrides")
    per_pair = _options(raw.get("scale_method_overrides"), "scale_method_overrides")
    for key in per_method:
        if key not in methods:
            raise StudyConfigError(f"method_overrides.{key}: not one of the methods "
                                   f"({', '.join(methods)})")
    for key in per_pair:
        s, _, m = key.partition("/")
        if s not in scales or m not in methods:
            raise StudyConfigError(f"scale_method_overrides.{key}: expected <scale>/<method> "
                                   f"with a scale of {', '.join(scales)} and a method of "
                                   f"{', '.join(methods)}")
    out_dir = Path(out if out is not None else raw.get("out", f"runs/study/{path.stem}"))
    runs = []
    for scale, (preset, scale_over) in scales.items():
        for method, (method_file, method_over) in methods.items():
            run_dir = out_dir / scale / method
            overrides = [*common, *scale_over, *method_over,
                         *_strings(per_method.get(method), f"method_overrides.{method}"),
                         *_strings(per_pair.get(f"{scale}/{method}"),
                                   f"scale_method_overrides.{scale}/{method}"),
                         f"run_dir={run_dir}", f"seeds={seeds}"]
            files = (base, preset, method_file)
            try:
                cfg = load_config(list(files), overrides)
            except (ConfigError, ValueError, FileNotFoundError) as err:
                raise StudyConfigError(f"run {scale}/{method}: {err}") from None
            runs.append(RunSpec(scale, method, run_dir, files, tuple(overrides), int(cfg.steps)))
    downstream = _options(raw.get("downstream"), "downstream", _DOWNSTREAM)
    downstream.setdefault("tasks", ["builtin"])
    for key in ("tasks", "lm_eval_tasks"):
        if isinstance(downstream.get(key), str):
            downstream[key] = [downstream[key]]
    predictor = _options(raw.get("predictor"), "predictor", _PREDICTOR)
    if predictor.get("model", "linear") not in ("linear", "ridge"):
        raise StudyConfigError(f"predictor.model: expected linear or ridge, got "
                               f"{predictor['model']!r}")
    return Study(str(raw.get("name", path.stem)), out_dir, seeds, baseline, tuple(scales),
                 tuple(methods), tuple(runs), _analysis_options(raw.get("analysis")),
                 downstream, predictor, path)
