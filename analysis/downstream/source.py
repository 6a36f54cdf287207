"""Where a run's model, checkpoints, tokenizer and held-out text come from.

The one module of the downstream package that knows the run layout: it goes
through the public functions of :mod:`analysis.runs` (``open_run``,
``load_checkpoint``), :mod:`rundir.groups` (``expand``) and :mod:`train.data`
(``get_tokenizer``, ``load_tokens``), so a change of layout is adapted here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EvalInputError",
    "EvalRun",
    "expand_runs",
    "heldout_documents",
    "open_eval_run",
    "scoring_model",
    "select_steps",
]


class EvalInputError(ValueError):
    """A run or step that cannot be evaluated; one-line message."""


@dataclass
class EvalRun:
    """One run directory to evaluate.

    Attributes:
      path: the run directory (results go to ``path/downstream/``).
      name: its label (``<group>/seed_<s>`` for a member of a seed group).
      steps: its checkpoint steps, ascending.
      info: the :class:`analysis.runs.RunInfo`.
    """

    path: Path
    name: str
    steps: list[int]
    info: Any

    @property
    def data_config(self) -> Any:
        """The run's :class:`train.data.DataConfig`."""
        from train.config import config_from_dict

        return config_from_dict(self.info.config).data

    @property
    def seq_len(self) -> int:
        """The sequence length the run was trained at."""
        from train.config import config_from_dict

        return int(config_from_dict(self.info.config).seq_len)

    def tokenizer(self) -> Any:
        """The run's tokenizer (``data.tokenizer`` of its config)."""
        from train.data import get_tokenizer

        return get_tokenizer(self.data_config.tokenizer)


def expand_runs(run_dir: str | Path) -> list[tuple[Path, str | None]]:
    """``[(run directory, label or None)]`` behind one argument (a seed group per seed)."""
    from rundir.groups import expand

    return [(m.path, m.name) for m in expand(run_dir)]


def open_eval_run(path: str | Path, name: str | None = None) -> EvalRun:
    """Check ``path`` (checkpoints, readable config) without restoring anything.

    Raises:
      EvalInputError: no such directory, no checkpoints, an unreadable config.
    """
    from analysis.runs import AnalysisInputError, open_run

    try:
        info = open_run(path)
    except AnalysisInputError as err:
        raise EvalInputError(str(err)) from None
    return EvalRun(Path(info.path), name or info.name, list(info.steps), info)


def select_steps(run: EvalRun, steps: list[str]) -> list[int]:
    """The steps to evaluate: ``["final"]`` (default), ``["all"]`` or integers.

    Raises:
      EvalInputError: a requested step without a checkpoint, or an unknown word.
    """
    if not steps or steps == ["final"]:
        return [run.steps[-1]]
    if steps == ["all"]:
        return list(run.steps)
    out = []
    for s in steps:
        try:
            step = int(s)
        except ValueError:
            raise EvalInputError(f"--steps: {s!r} is not a step; give integers, 'final' or "
                                 "'all'") from None
        if step not in run.steps:
            raise EvalInputError(f"run {run.name!r} has no checkpoint at step {step} "
                                 f"(it has {run.steps}); pick one of those or 'final'")
        out.append(step)
    return sorted(set(out))


def scoring_model(run: EvalRun, step: int, max_length: int | None = None) -> Any:
    """Restore ``step`` of ``run`` as a :class:`analysis.downstream.scoring.ScoringModel`.

    ``max_length`` defaults to the run's training ``seq_len`` (capped by the model's
    ``max_seq_len``).

    Raises:
      EvalInputError: the checkpoint does not restore.
    """
    from analysis.downstream.scoring import ScoringModel
    from analysis.runs import AnalysisInputError, load_checkpoint

    try:
        ckpt = load_checkpoint(run.info, step)
    except AnalysisInputError as err:
        raise EvalInputError(str(err)) from None
    limit = int(getattr(ckpt.model, "max_seq_len", run.seq_len))
    length = min(int(max_length or run.seq_len), limit)
    tok = run.tokenizer()
    return ScoringModel(ckpt.graphdef, ckpt.params, ckpt.model_state, length,
                        int(tok.pad_id), int(tok.separator_id))


def heldout_documents(run: EvalRun) -> list[str]:
    """The texts of the run's validation split (never in its training split), decoded.

    Raises:
      EvalInputError: the run's data is not available here.
    """
    from train.data import CorpusUnavailableError, load_tokens

    try:
        split = load_tokens(run.data_config, "validation", run.tokenizer())
    except (CorpusUnavailableError, ValueError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalInputError(f"run {run.name!r}: its held-out text is not available ({first}); "
                             "the built-in tasks need the data it was trained on") from None
    sep = int(split.tokenizer.separator_id)
    docs = []
    for i in range(split.num_documents):
        ids = split.document(i)
        if ids.size and int(ids[-1]) == sep:
            ids = ids[:-1]
        docs.append(split.tokenizer.decode(ids))
    return docs
