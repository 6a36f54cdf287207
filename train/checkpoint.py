"""Orbax checkpoints of a run, with a fall-back past unreadable ones.

Layout (``orbax.checkpoint.CheckpointManager`` under ``<run_dir>/checkpoints``)::

    <step>/state/    the TrainState: params, full optimizer state (moments,
                     projectors, counters, PRNG key data), step, rng  (StandardSave)
    <step>/data/     the training iterator's position                (JsonSave)
    <step>/config/   the run's TrainConfig as a dict                 (JsonSave)
    <step>/meta/     {"step", "checksums"}: a position-weighted uint32 sum of the
                     bits of every state leaf, checked after restore  (JsonSave)

    <run_dir>/checkpoint_manifests/<step>.json   {relative file: size} of every file
                     of a finalized step, written once the step is finalized and
                     checked before orbax reads it (a truncated or deleted file is
                     reported by name, without a failed tensorstore read)

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-<n>`` and
renames it to ``<step>`` only after every item is written and the save is
finalized (``AtomicRenameTemporaryPath``); ``CheckpointManager.all_steps``
ignores temporary directories, and ``cleanup_tmp_directories=True`` removes
leftovers when a manager is opened. So the latest visible step is never
half-written (``tests/test_checkpoint.py`` kills a save before its rename and
checks it). A step can still be damaged afterwards (a file truncated or
deleted on disk): :meth:`CheckpointStore.restore_latest` tries steps newest
first; a step whose files disagree with its manifest, whose files are missing,
empty or not valid JSON (:func:`check_step_files`), whose restore fails, or whose
checksums disagree is reported as ``checkpoint at step N is unreadable (<what is
wrong>); falling back to step M`` (:func:`explain` turns orbax's and tensorstore's
errors into words) and moved to ``<run_dir>/corrupt_checkpoints/`` so that the
run can save that step number again.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rundir import layout
from train.config import CheckpointConfig

__all__ = ["CheckpointStore", "DamagedCheckpoint", "Restored", "check_step_files", "explain",
           "state_checksums"]

ITEMS = ("state", "data", "config", "meta")
log = logging.getLogger(__name__)
_WEIGHT = 2654435761  # Knuth's multiplicative hash constant (mod 2**32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    """``uint32 (n_leaves,)``: ``sum_i bits_i * (i * K + 1) mod 2**32`` per leaf."""
    out = []
    for x in leaves:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)  # typed keys (dropout RNG streams): their raw bits
        x = jnp.ravel(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
        weight = jnp.arange(x.size, dtype=jnp.uint32) * jnp.uint32(_WEIGHT) + jnp.uint32(1)
        out.append(jnp.sum(bits * weight, dtype=jnp.uint32))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def _replicated_like(leaves: list[Any]) -> Any:
    """A replicated ``NamedSharding`` on the mesh of the first sharded leaf (else ``None``)."""
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, P())
    return None


@functools.lru_cache(maxsize=8)
def _replicated_checksums(target: NamedSharding) -> Callable[[list[jax.Array]], jax.Array]:
    return jax.jit(_checksums.__wrapped__, out_shardings=target)


def state_checksums(state: Any) -> list[int]:
    """One uint32 checksum per leaf of ``state`` (order of ``jax.tree.leaves``).

    The sum is exact integer arithmetic, so the value does not depend on how the
    leaves are sharded: a state saved on one mesh verifies after a restore onto
    another. The result is replicated, so every process of a multi-host run can
    read it.
    """
    leaves = jax.tree.leaves(state)
    target = _replicated_like(leaves)
    fn = _checksums if target is None else _replicated_checksums(target)
    return [int(v) for v in jax.device_get(fn(leaves))]


@dataclass
class Restored:
    """A restored checkpoint: the state, the data iterator position, the saved config."""

    step: int
    state: Any
    data: dict[str, Any]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _orbax_coroutine(obj: Any) -> bool:
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def _closed_loop_callback(tb: Any) -> bool:
    """Is ``tb`` a ``call_soon_threadsafe`` on a closed loop (tensorstore's late callback)?"""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _drop_orbax_noise(previous_unraisable: Any, previous_except: Any) -> tuple[Any, Any]:
    """``sys.unraisablehook`` / ``sys.excepthook`` replacements that drop orbax's leftovers."""
    def unraisable_hook(unraisable: Any) -> None:
        late_callback = (unraisable.exc_type is RuntimeError
                         and _closed_loop_callback(unraisable.exc_traceback))
        if not (_orbax_coroutine(unraisable.object) or late_callback):
            previous_unraisable(unraisable)

    def except_hook(tp: Any, value: Any, tb: Any) -> None:
        if not (tp is RuntimeError and _closed_loop_callback(tb)):
            previous_except(tp, value, tb)

    return unraisable_hook, except_hook


@contextlib.contextmanager
def _quiet_failed_restore():
    """Silence what an aborted orbax restore leaves behind, for the duration of the call.

    When one tensorstore read fails, orbax abandons the sibling reads: their
    coroutines are finalized with "Exception ignored in <coroutine>"
    (``sys.unraisablehook``), tensorstore's completion callbacks hit the closed
    event loop ("RuntimeError: Event loop is closed", ``sys.excepthook``) and
    asyncio reports "Task exception was never retrieved"; the error itself is
    already summarised in our one-line warning. The process's hooks and the
    ``asyncio`` logger's level are restored on exit, after a garbage collection
    has finalized the abandoned reads.
    """
    previous = sys.unraisablehook, sys.excepthook
    sys.unraisablehook, sys.excepthook = _drop_orbax_noise(*previous)
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()
        logger.setLevel(level)
        sys.unraisablehook, sys.excepthook = previous


def _short(err: BaseException) -> str:
    """``Type: first line`` of the root cause of ``err`` (at most ~200 characters)."""
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 200:
        first = first[:200] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class DamagedCheckpoint(ValueError):
    """What is wrong with a checkpoint's files, found by our own checks (one line)."""


#: JSON files of a finalized step that orbax reads before any array
_JSON_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "data/metadata", "config/metadata",
               "meta/metadata")


