"""Bad input to the four commands: exit status 2, one ``error:`` line naming the parameter,
no traceback, no hang (the cases and the runner: ``tests/bad_inputs.py``).

Each group of cases runs in one fresh process that calls the command's real entry point
(``main``, what its console script calls) once per case; the groups that need JAX, data
or a trained run are slow. Around them: the console scripts themselves, the config
errors that fail before JAX is imported, the ``--mesh`` sizes that do not divide the
model, the quiet local TFDS preparation, and checkpoint fall-back reasons in words.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import bad_inputs as B
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    return B.make_places(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture(scope="module")
def results(places, tmp_path_factory):
    """``group -> results``, each group run once (the trained run made when first needed)."""
    done: dict[str, list[dict]] = {}

    def get(group: str) -> list[dict]:
        if group not in done:
            if group in ("analyze_run", "eval_run") and "run" not in places:
                places.update(B.trained_places(Path(places["scratch"])))
            done[group] = B.run_group(group, places)
        return done[group]

    return get


def _params():
    out = []
    for group in B.FAST_GROUPS + B.SLOW_GROUPS:
        marks = [pytest.mark.slow] if group in B.SLOW_GROUPS else []
        out += [pytest.param(group, i, id=B.case_id(c), marks=marks)
                for i, c in enumerate(B.cases(group))]
    return out


@pytest.mark.parametrize("group, index", _params())
def test_bad_input_gives_one_error_line(results, group, index):
    res = results(group)[index]
    assert not B.check(res), (res["id"], B.check(res), res["stderr"][-1500:])


def test_the_suite_covers_every_command():
    counts = {cmd: sum(c[1] == cmd for c in B.CASES) for cmd in B.ENTRY}
    assert sum(counts.values()) >= 100 and min(counts.values()) >= 15, counts
    assert all(c[0] in B.FAST_GROUPS + B.SLOW_GROUPS for c in B.CASES)


@pytest.mark.slow
def test_a_failed_local_dataset_leaves_nothing_and_prints_no_banner(results, places):
    """``data.path`` an empty directory: no "Downloading and preparing dataset" on stdout,
    no empty ``<dirname>_<fingerprint>/`` left in the TFDS data_dir."""
    res = next(r for r, c in zip(results("train_prepare"), B.cases("train_prepare"))
               if "data.path={emptydir}" in c[2])
    assert not B.check(res)
    assert "Downloading and preparing" not in res["stdout"] + res["stderr"]
    left = Path(places["cache"], "tfds", "local_text_dataset")
    assert not left.exists() or not [p for p in left.iterdir() if p.name.startswith("emptydir")]


@pytest.mark.parametrize("script, args, name", [
    ("lowrank-train", ["optimizer.grad_clip=.nan"], "optimizer.grad_clip"),
    ("lowrank-analyze", ["{scratch}/no_run", "--out", "{scratch}/o"], "RUN_DIR"),
    ("lowrank-eval", ["{scratch}/no_run"], "RUN_DIR"),
])
def test_the_console_scripts_print_one_line(places, script, args, name):
    exe = BIN / script
    if not exe.exists():  # not installed as scripts: the module is the same entry point
        cmd = [sys.executable, "-m", B.ENTRY[script]]
    else:
        cmd = [str(exe)]
    proc = subprocess.run([*cmd, *[a.format(**places) for a in args]], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], lines


def test_a_config_error_fails_before_jax_is_imported():
    code = ("import sys; from train.cli import main; "
            "rc = main(['optimizer.lr=.inf', 'steps=2']); "
            "print(rc, 'jax' in sys.modules, 'grain' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == "error: optimizer.lr must be a finite number, got inf"


def test_exponent_numbers_in_free_form_mappings_are_floats():
    """PyYAML (YAML 1.1) reads ``1e-8`` as a string; in ``optimizer.kwargs`` and
    ``model.overrides`` it is a number, as in the typed fields."""
    from train.config import load_config

    cfg = load_config(None, ["optimizer.name=galore_adamw", "optimizer.rank=4",
                             "model.preset=llama_tiny",
                             "optimizer.kwargs.eps=1e-8", "model.overrides.norm_eps=1e-5",
                             "optimizer.kwargs.proj_type=std", "optimizer.kwargs.b1=0.8"])
    assert cfg.optimizer.kwargs == {"eps": 1e-8, "proj_type": "std", "b1": 0.8}
    assert cfg.model.overrides == {"norm_eps": 1e-5}


def test_the_config_default_axis_rules_are_the_librarys():
    from lowrank_jax.sharding import DEFAULT_RULES
    from train.config import MeshConfig

    assert MeshConfig().rules == {name: list(axes) if isinstance(axes, tuple) else axes
                                  for name, axes in DEFAULT_RULES}


@pytest.mark.slow
def test_memory_sizes_that_do_not_divide_the_model_warn_with_the_figures_train_uses(capsys):
    """llama_tiny (hidden 64): ``fsdp=3`` splits nothing, so one device holds every
    parameter (as lowrank-train would place them) and a warning says why; ``fsdp=2``
    splits the model without a warning."""
    from train.memory_cli import main

    assert main(["--model", "llama_tiny", "--mesh", "fsdp=3", "--json"]) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)[0]
    assert row["per_device"]["params"] == row["params_bytes"]
    warnings = [x for x in out.err.splitlines() if x.startswith("warning: ")]
    assert len(warnings) == 1 and "--mesh fsdp=3 does not divide the 'embed'" in warnings[0]
    assert "sizes that divide them: 2, 4, 8" in warnings[0]
    assert row["per_device"]["warnings"] == [warnings[0].removeprefix("warning: ")]

    assert main(["--model", "llama_tiny", "--mesh", "fsdp=2", "--json"]) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)[0]
    assert row["per_device"]["params"] < row["params_bytes"] and "warning" not in out.err

    assert main(["--model", "llama_tiny", "--mesh", "tensor=7"]) == 0
    assert "--mesh tensor=7 does not divide the 'heads'/'mlp'/'vocab'" in capsys.readouterr().err


def test_mesh_argument_is_read_strictly():
    from train.mesh_arg import parse_mesh_arg
    from train.user_errors import UserInputError

    assert parse_mesh_arg(" data=2 , tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    for bad, message in [("", "is empty"), ("fsdp=2,fsdp=4", "gives fsdp twice"),
                         ("fsdp=2,", "empty entry"), ("fsdp:4", "bad entry"),
                         ("fsdp=-1", "integer >= 1"), ("expert=2", "bad entry")]:
        with pytest.raises(UserInputError, match=message):
            parse_mesh_arg(bad)


def test_local_text_dataset_is_prepared_quietly_and_cleans_up_after_an_error(tmp_path, capfd):
    from train.data.tfds_builder import prepare_text_dataset

    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        prepare_text_dataset(empty, tmp_path / "tfds")
    assert not (tmp_path / "tfds" / "local_text_dataset").exists()
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(f"document {i} " * 20)
    builder = prepare_text_dataset(docs, tmp_path / "tfds")
    assert Path(builder.data_dir, "dataset_info.json").is_file()
    out = capfd.readouterr()
    assert "Downloading and preparing" not in out.out + out.err
    assert "downloaded and prepared" not in out.out + out.err


# ---------------------------------------------------------------- checkpoint fall-back reasons


def _store_with_steps(path: Path, warnings: list[str]):
    import jax.numpy as jnp

    from train.checkpoint import CheckpointStore
    from train.config import CheckpointConfig

    store = CheckpointStore(path, CheckpointConfig(every=1, keep=5, async_save=False),
                            warn=warnings.append)
    for step in (1, 2):
        store.save(step, {"w": jnp.full((64, 8), step, jnp.float32)}, {"batches": step}, {})
    store.close()
    (path.parent / "checkpoint_manifests" / "2.json").unlink()  # orbax's own reading decides
    return CheckpointStore(path, CheckpointConfig(every=1, keep=5, async_save=False),
                           warn=warnings.append)


def _empty_files(d: Path) -> None:
    for f in d.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage, reason", [
    (lambda d: shutil.rmtree(d / "state"), "its state/ directory is missing"),
    (lambda d: shutil.rmtree(d / "meta"), "its meta/ directory is missing"),
    (_empty_files, "file _CHECKPOINT_METADATA is empty"),
    (lambda d: (d / "meta" / "metadata").write_text("{not json"),
     "file meta/metadata is not valid JSON"),
    (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), "file _CHECKPOINT_METADATA is missing"),
], ids=["no_state", "no_meta", "empty_files", "bad_json", "no_metadata"])
def test_checkpoint_fall_back_reasons_say_what_is_wrong(tmp_path, damage, reason):
    import gc

    import jax

    warnings: list[str] = []
    store = _store_with_steps(tmp_path / "checkpoints", warnings)
    damage(tmp_path / "checkpoints" / "2")
    restored = store.restore_latest(jax.eval_shape(lambda: {"w": jax.numpy.zeros((64, 8))}))
    store.close()
    gc.collect()
    assert restored is not None and restored.step == 1
    assert warnings[0] == f"checkpoint at step 2 is unreadable ({reason}); falling back to step 1"


def test_a_damaged_array_is_named():
    from train.checkpoint import explain

    err = ValueError('OUT_OF_RANGE: Error reading "params.w/0.0" in OCDBT database at local '
                     'file "/r/3/state/": Requested byte range [0, 7603) is not valid for value '
                     'of size 4508')
    assert explain(err, Path("/r/3")) == (
        "the stored array params.w is damaged or truncated: OUT_OF_RANGE, Requested byte "
        "range [0, 7603) is not valid for value of size 4508")
    missing = FileNotFoundError(2, "No such file", "/r/3/config/metadata")
    assert explain(RuntimeError("wrapped"), Path("/r/3")) == "RuntimeError: wrapped"
    try:
        raise RuntimeError("restore failed") from missing
    except RuntimeError as e:
        assert explain(e, Path("/r/3")) == "file config/metadata is missing"


@pytest.mark.parametrize("module", ["train.finite_guard", "train.user_errors", "train.mesh_arg",
                                    "train.checkpoint"])
def test_doctests_of_the_modules_outside_the_doctest_paths(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS
                             | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
