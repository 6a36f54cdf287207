"""Multiple-choice tasks: the data model, the JSONL reader and the built-in offline suite.

A task is a list of :class:`Example` s, each a ``context``, its ``choices`` and the
index ``gold`` of the right one. The model scores ``choice`` as a continuation of
``context`` verbatim (no separator is inserted: a choice that should follow a
space starts with one, which is what lm-eval's default ``target_delimiter=" "``
amounts to).

JSONL files: one JSON object per line, ``{"context": str, "choices": [str, ...],
"gold": int}`` (at least two distinct choices, ``0 <= gold < len(choices)``); blank
lines are skipped. The task is named after the file (``piqa_dev.jsonl`` -> ``piqa_dev``);
its chance level is the mean of ``1 / len(choices)``.

Built-in suite (:data:`BUILTIN_TASKS`), generated deterministically from held-out
text, i.e. documents never in the training split (for the default corpus: the
validation documents of the Python 3.11 documentation, chosen by a hash of their
path). Text is read paragraph by paragraph (blank-line separated, whitespace
collapsed to single spaces); reST directives, tables and code (paragraphs with
fewer than 85% letters, spaces and common punctuation, or starting with ``..``)
are left out.

* ``heldout_continuation`` (chance 1/4, headline metric ``acc_mutual_info``): a
  ~``context_chars`` window of a paragraph, ending at a word boundary; the choices are
  the true next ~``continuation_chars`` characters and three spans of about the same
  length from *other* documents (from other paragraphs when there is only one
  document). How likely a span is on its own varies far more between spans than what
  the context adds at the junction, so plain ``acc`` / ``acc_norm`` stay near chance
  for small models; lm-eval's ``acc_mutual_info`` (the log-likelihood given the
  context minus the log-likelihood after an empty context) removes the span's own
  probability and is the metric to read.
* ``heldout_word_order`` (chance 1/2): a window of a paragraph; the choices are the
  next 6-8 words in their original order and the same words in a shuffled order
  (both choices have the same characters, so ``acc == acc_norm``).
* ``heldout_cloze`` (chance 1/4): the paragraph up to a word of at least 4 letters;
  the choices are that word and three other held-out words of the same length and
  capitalisation (``acc == acc_norm``).
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BUILTIN_CHANCE",
    "BUILTIN_TASKS",
    "Example",
    "Task",
    "TaskError",
    "build_builtin_task",
    "heldout_paragraphs",
    "load_jsonl_task",
]

BUILTIN_TASKS = ("heldout_continuation", "heldout_word_order", "heldout_cloze")
BUILTIN_CHANCE = {"heldout_continuation": 0.25, "heldout_word_order": 0.5,
                  "heldout_cloze": 0.25}

_PROSE = re.compile(r"[A-Za-z ,.;:'()\-]")
_WORD = re.compile(r"^[A-Za-z]+$")


class TaskError(ValueError):
    """A task that cannot be used (unknown name, malformed file, no text); one-line message."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice question.

    Attributes:
      context: the text the choices continue.
      choices: the candidate continuations (scored verbatim after ``context``).
      gold: index of the right choice.
    """

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    """A named list of examples.

    Attributes:
      name: the task's name (results are keyed by it).
      examples: the questions.
      chance: the accuracy of guessing uniformly at random.
      source: ``"builtin"`` or the JSONL file it was read from.
      metric: the task's headline metric (``"acc"``, ``"acc_norm"`` or
        ``"acc_mutual_info"``); every metric is reported, this one is the one to read.
      mutual_info: also score every choice after an empty context and report lm-eval's
        ``acc_mutual_info`` (argmax of ``log P(choice | context) - log P(choice)``).
    """

    name: str
    examples: tuple[Example, ...]
    chance: float
    source: str
    metric: str = "acc"
    mutual_info: bool = False

    @property
    def fingerprint(self) -> str:
        """A short hash of the examples: equal fingerprints mean the same questions."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps([ex.context, list(ex.choices), ex.gold]).encode())
        return h.hexdigest()[:16]


def _chance(examples: Sequence[Example]) -> float:
    return float(np.mean([1.0 / len(ex.choices) for ex in examples]))


