"""ReLoRA (Lialin et al.; reference ``Guitaricet/relora``): merge-and-restart for LoRA models.

Train a ``linear="lora"`` model (:class:`lowrank_jax.models.lora.LoRALinear`);
every ``reset_every`` steps call :func:`relora_merge_and_reinit`, which for
every LoRA module

1. merges ``W += A B alpha/r`` into the frozen ``kernel``,
2. re-initialises ``A`` (kaiming-uniform ``U(+-1/sqrt(in))``) and zeroes ``B``,
3. prunes the optimizer-state entries of ``A`` and ``B`` (Adam ``mu``/``nu``):
   ``"random"`` zeroes each entry with probability ``prune_fraction``
   (independent mask per state leaf, as the reference's ``rand_like > ratio``);
   ``"magnitude"`` zeroes the entries with ``|x| <= quantile(|x|, prune_fraction)``,

and drive the learning rate with :func:`cosine_with_restarts_schedule`.  Both
functions are pure and jit-able; the merge is deterministic given its key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.models.lora import kaiming_uniform
from lowrank_jax.tree_util import path_string

PRUNE_MODES = ("random", "magnitude")


def _find_lora_modules(tree: Mapping[str, Any], prefix: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys) of every sub-dict holding ``kernel``, ``lora_a`` and ``lora_b``."""
    found = []
    if {"kernel", "lora_a", "lora_b"} <= set(tree):
        found.append(prefix)
    for key, value in tree.items():
        if isinstance(value, Mapping):
            found.extend(_find_lora_modules(value, prefix + (key,)))
    return found


