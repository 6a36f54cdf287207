"""A trained run as an lm-evaluation-harness model, registered as ``lowrank-jax``.

Needs the ``lm-eval`` extra (``pip install 'lowrank-jax[lm-eval]'``, lm-eval 0.4.x).
Model arguments (``--model_args run_dir=...,step=...``):

* ``run_dir``: a run written by ``lowrank-train`` (one seed of a seed group);
* ``step``: a checkpoint step, or ``final`` (default);
* ``max_length``: the longest input in tokens (default: the run's ``seq_len``);
* ``batch_size``: rows per compiled call (lm-eval's ``--batch_size``; default 16,
  ``auto`` means the default).

Log-likelihoods come from :func:`analysis.downstream.scoring.loglikelihoods` (the
same batched, jitted scorer as ``lowrank-eval``), so multiple-choice tasks give the
numbers ``lowrank-eval`` gives on the same questions. ``loglikelihood_rolling``
(perplexity tasks) uses lm-eval's disjoint rolling windows of ``max_length``
tokens. Generation (``generate_until``) is not offered.

Discovery: lm-eval 0.4 finds a model by name in its registry
(``lm_eval.api.registry.model_registry``), filled with its own models when
``lm_eval.models`` is imported and with any class decorated by
``@register_model`` in a module that has been imported; it reads no entry-point
group. Our model is therefore registered (lazily, by ``module:Class`` path) by
:mod:`analysis.downstream.lm_eval_cli`, which then runs lm-eval's own CLI:
``lowrank-lm-eval --model lowrank-jax --model_args run_dir=runs/x --tasks piqa``
(or ``python -m analysis.downstream.lm_eval_cli ...``) takes exactly ``lm_eval``'s
arguments. From Python, ``import analysis.downstream.lm_eval_model`` registers it
for ``lm_eval.simple_evaluate(model="lowrank-jax", ...)``.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:                          # pragma: no cover - depends on the extra
    raise ImportError("the lowrank-jax model for lm-evaluation-harness needs the lm-eval "
                      "extra: pip install 'lowrank-jax[lm-eval]'") from err

from analysis.downstream.scoring import loglikelihoods
from analysis.downstream.source import open_eval_run, scoring_model, select_steps

__all__ = ["MODEL_NAME", "LowrankJaxLM"]

MODEL_NAME = "lowrank-jax"


@register_model(MODEL_NAME)
class LowrankJaxLM(TemplateLM):
    """lm-eval's view of one checkpoint of a ``lowrank-train`` run (see the module doc)."""

    def __init__(self, run_dir: str, step: str | int = "final", max_length: int | None = None,
                 batch_size: int | str | None = 16, **kwargs: Any) -> None:
        super().__init__()
        self._run = open_eval_run(run_dir)
        self._step = select_steps(self._run, [str(step)])[0]
        self._model = scoring_model(self._run, self._step,
                                    None if max_length is None else int(max_length))
        self._tokenizer = self._run.tokenizer()
        self._batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith(
            "auto") else int(batch_size)

    @property
    def eot_token_id(self) -> int:
        return int(self._model.separator_id)

    @property
    def max_length(self) -> int:
        return int(self._model.max_length)

    @property
    def tokenizer_name(self) -> str:
        return str(self._run.data_config.tokenizer)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(string)]

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self._tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        out = loglikelihoods(self._model, [(ctx, cont) for _, ctx, cont in requests],
                             batch_size=self._batch_size)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owners.append(i)
        scores = loglikelihoods(self._model, windows, batch_size=self._batch_size)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "the lowrank-jax model scores log-likelihoods only (multiple-choice and perplexity "
            "tasks); generation tasks are not supported")

    def get_model_info(self) -> dict[str, Any]:
        return {"run_dir": str(self._run.path), "step": self._step,
                "max_length": self.max_length, "tokenizer": self.tokenizer_name}
