"""lowrank-memory: figures equal the analytic formula; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest

from lowrank_jax.memory import memory_report
from lowrank_jax.models import get_preset
from train.memory_cli import main


def _analytic(preset: str, optimizer: str, rank: int, itemsize: int) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) written out from the architecture."""
    c = get_preset(preset)
    d, f, v, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    matrices = [(d, d)] * 4 + [(d, f)] * 3                 # per layer: q k v o, gate up down
    dense = 2 * v * d + (2 * n + 1) * d                      # embed + head + norms
    params = (dense + n * sum(a * b for a, b in matrices)) * itemsize
    if optimizer == "adamw":
        return params, 2 * params + 4
    per_matrix = 0
    for a, b in matrices:
        r = min(rank, a, b)
        # moments (max, r) x 2 in the parameter dtype, projector (min, r) in float32,
        # bool ready and refreshed flags and a float32 overlap value
        per_matrix += 2 * max(a, b) * r * itemsize + min(a, b) * r * 4 + 1 + 1 + 4
        if optimizer == "fira_adamw":
            per_matrix += 4 + 1                              # limiter norm + flag
    scalars = 4 + 8 + 4 + 4                                  # wrapper count, key, two Adam counts
    if optimizer == "fira_adamw":
        scalars += 4                                         # bias-correction count
    return params, n * per_matrix + 2 * dense * itemsize + scalars


@pytest.mark.parametrize("preset,rank", [("llama_60m", 128), ("llama_1b", 512), ("llama_7b", 1024)])
@pytest.mark.parametrize("optimizer", ["adamw", "galore_adamw", "fira_adamw"])
def test_reported_bytes_equal_analytic_formula(preset, rank, optimizer):
    for dtype, itemsize in (("fp32", 4), ("bf16", 2)):
        report = memory_report(preset, optimizer, rank, dtype)
        params, state = _analytic(preset, optimizer, rank, itemsize)
        assert report.params_bytes == report.grads_bytes == params
        assert report.optimizer_bytes == state


def test_json_output(capsys):
    assert main(["--model", "llama_60m", "--optimizer", "galore_adamw", "--rank", "128",
                 "--dtype", "fp32", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["optimizer"] == "galore_adamw" and row["num_params"] == 58_073_600


@pytest.mark.parametrize("argv,message", [
    (["--model", "llama_9000"], "unknown model preset 'llama_9000'"),
    (["--model", "llama_60m", "--optimizer", "sgd"], "unknown optimizer 'sgd'"),
    (["--model", "llama_60m", "--optimizer", "galore_adamw", "--rank", "4096"], "rank 4096"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def _arch_analytic(preset: str, linear: str, r: int) -> tuple[int, int]:
    """(trainable scalars, frozen bytes in fp32) of a preset built with ``linear``."""
    c = get_preset(preset)
    d, f, v, n = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
    matrices = [(d, d)] * 4 + [(d, f)] * 2 + [(f, d)]
    trainable, frozen = 2 * v * d + (2 * n + 1) * d, 0
    for a, b in matrices:
        trainable += n * r * (a + b)                  # the two factors (in, r) and (r, out)
        if linear == "sltrain":
            nnz = int(0.03 * a * b)                   # support values train, indices do not
            trainable += n * nnz
            frozen += n * nnz * 4                     # int32 flat indices
        elif linear == "lora":
            frozen += n * a * b * 4                   # the frozen base weight
    return trainable, frozen


@pytest.mark.parametrize("preset,r", [("llama_60m", 128),
                                      pytest.param("llama_350m", 256, marks=pytest.mark.slow)])
@pytest.mark.parametrize("linear", ["cola", "sltrain", "lora"])
def test_architecture_methods_reported(capsys, preset, r, linear):
    assert main(["--model", preset, "--linear", linear, "--linear-rank", str(r),
                 "--optimizer", "adamw", "--dtype", "fp32", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    trainable, frozen = _arch_analytic(preset, linear, r)
    assert row["linear"] == linear and row["num_trainable"] == trainable
    assert row["params_bytes"] == row["grads_bytes"] == 4 * trainable
    assert row["frozen_bytes"] == frozen
    assert row["num_optimizer_scalars"] == 2 * trainable + 1     # mu, nu and the count
    assert row["optimizer_bytes"] == 8 * trainable + 4


@pytest.mark.slow
def test_mesh_reports_per_device_bytes_for_7b(capsys):
    """``--mesh fsdp=64``: every 7B dimension divides by 64, so AdamW's per-device
    parameters, gradients and moments are the totals / 64 (its step count is replicated)."""
    assert main(["--model", "llama_7b", "--optimizer", "adamw", "galore_adamw", "--rank", "1024",
                 "--dtype", "fp32", "--mesh", "fsdp=64", "--json"]) == 0
    adamw, galore = json.loads(capsys.readouterr().out)
    dev = adamw["per_device"]
    assert dev["params"] == dev["grads"] == adamw["params_bytes"] // 64
    assert dev["optimizer"] == (adamw["optimizer_bytes"] - 4) // 64 + 4
    assert galore["per_device"]["optimizer"] < galore["optimizer_bytes"] // 32
    assert galore["per_device"]["optimizer"] < dev["optimizer"]
    assert main(["--model", "llama_7b", "--mesh", "fsdp:64"]) == 2
    assert "AXIS=SIZE" in capsys.readouterr().err
