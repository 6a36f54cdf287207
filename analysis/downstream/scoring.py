"""Zero-shot multiple-choice scoring: continuation log-likelihoods in batched, jitted JAX.

Conventions follow lm-evaluation-harness 0.4 (``lm_eval/api/model.py`` ``TemplateLM``,
``lm_eval/models/huggingface.py``) so that our numbers and lm-eval's agree:

* a request ``(context, continuation)`` is encoded as a whole, and the context's
  tokens are split off the front (trailing whitespace of the context moves to the
  continuation); an empty context is replaced by the separator token (the model's
  document boundary, lm-eval's ``prefix_token_id``);
* the model reads ``(context + continuation)[:-1]``, left-truncated to
  ``max_length`` tokens, and the log-probabilities of the continuation's tokens are
  summed; ``is_greedy`` is whether every continuation token is the argmax;
* multiple choice: ``acc`` = [argmax of the choices' log-likelihoods is gold],
  ``acc_norm`` = the same after dividing each log-likelihood by the choice's length
  in characters (lm-eval's ``completion_len``).

Compiles are few: rows are padded (right, with the pad id; the model is causal)
to a length bucket (powers of two from 16 up to ``max_length``) and batches to a
fixed ``batch_size``, so one program per bucket serves every task and checkpoint
of an architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "ScoringModel",
    "bootstrap_stderr",
    "choice_metrics",
    "encode_pair",
    "length_buckets",
    "loglikelihoods",
]


@dataclass(frozen=True)
class ScoringModel:
    """A restored model, ready to score.

    Attributes:
      graphdef / params / model_state: ``nnx.merge(graphdef, params, model_state)`` is the
        model in eval mode (dropout off).
      max_length: the longest input the model reads (the run's training ``seq_len``).
      pad_id: id used to pad rows (never scored).
      separator_id: the document separator, used as the context of an empty context.
    """

    graphdef: Any
    params: Any
    model_state: Any
    max_length: int
    pad_id: int
    separator_id: int


def encode_pair(encode: Callable[[str], Sequence[int]], context: str, continuation: str,
                separator_id: int) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-eval's ``TemplateLM`` splits them.

    >>> enc = lambda s: list(s.encode())
    >>> encode_pair(enc, "ab ", "c", 0)
    ([97, 98], [32, 99])
    >>> encode_pair(enc, "", "c", 0)
    ([0], [99])
    """
    if context == "":
        cont = [int(t) for t in encode(continuation)]
        if cont and cont[0] == separator_id:
            return cont[:1], cont[1:]
        return [separator_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = [int(t) for t in encode(context + continuation)]
    ctx = [int(t) for t in encode(context)]
    return whole[:len(ctx)], whole[len(ctx):]


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded row lengths: powers of two from ``smallest`` below ``max_length``, then it.

    >>> length_buckets(100), length_buckets(16)
    ([16, 32, 64, 100], [16])
    """
    out, n = [], smallest
    while n < max_length:
        out.append(n)
        n *= 2
    return [*out, max_length]


@partial(jax.jit, static_argnames=("graphdef",))
def _score_rows(graphdef: Any, params: Any, model_state: Any, tokens: jax.Array,
                targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of weighted target log-probs (B,), all weighted targets greedy (B,))``."""
    model = nnx.merge(graphdef, params, model_state)
    logits = model(tokens).astype(jnp.float32)                       # (B, L, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    scored = weights > 0
    return jnp.sum(jnp.where(scored, tok, 0.0), axis=-1), jnp.all(greedy | ~scored, axis=-1)


def _row(ctx: Sequence[int], cont: Sequence[int], max_length: int
         ) -> tuple[list[int], list[int], int]:
    if not cont:
        raise ValueError("a continuation encodes to no token; every choice must be non-empty")
    if len(cont) > max_length:
        raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's "
                         f"max_length {max_length}; shorten the choices")
    whole = [*ctx, *cont][-(max_length + 1):]
    return whole[:-1], whole[1:], len(cont)


def loglikelihoods(model: ScoringModel, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   batch_size: int = 32, progress: Callable[[int], None] | None = None
                   ) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), is_greedy)`` for every ``(context ids, continuation ids)``.

    Args:
      model: the restored model.
      requests: token ids; the context is non-empty (see :func:`encode_pair`).
      batch_size: rows per compiled call (memory: ``batch_size * bucket * vocab`` floats).
      progress: called with the number of requests finished after each batch.

    Returns:
      One ``(float, bool)`` per request, in order.

    Raises:
      ValueError: an empty continuation, or one longer than ``model.max_length``.
    """
    rows = [_row(ctx, cont, model.max_length) for ctx, cont in requests]
    buckets = length_buckets(model.max_length)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    by_bucket: dict[int, list[int]] = {}
    for i, (inp, _, _) in enumerate(rows):
        size = next(b for b in buckets if b >= len(inp))
        by_bucket.setdefault(size, []).append(i)
    for size, idx in sorted(by_bucket.items()):
        idx = sorted(idx, key=lambda i: -len(rows[i][0]))
        for start in range(0, len(idx), batch_size):
            chunk = idx[start:start + batch_size]
            tokens = np.full((batch_size, size), model.pad_id, np.int32)
            targets = np.zeros((batch_size, size), np.int32)
            weights = np.zeros((batch_size, size), np.float32)
            for r, i in enumerate(chunk):
                inp, tgt, n_cont = rows[i]
                tokens[r, :len(inp)] = inp
                targets[r, :len(tgt)] = tgt
                weights[r, len(tgt) - n_cont:len(tgt)] = 1.0
            sums, greedy = jax.device_get(_score_rows(model.graphdef, model.params,
                                                      model.model_state, tokens, targets,
                                                      weights))
            for r, i in enumerate(chunk):
                out[i] = (float(sums[r]), bool(greedy[r]))
            if progress is not None:
                progress(len(chunk))
    return out


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int,
                   unconditional: Sequence[float] | None = None) -> dict[str, float]:
    """lm-eval's ``acc``, ``acc_norm`` (and ``acc_mutual_info``) of one question.

    As ``lm_eval/api/task.py`` (``process_results``, multiple choice): ``acc_norm``
    divides each log-likelihood by ``len(choice)`` in characters; with the choices'
    log-likelihoods after an empty context (``unconditional``), ``acc_mutual_info``
    takes the argmax of ``lls - unconditional``.

    >>> choice_metrics([-3.0, -4.0], [" a", " bbbb"], 1)
    {'acc': 0.0, 'acc_norm': 1.0}
    >>> choice_metrics([-3.0, -4.0], [" a", " b"], 1, unconditional=[-1.0, -5.0])
    {'acc': 0.0, 'acc_norm': 0.0, 'acc_mutual_info': 1.0}
    """
    lls = np.asarray(lls, np.float64)
    lengths = np.asarray([float(len(c)) for c in choices])
    out = {"acc": float(np.argmax(lls) == gold),
           "acc_norm": float(np.argmax(lls / lengths) == gold)}
    if unconditional is not None:
        mi = lls - np.asarray(unconditional, np.float64)
        out["acc_mutual_info"] = float(np.argmax(mi) == gold)
    return out


def bootstrap_stderr(values: Sequence[float], iters: int = 1000, seed: int = 0) -> float:
    """Standard deviation of the mean of ``values`` over ``iters`` resamples with replacement.

    The questions are resampled (``numpy.random.default_rng(seed)``), as the paper's
    ``bootstrap_iters=1000``; NaN for fewer than two values.

    >>> round(bootstrap_stderr([0.0, 1.0] * 200, iters=2000), 3)
    0.025
    """
    x = np.asarray(values, np.float64)
    if x.size < 2 or iters < 1:
        return float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for start in range(0, iters, 256):
        n = min(256, iters - start)
        means[start:start + n] = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    return float(means.std(ddof=1))
