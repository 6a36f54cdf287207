"""Bytes of parameters, gradients and optimizer state for a preset, without allocating.

Everything is computed on ``jax.ShapeDtypeStruct`` trees (``nnx.eval_shape`` for
the model, ``jax.eval_shape`` for the optimizer's ``init``), so the 7B preset
takes seconds on a laptop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from lowrank_jax.alias import LOWRANK_OPTIMIZERS, OPTIMIZERS, accepted_kwargs
from lowrank_jax.models import Llama, get_preset
from lowrank_jax.state_utils import state_nbytes

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes of one (preset, optimizer, dtype) combination."""

    model: str
    optimizer: str
    dtype: str
    rank: int | None
    num_params: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    linear: str = "dense"
    num_trainable: int | None = None
    frozen_bytes: int = 0
    num_optimizer_scalars: int | None = None

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.frozen_bytes + self.grads_bytes + self.optimizer_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def abstract_params(model: str, dtype: str = "fp32", **overrides: Any) -> Any:
    """Shape/dtype tree of a preset's parameters as a plain nested dict."""
    cfg = get_preset(model, param_dtype=DTYPES[dtype], **overrides)
    abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))


def optimizer_state_shapes(params: Any, optimizer: str, rank: int | None = None,
                           **kwargs: Any) -> Any:
    """``jax.eval_shape`` of ``OPTIMIZERS[optimizer](...).init(params)``."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {sorted(OPTIMIZERS)}")
    if optimizer in LOWRANK_OPTIMIZERS and rank is not None:
        kwargs.update(accepted_kwargs(optimizer, {"rank": rank}))
    tx = OPTIMIZERS[optimizer](1e-3, **kwargs)
    return jax.eval_shape(tx.init, params)


def check_rank(params: Any, rank: int) -> None:
    """Raise ``ValueError`` if ``rank`` exceeds the smaller side of a projected matrix."""
    from lowrank_jax.selection import LOWRANK, default_lowrank_labels

    labels = default_lowrank_labels(params)
    sizes = [min(p.shape) for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
             if lab == LOWRANK]
    if sizes and rank > min(sizes):
        raise ValueError(f"rank {rank} is larger than the smallest projected matrix side "
                         f"({min(sizes)}) of this model; use rank <= {min(sizes)}.")


def abstract_model_state(model: str, dtype: str = "fp32", **overrides: Any) -> tuple[Any, Any]:
    """``(params, frozen)`` shape trees: the ``nnx.Param`` part and every other variable
    (LoRA's frozen kernels, SLTrain's int32 support), as plain nested dicts."""
    cfg = get_preset(model, param_dtype=DTYPES[dtype], **overrides)
    abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    _, params, frozen = nnx.split(abstract_model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)


def memory_report(model: str, optimizer: str, rank: int | None = None, dtype: str = "fp32",
                  linear: str = "dense", model_overrides: dict[str, Any] | None = None,
                  **kwargs: Any) -> MemoryReport:
    """Bytes of parameters, gradients (same dtype as parameters) and optimizer state.

    ``linear`` (``"dense"``, ``"cola"``, ``"sltrain"``, ``"lora"``) and
    ``model_overrides`` (e.g. ``{"linear_rank": 128}``) choose the architecture;
    gradients and optimizer state cover the trainable ``Param`` scalars only,
    ``frozen_bytes`` the rest of the model (frozen LoRA weights, SLTrain supports).

    >>> r = memory_report("llama_tiny", "galore_adamw", rank=16)
    >>> r.optimizer_bytes < memory_report("llama_tiny", "adamw").optimizer_bytes
    True
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    params, frozen = abstract_model_state(model, dtype, linear=linear,
                                          **(model_overrides or {}))
    if optimizer in LOWRANK_OPTIMIZERS and rank is not None:
        check_rank(params, rank)
    state = optimizer_state_shapes(params, optimizer, rank, **kwargs)
    n = sum(int(p.size) for p in jax.tree.leaves(params))
    n_frozen = sum(int(p.size) for p in jax.tree.leaves(frozen))
    n_state = sum(int(p.size) for p in jax.tree.leaves(state))
    pbytes = state_nbytes(params)
    return MemoryReport(model, optimizer, dtype, rank if optimizer in LOWRANK_OPTIMIZERS else None,
                        n + n_frozen, pbytes, pbytes, state_nbytes(state), linear, n,
                        state_nbytes(frozen), n_state)


def projected_state_report(model: str, optimizer: str, rank: int | None = None,
                           dtype: str = "fp32", **kwargs: Any) -> dict[str, Any]:
    """Optimizer-state bytes for the projected matrices only, against AdamW's for them.

    The tree is the preset's parameters restricted to the leaves GaLore's rule
    projects (2-D, path with ``attn``/``mlp``), under their own paths, so every
    alias sees only those matrices.

    >>> r = projected_state_report("llama_tiny", "galore_adamw", rank=16)
    >>> r["matrices"], r["ratio"] < 0.5
    (14, True)
    """
    from lowrank_jax.selection import LOWRANK, default_lowrank_labels

    params = abstract_params(model, dtype)
    labels = default_lowrank_labels(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    projected: dict = {}
    for (path, leaf), label in zip(flat, jax.tree.leaves(labels)):
        if label != LOWRANK:
            continue
        node = projected
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    method = state_nbytes(optimizer_state_shapes(projected, optimizer, rank, **kwargs))
    adamw = state_nbytes(optimizer_state_shapes(projected, "adamw"))
    return {"model": model, "optimizer": optimizer, "matrices": len(jax.tree.leaves(projected)),
            "state_bytes": method, "adamw_state_bytes": adamw, "ratio": method / adamw}
