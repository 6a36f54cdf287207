"""Downstream zero-shot evaluation of trained runs (``lowrank-eval``) and its results.

* :mod:`~analysis.downstream.tasks` -- multiple-choice tasks: JSONL files and the
  built-in offline suite generated from held-out text;
* :mod:`~analysis.downstream.scoring` -- batched, jitted continuation log-likelihoods
  and lm-eval's ``acc`` / ``acc_norm``;
* :mod:`~analysis.downstream.source` -- the run, checkpoint, tokenizer and held-out text
  (the one module that knows the run layout);
* :mod:`~analysis.downstream.results` -- ``<run>/downstream/step_<N>.json``, written and
  read (:func:`read_downstream`, what ``lowrank-analyze`` calls);
* :mod:`~analysis.downstream.cli` -- ``lowrank-eval``;
* :mod:`~analysis.downstream.lm_eval_model` -- the model registered with
  lm-evaluation-harness as ``lowrank-jax`` (extra ``lm-eval``), run through
  :mod:`~analysis.downstream.lm_eval_cli` (``lowrank-lm-eval``).

Importing this package imports neither JAX nor lm-eval.
"""

from analysis.downstream.results import (
    DownstreamResultsError,
    mean_accuracy,
    read_downstream,
    result_path,
)

__all__ = ["DownstreamResultsError", "mean_accuracy", "read_downstream", "result_path"]
