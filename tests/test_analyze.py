"""``lowrank-analyze`` end to end on tiny runs: outputs, agreement with the library, cache, bad input."""

from __future__ import annotations

import csv
import functools
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_support import analysis_run_overrides, write_corpus

from analysis import runs as R
from analysis.cli import main as analyze
from lowrank_jax import metrics as M
from train.checkpoint import CheckpointStore
from train.cli import main as train
from train.config import config_from_dict
from train.step import build_trainer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "low",
         "rank", "gradient", "projection", "keeps", "optimizer", "memory", "small", "and"]
FAST = ["--directions", "2", "--alpha-points", "5", "--interp-points", "3", "--sequences", "4",
        "--topk", "2", "--topk-steps", "final", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze")
    corpus = write_corpus(root / "corpus", WORDS, docs=24, seed=0, words_per_doc=200)
    common = analysis_run_overrides(root, corpus)
    specs = {
        "adamw": ["optimizer.name=adamw", "optimizer.lr=0.003", "steps=6", "checkpoint.every=2"],
        # checkpoints at 3 and 6: step 3 is missing in the baseline
        "sara": ["optimizer.name=sara_adamw", "optimizer.lr=0.01", "steps=6",
                 "checkpoint.every=3"],
        # another architecture (one layer)
        "onelayer": ["optimizer.name=adamw", "steps=2", "checkpoint.every=2",
                     "model.overrides.num_layers=1"],
    }
    out = {}
    for name, args in specs.items():
        out[name] = root / name
        assert train([*common, *args, f"run_dir={out[name]}"]) == 0
    empty = root / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    out["empty"] = empty
    out["root"] = root
    return out


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [dict(r, step=int(r["step"]), value=float(r["value"])) for r in csv.DictReader(f)]


def _value(rows, run, step, metric, layer="all") -> float:
    hits = [r["value"] for r in rows if (r["run"], r["step"], r["metric"], r["layer"])
            == (run, step, metric, layer)]
    assert len(hits) == 1, (run, step, metric, layer, hits)
    return hits[0]


def _restore_final(run_dir: Path):
    """The newest checkpoint through lowrank-train's own restore (independent of analysis/)."""
    cfg_dict = CheckpointStore(run_dir / "checkpoints", config_from_dict({}).checkpoint)
    steps = cfg_dict.all_steps()
    raw = cfg_dict.read_config(steps[-1])
    cfg_dict.close()
    cfg = config_from_dict(raw)
    trainer = build_trainer(cfg)
    store = CheckpointStore(run_dir / "checkpoints", cfg.checkpoint)
    restored = store.restore_latest(trainer.abstract_state)
    store.close()
    return cfg, trainer, restored.state


@pytest.fixture(scope="module")
def analysed(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    code = analyze([str(runs["sara"]), str(runs["onelayer"]),
                    str(runs["empty"]), str(runs["root"] / "no_such_run"),
                    "--baseline", str(runs["adamw"]), "--out", str(out), *FAST])
    return code, out


def test_outputs_exist_and_agree(analysed):
    code, out = analysed
    assert code == 0
    for name in ("metrics.csv", "metrics.json", "report.html", "landscape_profiles.png",
                 "sharpness_over_steps.png", "barrier_matrices.png", "spectra_over_steps.png",
                 "activation_heatmaps.png", "subspace_overlap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = _rows(out / "metrics.csv")
    payload = json.loads((out / "metrics.json").read_text())
    assert len(payload["rows"]) == len(rows)
    for a, b in zip(rows, payload["rows"]):
        assert (a["run"], a["step"], a["metric"], a["layer"]) == \
            (b["run"], b["step"], b["metric"], b["layer"])
        assert a["value"] == pytest.approx(b["value"], nan_ok=True)
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<h2>Findings</h2>" in html
    assert "src='http" not in html                           # self-contained
    assert {r["name"] for r in payload["runs"]} == {"adamw", "sara", "onelayer"}


def test_values_match_direct_library_calls(runs, analysed):
    _, out = analysed
    rows = _rows(out / "metrics.csv")
    cfg, trainer, state = _restore_final(runs["sara"])
    _, _, base = _restore_final(runs["adamw"])
    step = 6

    # the parameter norm, in float64 NumPy
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(
        state.params)))
    assert _value(rows, "sara", step, "param_norm") == pytest.approx(norm, rel=1e-9)

    # spectra of the final weights
    spectra = M.matrix_spectra(state.params)
    assert _value(rows, "sara", step, "w_effective_rank", "mean") == pytest.approx(
        spectra["mean"]["effective_rank"], rel=1e-5)
    for name, vals in spectra["per_matrix"].items():
        assert _value(rows, "sara", step, "w_stable_rank", name) == pytest.approx(
            vals["stable_rank"], rel=1e-5)

    # the evaluation batch: the run's validation split, as train/loop.py builds it
    from train.data import build_batches
    raw = next(iter(build_batches(cfg.data, split="validation", seq_len=cfg.seq_len,
                                  batch_size=4, seed=cfg.seed, num_batches=1)))
    batch = {k: jnp.asarray(v) for k, v in raw.items()}
    gd, _, ms = nnx.split(nnx.eval_shape(lambda: _tiny_model(trainer)), nnx.Param, ...)
    loss = lambda p, b: _loss(gd, ms, p, b)

    # landscape with the same seed and grid
    alphas = np.linspace(-0.003, 0.003, 5).astype(np.float32)
    dirs = M.random_directions(jax.random.key(0), state.params, 2)
    curves = np.asarray(M.landscape_1d(loss, state.params, dirs, alphas, batch))
    assert _value(rows, "sara", step, "sharpness") == pytest.approx(
        float(M.expected_sharpness(curves.mean(0), 2)), rel=1e-4, abs=1e-6)
    assert _value(rows, "sara", step, "val_loss") == pytest.approx(
        float(loss(state.params, batch)[0]), rel=1e-5)

    # IMBH on the straight path baseline -> run
    path = M.interpolate_losses(loss, base.params, state.params, batch, 3)
    assert _value(rows, "sara", step, "imbh") == pytest.approx(float(M.barrier_height(path)),
                                                               rel=1e-4, abs=1e-6)

    # activations after the final norm: logits = final_norm(x) @ lm_head
    model = nnx.merge(gd, state.params, ms)
    bmodel = nnx.merge(gd, base.params, ms)
    tokens = batch["tokens"][:, :-1]

    def final(m):
        x = m.embed(tokens)
        for block in m.layers:
            x = block(x)
        return np.asarray(m.final_norm(x)).reshape(-1, x.shape[-1])

    xa, xb = final(model), final(bmodel)
    np.testing.assert_allclose(xa @ np.asarray(model.lm_head.kernel[...]),
                               np.asarray(model(tokens)).reshape(xa.shape[0], -1),
                               rtol=1e-3, atol=1e-3)
    xa_c, xb_c = xa - xa.mean(0), xb - xb.mean(0)
    cka = np.linalg.norm(xb_c.T @ xa_c) ** 2 / (np.linalg.norm(xa_c.T @ xa_c)
                                                * np.linalg.norm(xb_c.T @ xb_c))
    assert _value(rows, "sara", step, "act_cka", "final_norm") == pytest.approx(cka, rel=1e-3)

    # the barrier-matrix cell (adamw, sara) is the same straight path
    assert _value(rows, "adamw", step, "imbh_pair", "sara") == pytest.approx(
        _value(rows, "sara", step, "imbh"), rel=1e-6)

    # telemetry rows equal metrics.jsonl's overlap_mean lines
    lines = [json.loads(x) for x in (runs["sara"] / "metrics.jsonl").read_text().splitlines()]
    tele = {r["step"]: r["overlap_mean"] for r in lines if "overlap_mean" in r}
    assert tele
    for t, v in tele.items():
        assert _value(rows, "sara", t, "telemetry_overlap", "mean") == pytest.approx(v)


def _tiny_model(trainer):
    from lowrank_jax.models import Llama

    m = Llama(trainer.model_cfg, rngs=nnx.Rngs(0))
    m.eval()
    return m


def _loss(gd, ms, params, batch):
    from lowrank_jax.models.llama import next_token_loss

    return next_token_loss(nnx.merge(gd, params, ms), batch)


def test_problems_reported_and_rest_produced(analysed):
    _, out = analysed
    payload = json.loads((out / "metrics.json").read_text())
    problems = "\n".join(payload["problems"])
    assert "no_such_run" in problems and "no such directory" in problems
    assert "empty' has no checkpoints" in problems
    assert "different architectures" in problems and "num_layers 1 vs 2" in problems
    assert "no checkpoint at step 3" in problems and "'sara'" in problems
    rows = _rows(out / "metrics.csv")
    # the mismatched run is still analysed on its own, but never compared
    assert any(r["run"] == "onelayer" and r["metric"] == "sharpness" for r in rows)
    assert not any(r["run"] == "onelayer" and r["metric"].startswith("act_") for r in rows)
    # sara: compared at step 6, not at step 3 (which the baseline lacks), but analysed there
    assert any(r["run"] == "sara" and r["step"] == 6 and r["metric"] == "imbh" for r in rows)
    assert not any(r["run"] == "sara" and r["step"] == 3 and r["metric"] == "imbh"
                   for r in rows)
    assert any(r["run"] == "sara" and r["step"] == 3 and r["metric"] == "sharpness"
               for r in rows)
    html = (out / "report.html").read_text()
    assert "no such directory" in html and "different architectures" in html


@pytest.mark.slow
def test_second_call_is_served_from_the_cache(runs, analysed, monkeypatch, capsys):
    _, out = analysed
    before = (out / "metrics.csv").read_text()

    def no_loading(*args, **kwargs):
        raise AssertionError("a checkpoint was restored although every unit is cached")

    monkeypatch.setattr(R, "load_checkpoint", no_loading)
    code = analyze([str(runs["sara"]), str(runs["onelayer"]),
                    str(runs["empty"]), str(runs["root"] / "no_such_run"),
                    "--baseline", str(runs["adamw"]), "--out", str(out), *FAST])
    assert code == 0
    assert "0 unit(s) computed" in capsys.readouterr().out
    assert (out / "metrics.csv").read_text() == before


@pytest.mark.slow
def test_changed_settings_miss_the_cache(runs, tmp_path, capsys):
    out = tmp_path / "o"
    args = [str(runs["sara"]), "--baseline", str(runs["adamw"]), "--out", str(out), *FAST]
    assert analyze([*args, "--steps", "6"]) == 0
    assert "10 unit(s) computed, 0 from the cache" in capsys.readouterr().out
    assert analyze([*args, "--steps", "6", "--seed", "1"]) == 0
    # only the two random-direction landscape units (one per run) depend on the seed;
    # the other eight units (top-k PCA directions included) do not
    assert "2 unit(s) computed, 8 from the cache" in capsys.readouterr().out


def test_no_readable_run_exits_2(tmp_path, capsys):
    assert analyze([str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "lowrank-train" in err
    assert not (tmp_path / "o" / "report.html").exists()     # checked before any work


def test_bad_settings_one_line(tmp_path, capsys):
    assert analyze([str(tmp_path), "--out", str(tmp_path / "o"), "--alpha-points", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--alpha-points must be odd" in err[0]


def test_cola_is_excluded_from_imbh(runs):
    base = R.open_run(runs["adamw"])
    cola = R.open_run(runs["adamw"])
    cola.model = cola.model.replace(linear="cola")
    cola.name = "cola_run"
    from analysis.units.comparison import imbh_skip_reason

    msg = imbh_skip_reason(cola, base)
    assert msg is not None and "cola_run" in msg and "CoLA" in msg and "IMBH" in msg
    assert imbh_skip_reason(base, base) is None


@pytest.mark.slow
def test_old_checkpoint_layout_restores(runs, tmp_path):
    """A run copied elsewhere restores through the saved config and gives finite metrics."""
    dst = tmp_path / "copy"
    shutil.copytree(runs["adamw"], dst)
    run = R.open_run(dst)
    ckpt = R.load_checkpoint(run, run.steps[-1])
    loss = ckpt.loss_fn()(ckpt.params, ckpt.loss_inputs(
        {"tokens": jnp.zeros((2, 9), jnp.int32), "mask": jnp.ones((2, 8))}))[0]
    assert math.isfinite(float(loss))
    fn = functools.partial(R.load_checkpoint, run)
    with pytest.raises(R.AnalysisInputError, match="no checkpoint at step 999"):
        fn(999)
