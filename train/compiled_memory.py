"""Memory of the real train step, measured by XLA on abstract inputs (nothing allocated).

:func:`compiled_step_memory` builds the run's trainer (:func:`train.step.build_trainer`),
lowers its jitted step on ``jax.ShapeDtypeStruct`` inputs (the train state and a
``(micro-batch, seq_len + 1)`` token batch, with their shardings) and compiles it;
XLA's buffer assignment then reports, per device::

    arguments    the train state and the batch
    outputs      the new train state and the metrics
    aliased      output bytes written into donated argument buffers (the state)
    temporaries  every intermediate buffer: activations saved for the backward
                 pass, gradients, optimizer temporaries, workspaces
    peak         arguments + outputs - aliased + temporaries: what the device holds
                 while the step runs

How close the CPU figure is to a GPU's: both come from XLA's buffer assignment
of the same HLO, with the same donation/aliasing, so arguments, outputs and
aliased bytes are identical. Temporaries differ with the backend's passes:

* fusion: XLA:GPU fuses more element-wise work into fewer kernels, so fewer
  intermediates are materialised (the CPU figure is an upper bound there);
* dots in bfloat16: XLA:CPU has no native bf16 matmul and computes some dots
  after converting operands to float32, adding float32 copies that a GPU does
  not make (for bf16 models the CPU temporaries are an overestimate);
* libraries: cuBLAS/cuDNN workspaces (tens of MiB) and the latency-hiding
  scheduler's overlapping buffers add to a GPU's temporaries;
* runtime: the CUDA context and the allocator's fragmentation (not in any
  compiled figure) take a further few hundred MiB to ~1 GiB on a real device.

So for a given step the CPU peak is within a few percent of a GPU's compiled
peak for float32 models (both are dominated by the state and the saved
activations) and above it for bfloat16 ones; leave ~1-2 GiB of headroom for the
runtime when comparing with a card's capacity.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from train.config import TrainConfig

__all__ = ["CompiledMemory", "compiled_step_memory"]


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of one compiled train step (bytes per device)."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    compile_seconds: float

    @property
    def peak(self) -> int:
        """``arguments + outputs - aliased + temporaries``."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def as_dict(self) -> dict[str, Any]:
        """Every field and the peak."""
        return {**dataclasses.asdict(self), "peak": self.peak}


def _abstract_batch(cfg: TrainConfig, sharding: dict[str, NamedSharding]) -> dict[str, Any]:
    b, n = cfg.micro_batch_size, cfg.seq_len
    return {"tokens": jax.ShapeDtypeStruct((b, n + 1), jnp.int32, sharding=sharding["tokens"]),
            "mask": jax.ShapeDtypeStruct((b, n), jnp.float32, sharding=sharding["mask"])}


def compiled_step_memory(cfg: TrainConfig) -> CompiledMemory:
    """Compile ``cfg``'s train step on abstract inputs and read XLA's memory analysis.

    Args:
      cfg: a validated run config (model, optimizer, dtypes, ``scan_layers``,
        ``remat``, ``per_layer_update``, ``batch_size`` / ``accumulate``,
        ``seq_len``, mesh); the mesh's devices must be visible (simulated CPU
        devices do: ``jax.config.update("jax_num_cpu_devices", n)`` first).

    Returns:
      a :class:`CompiledMemory`; ``compile_seconds`` is the lowering plus compile time.
    """
    from train.step import build_trainer

    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    lowered = trainer.step.lower(trainer.abstract_state,
                                 _abstract_batch(cfg, trainer.batch_sharding))
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    return CompiledMemory(int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                          int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
                          int(stats.generated_code_size_in_bytes), seconds)
