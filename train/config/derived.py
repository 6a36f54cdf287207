"""Values derived from a :class:`~train.config.schema.TrainConfig`: the model's
``LlamaConfig``, the requested mesh sizes and the logical-axis rules."""

from __future__ import annotations

from typing import Any

from train.config.schema import TrainConfig

__all__ = ["axis_rules", "mesh_shape", "model_config"]


def model_config(cfg: TrainConfig) -> Any:
    """The ``LlamaConfig`` of a run (preset + overrides, ``max_seq_len`` defaulting to ``seq_len``)."""
    from lowrank_jax.models import get_preset

    m = cfg.model
    max_len = m.max_seq_len if m.max_seq_len is not None else cfg.seq_len
    overrides = {"linear": m.linear, "scan_layers": m.scan_layers, "remat": m.remat,
                 **m.overrides}
    return get_preset(m.preset, max_seq_len=max_len, param_dtype=m.param_dtype,
                      dtype=m.dtype, **overrides)


def mesh_shape(cfg: TrainConfig) -> dict[str, int]:
    """The requested mesh sizes (``-1`` unresolved); ``data_parallel`` fills ``data``."""
    shape = cfg.mesh.as_dict()
    if cfg.data_parallel != 1:
        shape["data"] = cfg.data_parallel
    return shape


def axis_rules(cfg: TrainConfig) -> tuple[tuple[str, Any], ...]:
    """``mesh.rules`` in the form of :data:`lowrank_jax.sharding.DEFAULT_RULES`.

    >>> from train.config.parse import config_from_dict
    >>> axis_rules(config_from_dict({"mesh": {"rules": {"embed": "fsdp", "batch": ["data"]}}}))
    (('embed', 'fsdp'), ('batch', ('data',)))
    """
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                 for name, axes in cfg.mesh.rules.items())
