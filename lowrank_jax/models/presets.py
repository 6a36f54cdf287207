"""Named model sizes: the GaLore LLaMA configs plus two byte-level CPU models.

GaLore presets use vocab 32000 (the T5 tokenizer); their nominal names count
the decoder roughly (``llama_60m`` has 58,073,600 parameters, see
:func:`lowrank_jax.models.param_count_formula`).  ``llama_tiny`` and
``llama_demo`` are byte-level (vocab 256) for tests and CPU demos.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowrank_jax.models.linears import FLAT_KEYS, linear_spec
from lowrank_jax.models.llama import LlamaConfig


def _cfg(hidden: int, ffn: int, heads: int, layers: int, vocab: int = 32000) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_heads=heads,
        num_layers=layers,
    )


PRESETS: dict[str, LlamaConfig] = {
    "llama_9m": _cfg(128, 352, 4, 4),
    "llama_20m": _cfg(256, 688, 4, 4),
    "llama_35m": _cfg(384, 1024, 8, 6),
    "llama_60m": _cfg(512, 1376, 8, 8),
    "llama_130m": _cfg(768, 2048, 12, 12),
    "llama_350m": _cfg(1024, 2736, 16, 24),
    "llama_1b": _cfg(2048, 5461, 32, 24),
    "llama_3b": _cfg(2560, 6848, 32, 32),
    "llama_7b": _cfg(4096, 11008, 32, 32),
    "llama_tiny": _cfg(64, 176, 4, 2, vocab=256),
    "llama_demo": _cfg(128, 352, 4, 4, vocab=256),
}

_FIELDS = frozenset(f.name for f in dataclasses.fields(LlamaConfig))

#: every key :func:`get_preset` accepts: the ``LlamaConfig`` fields and the flat
#: projection settings of :data:`lowrank_jax.models.linears.FLAT_KEYS`.
OVERRIDE_KEYS = frozenset(_FIELDS | set(FLAT_KEYS))


def get_preset(name: str, **overrides: Any) -> LlamaConfig:
    """The preset ``name`` with ``overrides`` applied (e.g. ``max_seq_len=512``).

    ``linear`` may be a method name or a spec; the flat settings ``linear_rank``,
    ``lora_alpha``, ``lora_dropout``, ``sltrain_density``, ``sltrain_alpha`` and
    ``sltrain_sparse_impl`` go into that method's spec (and are ignored by others).

    >>> get_preset("llama_tiny", linear="cola", linear_rank=8).linear
    CoLASpec(rank=8)

    Raises:
      ValueError: on an unknown preset name or override key (the message lists
        the valid ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - OVERRIDE_KEYS)
    if unknown:
        raise ValueError(
            f"unknown LlamaConfig field(s) {unknown}; valid fields: {sorted(OVERRIDE_KEYS)}"
        )
    flat = {k: overrides.pop(k) for k in list(overrides) if k in FLAT_KEYS}
    base = PRESETS[name]
    overrides["linear"] = linear_spec(overrides.get("linear", base.linear), flat)
    return dataclasses.replace(base, **overrides)
