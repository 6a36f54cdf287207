"""The study's metrics against NumPy re-statements of the reference's formulas (slow: trains
tiny AdamW, ReLoRA and SLTrain runs and analyses them twice).

Reference: NamrataRShivagunde/low-rank-geometry, ``loss-landscape/scripts/``:

* CCBH interpolates every ``named_parameters()`` tensor, ReLoRA's frozen base included
  (``single_checkpoint_scripts/7_1d_interpolation.py`` ``_interpolate_and_eval``:
  ``p.copy_((1 - alpha) * baseline + alpha * target)`` for every named parameter);
* random directions perturb every named parameter (``LLMLandscape``'s direction over
  ``model.named_parameters()``, frozen ReLoRA weight included);
* top-k directions ``sigma_k u_k v_k^T`` of every 2-D named parameter, ``k`` clamped
  (``3b_landscape_2d_pca_topk_components_variants.py`` l.113-120), grid
  ``np.arange(-0.05, 0.0501, 0.004)`` (``bash_scripts/pca_top20_60m.sh``), sharpness at
  ``len // 2`` with ``min(c, n - 1 - c)`` pairs and ``np.var`` over components
  (``4b_pca_aggregate_subsets.py`` ``compute_sharpness``, l.22-60 and l.102-104);
* spectra of the stored matrices (``5_ranks.py``: every 2-D named parameter of the
  attention/MLP modules, statistics over ``s > 1e-12``, l.71-125), update norms
  (``5_ranks_updates.py``);
* relative L2 = mean per-position distance / mean baseline norm
  (``6_activations_comparison.py`` ``_compute_metrics``).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_support import analysis_run_overrides, saved_state, write_corpus

from analysis.cli import main as analyze
from train.cli import main as train
from train.config import config_from_dict
from train.step import build_trainer

pytestmark = pytest.mark.slow

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "low",
         "rank", "gradient", "projection", "keeps", "optimizer", "memory", "small", "and"]
FAST = ["--directions", "1", "--alpha-points", "5", "--interp-points", "3", "--sequences", "4",
        "--topk", "3", "--no-progress"]
TOL = 1e-12


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refmetrics")
    corpus = write_corpus(root / "corpus", WORDS, docs=24, seed=0, words_per_doc=200)
    common = analysis_run_overrides(root, corpus)
    every = ["steps=6", "checkpoint.every=2", "optimizer.name=adamw", "optimizer.lr=0.003"]
    specs = {
        "adamw": [],
        # ReLoRA merges after update 3: between the checkpoints at 2 and 4
        "relora": ["model.linear=lora", "model.overrides.linear_rank=4",
                   "relora.reset_every=3", "relora.restart_warmup_steps=1"],
        "sltrain": ["model.linear=sltrain", "model.overrides.linear_rank=4"],
    }
    out = {}
    for name, args in specs.items():
        out[name] = root / name
        assert train([*common, *every, *args, f"run_dir={out[name]}"]) == 0
    out["root"] = root
    return out


def _analyse(runs, out: Path, *extra: str) -> tuple[list[dict], dict]:
    code = analyze([str(runs["relora"]), str(runs["sltrain"]), "--baseline",
                    str(runs["adamw"]), "--out", str(out), *FAST, *extra])
    assert code == 0
    with (out / "metrics.csv").open() as f:
        rows = [dict(r, step=int(r["step"]), value=float(r["value"]))
                for r in csv.DictReader(f)]
    return rows, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def dense(runs, tmp_path_factory):
    return _analyse(runs, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def stored(runs, tmp_path_factory):
    return _analyse(runs, tmp_path_factory.mktemp("stored"), "--spectra-of", "stored",
                    "--pca-grid", "reference", "--topk-steps", "final")


def _value(rows, run, step, metric, layer="all") -> float:
    hits = [r["value"] for r in rows if (r["run"], r["step"], r["metric"], r["layer"])
            == (run, step, metric, layer)]
    assert len(hits) == 1, (run, step, metric, layer, hits)
    return hits[0]


# ------------------------------------------------------------------ independent evaluation

class Model:
    """A run's model and checkpoints, read with orbax directly (``train_support.saved_state``)
    and the run's ``config.yaml``, never through ``analysis/``."""

    def __init__(self, run_dir: Path):
        import yaml

        from lowrank_jax.models import Llama

        self.run_dir = run_dir
        self.cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        self.trainer = build_trainer(self.cfg)
        model = Llama(self.trainer.model_cfg, rngs=nnx.Rngs(0))
        model.eval()
        self.graphdef, self.template = nnx.split(model)

    def variables(self, step: int) -> dict[str, np.ndarray]:
        """Every model variable of checkpoint ``step`` (trainable and model state):
        ``{"layers/0/attn/q_proj/kernel": array}``."""
        out = {}
        for key, value in saved_state(self.run_dir, step).items():
            parts = re.findall(r"\['([^']*)'\]", key)
            if parts and parts[0] in ("params", "model_state") and parts[-1] == "value":
                out["/".join(parts[1:-1])] = value
        return out

    def loss(self, variables: dict[str, np.ndarray], batch) -> float:
        """The next-token loss of the model holding ``variables`` (eval mode)."""
        from lowrank_jax.models.llama import next_token_loss

        return float(next_token_loss(self.model(variables), batch)[0])

    def model(self, variables: dict[str, np.ndarray]):
        """The model (eval mode) holding ``variables``."""
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, _unflatten(variables))
        model = nnx.merge(self.graphdef, state)
        model.eval()
        return model


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        keys = [int(k) if k.isdigit() else k for k in path.split("/")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jnp.asarray(value)
    return out


def _batch(model: Model) -> dict:
    from train.data import build_batches

    raw = next(iter(build_batches(model.cfg.data, split="validation", seq_len=model.cfg.seq_len,
                                  batch_size=4, seed=model.cfg.seed, num_batches=1)))
    return {k: jnp.asarray(v) for k, v in raw.items()}


def _is_float(x: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.floating)


def _expected_sharpness(curve: np.ndarray) -> float:
    """4b_pca_aggregate_subsets.py compute_sharpness: centre len // 2, symmetric pairs."""
    c = len(curve) // 2
    m = min(c, len(curve) - 1 - c)
    return float(np.mean([0.5 * (curve[c + o] + curve[c - o]) - curve[c]
                          for o in range(1, m + 1)]))


def _effective_rank(s: np.ndarray) -> float:
    s = s[s > TOL]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# ------------------------------------------------------------------------------- tests

def test_ccbh_interpolates_every_variable_across_a_relora_merge(runs, dense):
    rows, payload = dense
    model = Model(runs["relora"])
    batch = _batch(model)
    a, b = model.variables(2), model.variables(4)
    kernels = [k for k in a if k.endswith("kernel") and "proj" in k]
    assert kernels and any(not np.array_equal(a[k], b[k]) for k in kernels)   # merged at 3
    path = []
    for t in np.linspace(0.0, 1.0, 3):
        mixed = {k: ((1 - t) * a[k].astype(np.float32) + t * b[k].astype(np.float32)
                     ).astype(a[k].dtype) if _is_float(a[k]) else b[k] for k in a}
        path.append(model.loss(mixed, batch))
    assert path[0] == pytest.approx(model.loss(a, batch), rel=1e-6)        # starts at step 2
    got = payload["curves"]["ccbh"]["relora"]["4"]
    np.testing.assert_allclose(got, path, rtol=2e-5, atol=2e-6)
    barrier = max(path[1:-1]) - 0.5 * (path[0] + path[-1])
    assert _value(rows, "relora", 4, "ccbh") == pytest.approx(barrier, rel=1e-4, abs=1e-6)
    # the old path (trainable parameters only, step 4's frozen kernels throughout) does not
    # start at step 2: the test tells the two apart
    params_only = {k: (b[k] if k in kernels else a[k]) for k in a}
    assert abs(model.loss(params_only, batch) - path[0]) > 1e-4


def test_random_direction_moves_the_frozen_kernels_too(runs, dense):
    _, payload = dense
    model = Model(runs["relora"])
    batch = _batch(model)
    v = model.variables(6)
    floats = {k: x for k, x in v.items() if _is_float(x)}
    # one N(0, 1) draw over every float variable, trainable parameters first, then the frozen
    # ones, each in tree order (analysis.variables.probe_variables, one direction, seed 0)
    params = [k for k in floats if not (k.endswith("kernel") and "proj" in k)]
    frozen = [k for k in floats if k.endswith("kernel") and "proj" in k]
    order = sorted(params, key=_tree_order(v)) + sorted(frozen, key=_tree_order(v))
    sizes = [floats[k].size for k in order]
    key = jax.random.split(jax.random.key(0), 1)[0]
    flat = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    direction, offset = {}, 0
    for k, n in zip(order, sizes):
        direction[k] = flat[offset:offset + n].reshape(floats[k].shape)
        offset += n
    alphas = np.linspace(-0.003, 0.003, 5).astype(np.float32)
    curve = [model.loss({k: (x + a * direction[k]).astype(x.dtype) if k in direction else x
                         for k, x in v.items()}, batch) for a in alphas]
    got = payload["curves"]["landscape"]["relora"]["6"]["mean"]
    np.testing.assert_allclose(got, curve, rtol=2e-5, atol=2e-6)


def _tree_order(v: dict[str, np.ndarray]):
    keys = list(v)
    return keys.index


def test_topk_on_the_reference_grid(runs, stored):
    rows, _ = stored
    model = Model(runs["relora"])
    batch = _batch(model)
    v = model.variables(6)
    alphas = np.arange(-0.05, 0.0501, 0.004)
    assert len(alphas) == 26
    curves = []
    for k in (1, 2, 3):
        direction = {}
        for name, x in v.items():
            if _is_float(x) and x.ndim == 2:          # every 2-D variable, frozen ones too
                u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
                j = max(0, min(k - 1, s.size - 1))
                direction[name] = s[j] * np.outer(u[:, j], vt[j])
        curves.append([model.loss({n: (x + a * direction[n]).astype(x.dtype)
                                   if n in direction else x for n, x in v.items()}, batch)
                       for a in alphas.astype(np.float32)])
    curves = np.asarray(curves)
    for i, k in enumerate((1, 2, 3)):
        assert _value(rows, "relora", 6, "pca_component_sharpness", f"k{k}") == pytest.approx(
            _expected_sharpness(curves[i]), rel=2e-3, abs=2e-5)
    assert _value(rows, "relora", 6, "pca_sharpness", "top3") == pytest.approx(
        _expected_sharpness(curves.mean(0)), rel=2e-3, abs=2e-5)
    assert _value(rows, "relora", 6, "pca_variance", "top3") == pytest.approx(
        float(np.var(curves, axis=0).mean()), rel=5e-3, abs=1e-7)
    assert not [r for r in rows if r["metric"] == "pca_sharpness" and r["step"] != 6]


def test_spectra_of_stored_and_dense_matrices(runs, dense, stored):
    rows_d, _ = dense
    rows_s, _ = stored
    v = Model(runs["relora"]).variables(6)
    q = "layers/0/attn/q_proj"
    for leaf in ("kernel", "lora_a", "lora_b"):
        s = np.linalg.svd(v[f"{q}/{leaf}"].astype(np.float64), compute_uv=False)
        assert _value(rows_s, "relora", 6, "w_effective_rank", f"{q}/{leaf}") == pytest.approx(
            _effective_rank(s), rel=1e-4)
    cfg = Model(runs["relora"]).trainer.model_cfg
    lora = cfg.linear               # LoRASpec: alpha and rank
    w = v[f"{q}/kernel"] + v[f"{q}/lora_a"] @ v[f"{q}/lora_b"] * (lora.alpha / lora.rank)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    assert _value(rows_d, "relora", 6, "w_effective_rank", f"{q}/kernel") == pytest.approx(
        _effective_rank(s), rel=1e-4)
    assert not [r for r in rows_d if r["metric"] == "w_effective_rank"
                and r["layer"].endswith("lora_a")]
    # between two checkpoints without a merge the frozen base does not move: an all-zero
    # dW, every statistic 0 (5_ranks.py: no singular value above 1e-12)
    assert _value(rows_s, "relora", 6, "dw_effective_rank", f"{q}/kernel") == 0.0
    assert _value(rows_s, "relora", 6, "dw_rank", f"{q}/kernel") == 0.0
    sl = Model(runs["sltrain"]).variables(6)
    name = "layers/0/mlp/up_proj/lora_a"
    s = np.linalg.svd(sl[name].astype(np.float64), compute_uv=False)
    assert _value(rows_s, "sltrain", 6, "w_effective_rank", name) == pytest.approx(
        _effective_rank(s), rel=1e-4)


def test_rank_table_and_update_norms(runs, dense):
    rows, _ = dense
    m = Model(runs["adamw"])
    a, b = m.variables(4), m.variables(6)
    mats = [k for k in b if b[k].ndim == 2 and ("attn" in k or "mlp" in k)]
    assert len(mats) == 7 * 2
    upd, prev = [], []
    for k in mats:
        d = b[k].astype(np.float32) - a[k].astype(np.float32)
        upd.append(np.linalg.norm(d))
        prev.append(np.linalg.norm(a[k].astype(np.float32)))
        assert _value(rows, "adamw", 6, "dw_ratio", k) == pytest.approx(upd[-1] / prev[-1],
                                                                        rel=1e-5)
        s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
        rank = float(np.sum(s > TOL))
        assert _value(rows, "adamw", 6, "dw_rank", k) == rank
        assert _value(rows, "adamw", 6, "dw_effective_rank_ratio", k) == pytest.approx(
            _effective_rank(s) / min(d.shape), rel=1e-4)
    total = math.sqrt(sum(u * u for u in upd)) / math.sqrt(sum(p * p for p in prev))
    assert _value(rows, "adamw", 6, "dw_total_ratio") == pytest.approx(total, rel=1e-5)
    assert _value(rows, "adamw", 6, "dw_norm", "mean") == pytest.approx(np.mean(upd), rel=1e-5)
    layer0 = [k for k in mats if k.startswith("layers/0/")]
    ranks = [np.sum(np.linalg.svd(b[k].astype(np.float64), compute_uv=False) > TOL)
             / min(b[k].shape) for k in layer0]
    assert _value(rows, "adamw", 6, "w_rank_ratio", "layer_000") == pytest.approx(
        np.mean(ranks), rel=1e-6)


def test_activation_relative_l2_and_layer_means(runs, dense):
    rows, _ = dense
    layers = ["embed", "block_0", "block_1", "final_norm"]
    for metric in ("act_cka", "act_rel_l2", "act_mean_norm"):
        per = [_value(rows, "sltrain", 6, metric, layer) for layer in layers]
        assert _value(rows, "sltrain", 6, metric, "mean") == pytest.approx(np.mean(per))
    l2 = _value(rows, "sltrain", 6, "act_l2", "final_norm")
    base = _value(rows, "sltrain", 6, "act_base_mean_norm", "final_norm")
    assert _value(rows, "sltrain", 6, "act_rel_l2", "final_norm") == pytest.approx(
        l2 / (base + 1e-12), rel=1e-5)
    # the baseline's own mean norm, computed from its activations after the final norm
    m = Model(runs["adamw"])
    model = m.model(m.variables(6))
    tokens = _batch(m)["tokens"][:, :-1]
    x = model.embed(tokens)
    for block in model.layers:
        x = block(x)
    x = np.asarray(model.final_norm(x)).reshape(-1, x.shape[-1])
    assert base == pytest.approx(float(np.linalg.norm(x, axis=-1).mean()), rel=1e-4)