def load_jsonl_task(path: str | Path, name: str | None = None) -> Task:
    """Read a task from a JSONL file of ``{"context", "choices", "gold"}`` objects.

    Raises:
      TaskError: the file is missing, empty, not JSON, or a line lacks a field / has
        a wrong type / a ``gold`` out of range (the message names the line).
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {str(path)!r} does not exist; pass a .jsonl file of "
                        '{"context", "choices", "gold"} lines or a built-in task name')
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            examples.append(_parse_line(path, lineno, line))
    if not examples:
        raise TaskError(f"task file {str(path)!r} holds no examples; write one JSON object "
                        'per line: {"context": "...", "choices": ["...", "..."], "gold": 0}')
    return Task(name or path.name.removesuffix(".jsonl"), tuple(examples), _chance(examples),
                str(path))


def _parse_line(path: Path, lineno: int, line: str) -> Example:
    where = f"task file {str(path)!r} line {lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise TaskError(f"{where} is not JSON ({err.msg}); write one JSON object per line") \
            from None
    if not isinstance(obj, dict):
        raise TaskError(f"{where} is not a JSON object; expected "
                        '{"context": str, "choices": [str, ...], "gold": int}')
    missing = [k for k in ("context", "choices", "gold") if k not in obj]
    if missing:
        raise TaskError(f"{where} lacks {', '.join(missing)}; expected "
                        '{"context": str, "choices": [str, ...], "gold": int}')
    context, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(context, str):
        raise TaskError(f"{where}: context must be a string, got {type(context).__name__}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)):
        raise TaskError(f"{where}: choices must be a list of at least two non-empty strings")
    if len(set(choices)) < len(choices):
        raise TaskError(f"{where}: choices must differ from each other")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise TaskError(f"{where}: gold must be an integer index in [0, {len(choices) - 1}], "
                        f"got {gold!r}")
    if not context and not choices[gold]:
        raise TaskError(f"{where}: context and the gold choice are both empty")
    return Example(context, tuple(choices), gold)


# ------------------------------------------------------------------ the built-in suite
def heldout_paragraphs(documents: Sequence[str], min_chars: int = 60) -> list[tuple[int, str]]:
    """``(document index, paragraph)`` for every prose paragraph of at least ``min_chars``.

    >>> heldout_paragraphs(["A short line.\\n\\n.. note::\\n\\nThis paragraph is long enough "
    ...                     "to be kept as prose text here."], min_chars=20)
    [(0, 'This paragraph is long enough to be kept as prose text here.')]
    """
    out = []
    for d, doc in enumerate(documents):
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            if len(text) < min_chars or text.startswith(".."):
                continue
            if len(_PROSE.findall(text)) < 0.85 * len(text):
                continue
            out.append((d, text))
    return out


def _rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), int(seed)])


def _boundary(text: str, pos: int) -> int:
    """The first space at or after ``pos`` (``len(text)`` when there is none)."""
    i = text.find(" ", pos)
    return len(text) if i < 0 else i


def _windows(paragraphs: list[tuple[int, str]], context_chars: int, tail_chars: int
             ) -> list[tuple[int, int, str, int]]:
    """Non-overlapping ``(doc, paragraph index, text from the window on, cut)`` windows:
    the cut is a word boundary after ``context_chars`` with at least ``tail_chars`` left."""
    out = []
    for p, (d, text) in enumerate(paragraphs):
        start = 0
        while True:
            cut = _boundary(text, start + context_chars)
            if cut + tail_chars > len(text):
                break
            out.append((d, p, text[start:], cut - start))
            start = _boundary(text, cut + tail_chars) + 1
            if start >= len(text):
                break
    return out


def _span(text: str, start: int, chars: int) -> str:
    """``text[start:end]`` starting at a space and ending before a word boundary."""
    end = _boundary(text, start + chars)
    return text[start:end]


def _continuation(paragraphs, rng, context_chars, continuation_chars, n):
    wins = _windows(paragraphs, context_chars, continuation_chars + 10)
    docs = {d for d, _ in paragraphs}
    out = []
    for i in rng.permutation(len(wins))[:n]:
        d, par, text, cut = wins[i]
        true = _span(text, cut, continuation_chars)
        pool = [w for w in wins if (w[0] != d if len(docs) > 1 else w[1] != par)]
        if len(pool) < 3:
            continue
        distract = []
        for j in rng.permutation(len(pool)):
            cand = _span(pool[j][2], pool[j][3], continuation_chars)
            if cand != true and cand not in distract:
                distract.append(cand)
            if len(distract) == 3:
                break
        if len(distract) < 3:
            continue
        gold = int(rng.integers(4))
        choices = distract[:gold] + [true] + distract[gold:]
        out.append(Example(text[:cut], tuple(choices), gold))
    return out


def _word_order(paragraphs, rng, context_chars, n):
    wins = _windows(paragraphs, context_chars, 40)
    out = []
    for i in rng.permutation(len(wins))[:n]:
        _, _, text, cut = wins[i]
        words = text[cut:].split()
        k = int(rng.integers(6, 9))
        if len(words) < k:
            continue
        words = words[:k]
        shuffled = list(words)
        for _ in range(10):
            rng.shuffle(shuffled)
            if shuffled != words:
                break
        if shuffled == words:
            continue
        gold = int(rng.integers(2))
        pair = [" " + " ".join(words), " " + " ".join(shuffled)]
        choices = pair if gold == 0 else pair[::-1]
        out.append(Example(text[:cut], tuple(choices), gold))
    return out


def _cloze(paragraphs, rng, context_chars, n):
    by_len: dict[tuple[int, bool], set[str]] = {}
    for _, text in paragraphs:
        for w in text.split():
            w = w.strip(".,;:()'")
            if _WORD.match(w) and len(w) >= 4:
                by_len.setdefault((len(w), w[0].isupper()), set()).add(w)
    vocab = {k: sorted(v) for k, v in by_len.items()}
    sites = []
    for _, text in paragraphs:
        for m in re.finditer(r" ([A-Za-z]{4,})(?=[ .,;:)])", text):
            if m.start() >= context_chars:
                sites.append((text, m.start(), m.group(1)))
    out = []
    for i in rng.permutation(len(sites)):
        if len(out) >= n:
            break
        text, at, word = sites[i]
        others = [w for w in vocab.get((len(word), word[0].isupper()), [])
                  if w.lower() != word.lower()]
        if len(others) < 3:
            continue
        distract = [others[j] for j in rng.choice(len(others), 3, replace=False)]
        gold = int(rng.integers(4))
        words = distract[:gold] + [word] + distract[gold:]
        context = text[max(0, at - context_chars):at]
        context = context[context.find(" ") + 1:] if at > context_chars else context
        out.append(Example(context, tuple(" " + w for w in words), gold))
    return out


def build_builtin_task(name: str, documents: Sequence[str], max_examples: int = 1000,
                       seed: int = 0, context_chars: int = 100, continuation_chars: int = 24
                       ) -> Task:
    """Generate the built-in task ``name`` from held-out ``documents`` (deterministic).

    Args:
      name: one of :data:`BUILTIN_TASKS`.
      documents: held-out texts (never in the training split), in a fixed order.
      max_examples: at most this many questions (fewer when the text runs out).
      seed: generation seed (with the task name).
      context_chars: about how many characters of context each question gives.
      continuation_chars: about how long a ``heldout_continuation`` choice is.

    Raises:
      TaskError: unknown name, or the documents yield no question.
    """
    if name not in BUILTIN_TASKS:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} "
                        "(or pass a .jsonl file)")
    paragraphs = heldout_paragraphs(documents, min_chars=context_chars // 2)
    rng = _rng(name, seed)
    if name == "heldout_continuation":
        examples = _continuation(paragraphs, rng, context_chars, continuation_chars,
                                 max_examples)
    elif name == "heldout_word_order":
        examples = _word_order(paragraphs, rng, context_chars, max_examples)
    else:
        examples = _cloze(paragraphs, rng, context_chars, max_examples)
    if not examples:
        raise TaskError(f"task {name!r}: the held-out text ({len(documents)} documents, "
                        f"{len(paragraphs)} prose paragraphs) yields no question; use a "
                        "corpus with more held-out prose or a .jsonl task")
    if name == "heldout_continuation":
        return Task(name, tuple(examples), BUILTIN_CHANCE[name], "builtin",
                    metric="acc_mutual_info", mutual_info=True)
    return Task(name, tuple(examples), BUILTIN_CHANCE[name], "builtin")