def check_step_files(step_dir: Path) -> None:
    """Raise :class:`DamagedCheckpoint` saying what is wrong with the files of a finalized step.

    Checks, before orbax reads anything, what orbax would report obscurely
    (``StopIteration: 0`` for an empty metadata file, a ``KeyError`` listing the
    items for a missing one): every item directory exists, no file is empty (orbax
    writes none) and the JSON metadata files parse.
    """
    for item in ITEMS:
        if not (step_dir / item).is_dir():
            raise DamagedCheckpoint(f"its {item}/ directory is missing")
    for f in sorted(step_dir.rglob("*")):
        if f.is_file() and f.stat().st_size == 0:
            raise DamagedCheckpoint(f"file {f.relative_to(step_dir)} is empty")
    for rel in _JSON_FILES:
        try:
            json.loads((step_dir / rel).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DamagedCheckpoint(f"file {rel} is missing") from None
        except (ValueError, OSError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DamagedCheckpoint(f"file {rel} is not valid JSON") from None


_TENSORSTORE_READ = re.compile(r'^([A-Z_]+): Error reading "([^"]+)"')


def explain(err: BaseException, step_dir: Path) -> str:
    """What is wrong with a checkpoint, in words, from the error its restore raised.

    >>> explain(ValueError('DATA_LOSS: Error reading "params.w/0.0" in OCDBT database '
    ...                    'at local file "/r/3/state/": Truncated stream'), Path("/r/3"))
    'the stored array params.w is damaged or truncated: DATA_LOSS, Truncated stream'
    """
    root = err
    seen = {id(err)}
    while not isinstance(root, DamagedCheckpoint) and id(
            nxt := root.__cause__ or root.__context__) not in seen and nxt is not None:
        seen.add(id(nxt))
        root = nxt
    if isinstance(root, DamagedCheckpoint):
        return str(root)
    text = str(root).strip()
    match = _TENSORSTORE_READ.match(text)
    if match:
        code, name = match.groups()
        detail = text.rsplit(": ", 1)[-1].splitlines()[0][:160]
        return f"the stored array {name.rsplit('/', 1)[0]} is damaged or truncated: {code}, {detail}"
    if isinstance(root, FileNotFoundError):
        name = root.filename or re.sub(r"^File (.*) not found\.?$", r"\1", text)
        try:
            name = str(Path(name).relative_to(step_dir))
        except ValueError:
            pass
        return f"file {name} is missing"
    item = re.search(r'Item "(\w+)" was not found', text)
    if item:
        return f"its {item.group(1)}/ item is missing"
    return _short(err)


class CheckpointStore:
    """Save / restore a run's checkpoints.

    Args:
      directory: the checkpoint directory (``<run_dir>/checkpoints``), created if needed.
      cfg: ``every`` / ``keep`` / ``async_save``.
      warn: called with each fall-back message (default: a ``logging`` warning).
    """

    def __init__(self, directory: str | Path, cfg: CheckpointConfig,
                 warn: Callable[[str], None] | None = None):
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.warn = warn or log.warning
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        """Finalized steps on disk, ascending."""
        return sorted(self.manager.all_steps())

    @property
    def manifest_dir(self) -> Path:
        """``<run_dir>/checkpoint_manifests``."""
        return self.directory.parent / layout.MANIFESTS

    def _write_manifests(self) -> None:
        """Record the file sizes of finalized steps that have no manifest yet."""
        steps = set(self.manager.all_steps())
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        for step in steps:
            path = self.manifest_dir / f"{step}.json"
            step_dir = self.directory / str(step)
            if path.exists() or not step_dir.is_dir():
                continue
            sizes = {str(f.relative_to(step_dir)): f.stat().st_size
                     for f in sorted(step_dir.rglob("*")) if f.is_file()}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(sizes, indent=0), encoding="utf-8")
            tmp.replace(path)
        for path in self.manifest_dir.glob("*.json"):
            if not path.stem.isdigit() or int(path.stem) not in steps:
                path.unlink(missing_ok=True)

    def _check_manifest(self, step: int) -> None:
        """Raise :class:`DamagedCheckpoint` naming the first missing or resized file of ``step``."""
        try:
            sizes = json.loads((self.manifest_dir / f"{step}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # no (readable) manifest: orbax's own reading decides
        step_dir = self.directory / str(step)
        for rel, size in sizes.items():
            f = step_dir / rel
            if not f.is_file():
                raise DamagedCheckpoint(f"file {rel} is missing")
            if f.stat().st_size != size:
                raise DamagedCheckpoint(f"file {rel} has {f.stat().st_size} bytes, expected {size}")

    def save(self, step: int, state: Any, data_state: dict[str, Any],
             config: dict[str, Any]) -> None:
        """Start saving ``step`` (returns once device arrays are copied when async).

        The previous save is finalized first (orbax would wait for it anyway), so
        its manifest can be written.
        """
        meta = {"step": int(step), "checksums": state_checksums(state), "time": time.time()}
        self.manager.wait_until_finished()
        self._write_manifests()
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta)), force=True)

    def read_config(self, step: int) -> dict[str, Any] | None:
        """The config saved with ``step`` (``None`` if unreadable)."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            return dict(out.config)
        except Exception:  # noqa: BLE001 - any damage means "no config"
            return None

    def _restore_step(self, step: int, abstract_state: Any,
                      alternatives: Callable[[], Any] | None = None) -> Restored:
        self._check_manifest(step)
        check_step_files(self.directory / str(step))
        convert = None
        try:
            out = self._restore_items(step, abstract_state)
        except Exception as err:  # noqa: BLE001 - maybe a state of another layout
            out, convert = self._restore_other_layout(step, alternatives, err)
        expected = list(out.meta["checksums"])
        got = state_checksums(out.state)
        if expected != got:
            bad = sum(a != b for a, b in zip(expected, got)) + abs(len(expected) - len(got))
            raise DamagedCheckpoint(f"checksum mismatch in {bad} of {len(expected)} arrays: their "
                                    "bytes changed on disk after the save")
        if int(out.meta["step"]) != step:
            raise DamagedCheckpoint(f"meta says step {out.meta['step']}")
        state = out.state if convert is None else convert(out.state)
        return Restored(step, state, dict(out.data), dict(out.config))

    def _restore_items(self, step: int, abstract_state: Any) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))

    def _restore_other_layout(self, step: int, alternatives: Callable[[], Any] | None,
                              err: Exception) -> tuple[Any, Callable[[Any], Any]]:
        """Restore ``step`` as a state of another layout (:mod:`train.layout`); else re-raise."""
        for abstract, convert in (alternatives() if alternatives is not None else ()):
            try:
                return self._restore_items(step, abstract), convert
            except Exception:  # noqa: BLE001, S112 - not this layout either
                continue
        raise err

    def restore_latest(self, abstract_state: Any,
                       alternatives: Callable[[], Any] | None = None) -> Restored | None:
        """The newest checkpoint that restores and verifies, or ``None`` if there is none.

        Unreadable steps are reported through ``warn`` as ``checkpoint at step N is
        unreadable (<error>); falling back to step M`` (or ``...; starting from
        scratch``) and moved to ``<run_dir>/corrupt_checkpoints/<N>``.

        Args:
          abstract_state: ``jax.ShapeDtypeStruct`` pytree (with shardings) of the state.
          alternatives: ``() -> iterable of (abstract state, convert)``: other layouts
            the state may have been saved in (scanned layers, per-layer updates,
            :func:`train.layout.restore_alternatives`) and the conversion of each to
            ``abstract_state``'s layout; tried when the state does not restore as is.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        messages: list[str] = []
        bad: list[int] = []
        result = None
        for i, step in enumerate(steps):
            try:
                with _quiet_failed_restore():
                    result = self._restore_step(step, abstract_state, alternatives)
                break
            except Exception as e:  # noqa: BLE001 - any failure means "try an older one"
                nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) \
                    else "starting from scratch"
                why = explain(e, self.directory / str(step))
                msg = f"checkpoint at step {step} is unreadable ({why}); {nxt}"
                self.warn(msg)
                messages.append(msg)
                bad.append(step)
        if bad:
            self._quarantine(bad)
        if result is not None:
            result.warnings = messages
        return result

    def _quarantine(self, steps: list[int]) -> None:
        """Move damaged step directories out of the manager's directory."""
        dest_root = self.directory.parent / layout.CORRUPT
        dest_root.mkdir(parents=True, exist_ok=True)
        for step in steps:
            src = self.directory / str(step)
            if src.exists():
                dest = dest_root / f"{step}-{int(time.time())}"
                shutil.move(str(src), str(dest))
                self.warn(f"moved the unreadable checkpoint {step} to {dest}")
            (self.manifest_dir / f"{step}.json").unlink(missing_ok=True)
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are finalized (and write their manifests)."""
        self.manager.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        """Finish pending saves, write their manifests and release the manager."""
        self.manager.wait_until_finished()
        self._write_manifests()
        self.manager.close()
