"""Downstream evaluation: tasks, the scorer against a plain forward pass, results, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analysis.downstream import read_downstream
from analysis.downstream.cli import main as lowrank_eval
from analysis.downstream.results import (
    DownstreamResultsError,
    mean_accuracy,
    result_path,
    write_step_results,
)
from analysis.downstream.scoring import (
    ScoringModel,
    bootstrap_stderr,
    choice_metrics,
    encode_pair,
    loglikelihoods,
)
from analysis.downstream.tasks import (
    BUILTIN_CHANCE,
    BUILTIN_TASKS,
    TaskError,
    build_builtin_task,
    load_jsonl_task,
)
from lowrank_jax.models import Llama, get_preset
from train.data import ByteTokenizer

PROSE = ("The optimizer keeps a small projected state for every matrix of the model, and "
         "the projection is refreshed every few hundred steps so that the subspace follows "
         "the gradient. When the rank is large enough the loss curve matches the full "
         "optimizer closely, while the memory of its moments shrinks by the ratio of the rank "
         "to the width of the layer. ")


def _documents(n: int = 4) -> list[str]:
    rng = np.random.default_rng(0)
    words = PROSE.split()
    docs = []
    for d in range(n):
        paras = [" ".join(rng.choice(words, size=60)) + "." for _ in range(4)]
        docs.append(f".. note:: directive {d}\n\n" + "\n\n".join(paras))
    return docs


# ---------------------------------------------------------------- tasks
@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_builtin_tasks_are_deterministic_and_well_formed(name):
    docs = _documents()
    task = build_builtin_task(name, docs, max_examples=40)
    again = build_builtin_task(name, docs, max_examples=40)
    assert task.fingerprint == again.fingerprint and task.chance == BUILTIN_CHANCE[name]
    assert build_builtin_task(name, docs, max_examples=40, seed=1).fingerprint != \
        task.fingerprint
    assert 5 <= len(task.examples) <= 40
    text = " ".join(" ".join(d.split()) for d in docs)
    n_choices = {"heldout_continuation": 4, "heldout_word_order": 2, "heldout_cloze": 4}[name]
    golds = set()
    for ex in task.examples:
        assert len(ex.choices) == n_choices and len(set(ex.choices)) == n_choices
        assert ex.context and all(c.startswith(" ") for c in ex.choices)
        assert "directive" not in ex.context                   # reST directives left out
        golds.add(ex.gold)
        true = ex.context + ex.choices[ex.gold]
        assert true in text, true                              # the gold is the real text
        if name != "heldout_continuation":
            wrong = [c for i, c in enumerate(ex.choices) if i != ex.gold]
            assert all(sorted(w) == sorted(ex.choices[ex.gold]) or
                       len(w) == len(ex.choices[ex.gold]) for w in wrong)
        if name == "heldout_word_order":
            assert sorted(ex.choices[0].split()) == sorted(ex.choices[1].split())
    assert len(golds) > 1                                      # the gold position varies
    assert (task.metric, task.mutual_info) == (
        ("acc_mutual_info", True) if name == "heldout_continuation" else ("acc", False))


def test_continuation_distractors_come_from_other_documents():
    docs = _documents()
    task = build_builtin_task("heldout_continuation", docs, max_examples=30)
    flat = [" ".join(d.split()) for d in docs]
    for ex in task.examples:
        home = [i for i, d in enumerate(flat) if ex.context + ex.choices[ex.gold] in d]
        for i, c in enumerate(ex.choices):
            if i != ex.gold:
                assert not any(ex.context + c in flat[h] for h in home)


def test_builtin_task_errors():
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        build_builtin_task("nope", _documents())
    with pytest.raises(TaskError, match="yields no question"):
        build_builtin_task("heldout_cloze", [".. only directives", "x = 1"])


def _write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_jsonl_tasks(tmp_path):
    good = _write(tmp_path / "mini.jsonl", [
        {"context": "The cat", "choices": [" sat", " flew", " ran"], "gold": 0}, "",
        {"context": "Up", "choices": [" down", " left"], "gold": 1}])
    task = load_jsonl_task(good)
    assert task.name == "mini" and len(task.examples) == 2
    assert task.chance == pytest.approx((1 / 3 + 1 / 2) / 2)
    bad = {
        "is not JSON": ["{oops"],
        "lacks gold": [{"context": "a", "choices": ["b", "c"]}],
        "at least two": [{"context": "a", "choices": ["b"], "gold": 0}],
        r"gold must be an integer index in \[0, 1\]": [
            {"context": "a", "choices": ["b", "c"], "gold": 2}],
        "must differ": [{"context": "a", "choices": ["b", "b"], "gold": 0}],
        "holds no examples": [""],
        "context must be a string": [{"context": 3, "choices": ["b", "c"], "gold": 0}],
    }
    for i, (message, lines) in enumerate(bad.items()):
        with pytest.raises(TaskError, match=message):
            load_jsonl_task(_write(tmp_path / f"bad{i}.jsonl", lines))
    with pytest.raises(TaskError, match="does not exist"):
        load_jsonl_task(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- scoring
def test_encode_pair_follows_lm_eval():
    enc = ByteTokenizer().encode
    ctx, cont = encode_pair(enc, "Hello  ", "world", 0)
    assert bytes(ctx) == b"Hello" and bytes(cont) == b"  world"
    assert encode_pair(enc, "", "ab", 0) == ([0], [97, 98])
    assert encode_pair(enc, "", "\0ab", 0) == ([0], [97, 98])


@pytest.fixture(scope="module")
def tiny_model() -> ScoringModel:
    model = Llama(get_preset("llama_tiny"), rngs=nnx.Rngs(1))
    model.eval()
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    return ScoringModel(graphdef, params, state, max_length=40, pad_id=0, separator_id=0)


@jax.jit
def _plain_logits(params, state, tokens):
    return nnx.merge(_GRAPHDEF[0], params, state)(tokens)


_GRAPHDEF: list = []


def _reference_loglikelihood(m: ScoringModel, ctx, cont) -> tuple[float, bool]:
    """One unpadded forward pass per request, NumPy log-softmax (independent of the batching)."""
    whole = [*ctx, *cont][-(m.max_length + 1):]
    inp, tgt = np.asarray(whole[:-1]), np.asarray(whole[1:])
    _GRAPHDEF[:] = [m.graphdef]
    logits = np.asarray(_plain_logits(m.params, m.model_state,
                                      jnp.asarray(inp[None], jnp.int32))[0], np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    n = len(cont)
    picked = logp[np.arange(len(tgt)), tgt][-n:]
    greedy = bool(np.all(logits.argmax(-1)[-n:] == tgt[-n:]))
    return float(picked.sum()), greedy


@pytest.mark.slow
def test_loglikelihoods_match_unbatched_forward(tiny_model):
    rng = np.random.default_rng(0)
    # unpadded lengths 12 (five splits of 13 tokens) and 40 (two truncated requests)
    shapes = [(12, 1), (9, 4), (11, 2), (5, 8), (1, 12), (50, 5), (38, 7)]
    requests = [(list(rng.integers(1, 256, size=c)), list(rng.integers(1, 256, size=k)))
                for c, k in shapes]
    got = loglikelihoods(tiny_model, requests, batch_size=3)   # 2 buckets, partial batches
    assert len(got) == len(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        want, want_greedy = _reference_loglikelihood(tiny_model, ctx, cont)
        assert ll == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert greedy == want_greedy
    # a continuation that is the model's own greedy choice is greedy
    ctx = list(rng.integers(1, 256, size=12))
    logits = _plain_logits(tiny_model.params, tiny_model.model_state,
                           jnp.asarray([ctx], jnp.int32))
    best = int(jnp.argmax(logits[0, -1]))
    both = loglikelihoods(tiny_model, [(ctx[:-1], [ctx[-1], best]), (ctx, [best])],
                          batch_size=3)
    assert both[0][1] is bool(int(jnp.argmax(logits[0, -2])) == ctx[-1])
    assert both[1][1] is True
    with pytest.raises(ValueError, match="longer than the model's max_length"):
        loglikelihoods(tiny_model, [([1], list(range(1, 45)))])


def test_choice_metrics_and_bootstrap():
    assert choice_metrics([-1.0, -2.0, -0.5], ["a", "b", "c"], 2) == {"acc": 1.0,
                                                                     "acc_norm": 1.0}
    # length normalisation flips the choice: -6/8 > -2/2
    assert choice_metrics([-2.0, -6.0], [" x", " xxxxxxx"], 1) == {"acc": 0.0,
                                                                   "acc_norm": 1.0}
    x = np.r_[np.ones(300), np.zeros(700)]
    se = bootstrap_stderr(x, iters=2000, seed=3)
    assert se == pytest.approx(np.sqrt(0.3 * 0.7 / 1000), rel=0.1)
    assert bootstrap_stderr(x, iters=500, seed=3) == bootstrap_stderr(x, iters=500, seed=3)
    assert bootstrap_stderr(np.ones(50)) == 0.0 and math.isnan(bootstrap_stderr([1.0]))


# ---------------------------------------------------------------- results files
def _result(acc):
    return {"acc": acc, "acc_stderr": 0.01, "acc_norm": acc, "acc_norm_stderr": 0.01,
            "chance": 0.25, "n": 100}


def test_results_merge_and_read(tmp_path):
    run = tmp_path / "run"
    assert read_downstream(run) == {}
    write_step_results(run, 20, "run", {"a": _result(0.5)})
    write_step_results(run, 20, "run", {"b": _result(0.7)})
    write_step_results(run, 10, "run", {"a": _result(0.3)})
    got = read_downstream(run)
    assert list(got) == [10, 20] and sorted(got[20]["tasks"]) == ["a", "b"]
    assert mean_accuracy(got[20]) == pytest.approx(0.6)
    assert math.isnan(mean_accuracy(got[10], ["a", "b"]))
    result_path(run, 30).write_text("{not json")
    with pytest.raises(DownstreamResultsError, match="step_30.json: unreadable"):
        read_downstream(run)
    result_path(run, 30).write_text(json.dumps({"tasks": {"a": {"acc": 1.0}}}))
    with pytest.raises(DownstreamResultsError, match="lacks acc_stderr"):
        read_downstream(run)


# ---------------------------------------------------------------- CLI errors (nothing restored)
def test_cli_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    bad = _write(tmp_path / "bad.jsonl", ["{oops"])
    cases = [
        ([str(empty)], "has no checkpoints"),
        ([str(empty), "--tasks", "piqa"], "unknown task 'piqa'"),
        ([str(empty), "--tasks", str(bad)], "bad.jsonl' line 1 is not JSON"),
        ([str(tmp_path / "nowhere")], "nowhere' does not exist"),
        ([str(empty), "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for argv, message in cases:
        assert lowrank_eval(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    jax.clear_caches()