def _get(tree: Mapping, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _copy_dicts(tree: Any) -> Any:
    """Copy of the nested-dict skeleton (leaves shared)."""
    if isinstance(tree, Mapping):
        return {k: _copy_dicts(v) for k, v in tree.items()}
    return tree


def _strip_value(path_str: str) -> str:
    return path_str.removesuffix("/value")


def prune_entries(x: jax.Array, key: jax.Array, fraction: float, mode: str) -> jax.Array:
    """Zero about ``fraction`` of the entries of ``x`` (random mask or smallest magnitudes)."""
    if mode == "random":
        keep = jax.random.uniform(key, x.shape) > fraction
    elif mode == "magnitude":
        mag = jnp.abs(x).astype(jnp.float32)
        keep = mag > jnp.quantile(mag.reshape(-1), fraction)
    else:
        raise ValueError(f"unknown prune mode {mode!r}; valid: {PRUNE_MODES}")
    return jnp.where(keep, x, jnp.zeros_like(x))


def relora_merge_and_reinit(
    state: Any,
    opt_state: Any,
    key: jax.Array,
    prune_fraction: float = 0.999,
    prune: str = "random",
    *,
    alpha: float = 32.0,
) -> tuple[Any, Any]:
    """One ReLoRA reset: merge LoRA into ``W``, re-init ``A``, zero ``B``, prune their opt state.

    Args:
      state: the full model state (it must contain the frozen ``kernel``): a pure
        nested dict (``nnx.to_pure_dict(nnx.state(model))``) or an ``nnx.State``
        (``nnx.state(model)``).  LoRA modules are the sub-dicts with ``kernel``
        ``(in, out)``, ``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)``.
      opt_state: an optax state over the ``Param`` part of the model (e.g.
        ``optax.adamw(...).init(params)``, ``params`` a pure dict or ``nnx.State``).
        Every array leaf whose path ends with the path of a LoRA ``lora_a``/``lora_b``
        and has its shape (Adam ``mu``, ``nu``) is pruned; all other leaves
        (counts, other parameters' moments) are returned unchanged.
      key: PRNG key; the result is a deterministic function of it.
      prune_fraction: fraction of optimizer entries zeroed (reference default 0.999).
      prune: ``"random"`` or ``"magnitude"``.
      alpha: LoRA alpha (scale ``alpha / r`` with ``r = lora_a.shape[-1]``);
        use ``cfg.linear.alpha``.

    Returns:
      ``(new_state, new_opt_state)`` with the input's container types
      (pure dict in, pure dict out; ``nnx.State`` in, ``nnx.State`` out).
    """
    if prune not in PRUNE_MODES:
        raise ValueError(f"unknown prune mode {prune!r}; valid: {PRUNE_MODES}")
    if not 0.0 <= prune_fraction <= 1.0:
        raise ValueError(f"prune_fraction must be in [0, 1], got {prune_fraction}")
    as_state = isinstance(state, nnx.State)
    pure = nnx.to_pure_dict(state) if as_state else state
    new = _copy_dicts(pure)
    modules = _find_lora_modules(pure)
    merge_key, prune_key = jax.random.split(key)

    lora_paths: dict[str, tuple[int, ...]] = {}
    for m, path in enumerate(modules):
        old = _get(pure, path)
        node = _get(new, path)
        kernel, a, b = old["kernel"], old["lora_a"], old["lora_b"]
        scale = alpha / a.shape[-1]
        merged = kernel.astype(jnp.float32) + scale * (
            a.astype(jnp.float32) @ b.astype(jnp.float32))
        node["kernel"] = merged.astype(kernel.dtype)
        fresh = kaiming_uniform(jax.random.fold_in(merge_key, m), a.shape, a.shape[-2])
        node["lora_a"] = fresh.astype(a.dtype)
        node["lora_b"] = jnp.zeros_like(b)
        prefix = "/".join(str(k) for k in path)
        lora_paths[f"{prefix}/lora_a"] = tuple(a.shape)
        lora_paths[f"{prefix}/lora_b"] = tuple(b.shape)

    def prune_leaf(index: int, leaf_path: tuple, leaf: Any) -> Any:
        shape = getattr(leaf, "shape", None)
        if shape is None:
            return leaf
        name = _strip_value(path_string(leaf_path))
        for lora_path, lora_shape in lora_paths.items():
            if tuple(shape) == lora_shape and (name == lora_path
                                               or name.endswith("/" + lora_path)):
                return prune_entries(leaf, jax.random.fold_in(prune_key, index),
                                     prune_fraction, prune)
        return leaf

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    new_leaves = [prune_leaf(i, p, x) for i, (p, x) in enumerate(leaves_with_path)]
    new_opt_state = jax.tree_util.tree_unflatten(treedef, new_leaves)

    if as_state:
        out_state = jax.tree.map(lambda x: x, state)  # fresh containers, same leaves
        nnx.replace_by_pure_dict(out_state, new)
        return out_state, new_opt_state
    return new, new_opt_state


def cosine_with_restarts_schedule(
    lr: float,
    total_steps: int,
    warmup_steps: int,
    reset_every: int,
    restart_warmup_steps: int,
    min_lr_ratio: float = 0.1,
) -> optax.Schedule:
    """ReLoRA's jagged cosine: global cosine decay, linear warm-up, re-warm-up after resets.

    With ``T = total_steps``, ``w0 = warmup_steps``, ``R = reset_every``,
    ``wr = restart_warmup_steps``, ``m = min_lr_ratio`` and
    ``cos(s) = m + (1 - m) * 0.5 * (1 + cos(pi * clip((s - w0) / max(1, T - w0), 0, 1)))``,
    the learning rate at step ``t`` is ``lr * f(t)`` with::

        f(t) = t / max(1, w0)                            if t < w0
        f(t) = (t mod R) / max(1, wr) * cos(k R + wr)     if t >= R and (t mod R) < wr,
                                                          with k = t // R
        f(t) = cos(t)                                     otherwise

    i.e. after every reset the rate climbs linearly from 0 to the global cosine
    value at the end of the re-warm-up, then follows the global cosine.  (The
    reference ``_get_cosine_schedule_with_multiple_warmups_lambda`` targets the
    cosine at progress ``k R / (T - w0)``, i.e. at step ``k R + w0``; the target
    here makes the curve continuous at the end of each re-warm-up.  The two
    differ by less than ``(1-m) pi (w0 + wr) / (2 (T - w0))`` in the target.)
    """
    if reset_every <= 0:
        raise ValueError(f"reset_every must be positive, got {reset_every}")
    if not 0.0 < min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in (0, 1], got {min_lr_ratio}")
    denom = float(max(1, total_steps - warmup_steps))

    def cosine(s: jax.Array) -> jax.Array:
        progress = jnp.clip((s - warmup_steps) / denom, 0.0, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        restart_step = jnp.mod(t, reset_every)
        k = jnp.floor(t / reset_every)
        warm = t / float(max(1, warmup_steps))
        rewarm = restart_step / float(max(1, restart_warmup_steps)) * cosine(
            k * reset_every + restart_warmup_steps)
        in_rewarm = (t >= reset_every) & (restart_step < restart_warmup_steps)
        f = jnp.where(t < warmup_steps, warm, jnp.where(in_rewarm, rewarm, cosine(t)))
        return lr * f

    return schedule
