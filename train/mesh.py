"""Device mesh, state shardings and multi-host setup for ``lowrank-train``.

The mesh has the axes ``("data", "fsdp", "tensor")`` (see
:mod:`lowrank_jax.sharding`); the train state is sharded as::

    params     param_specs(params, mesh, rules)        (embed over fsdp, heads/mlp/vocab over tensor)
    opt_state  optimizer_state_specs(tx, params, ...)  (derived from each state leaf's own shape)
    step, rng  replicated
    batches    axis 0 over (data, fsdp)

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize()``
when the environment describes a multi-process job, and :func:`host_rows`
gives each process the rows of the global batch that its devices hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank_jax import sharding as sh

__all__ = ["MULTIHOST_ENV", "host_rows", "initialize_distributed", "make_global_batch",
           "parse_mesh", "per_device_memory", "state_specs"]

#: environment variables that mean "this process is one of several".
MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _multi_process_env(env: Mapping[str, str]) -> bool:
    if any(env.get(k) for k in MULTIHOST_ENV):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    # a multi-worker Cloud TPU slice lists its workers' host names
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """``jax.distributed.initialize()`` if the environment is a multi-process job.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``), a SLURM job with more than one task, or a Cloud TPU
    slice with several workers (JAX reads the details itself). Must run before
    anything touches ``jax.devices()``. Returns whether it initialised.
    """
    env = os.environ if env is None else env
    if not _multi_process_env(env) or jax.distributed.is_initialized():
        return False
    kwargs: dict[str, Any] = {}
    address = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    if address:
        kwargs["coordinator_address"] = address
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


def state_specs(tx: Any, abstract_params: Any, mesh: jax.sharding.Mesh,
                rules: sh.Rules = sh.DEFAULT_RULES) -> tuple[Any, Any]:
    """``(param specs, optimizer state specs)`` for ``tx`` on ``mesh``."""
    pspecs = sh.param_specs(abstract_params, mesh, rules)
    return pspecs, sh.optimizer_state_specs(tx, abstract_params, pspecs, mesh)


def host_rows(global_batch: int, sharding: NamedSharding) -> slice:
    """Rows ``[start, stop)`` of a ``(global_batch, ...)`` batch held by this process.

    With the batch split over ``(data, fsdp)`` each process's devices hold one
    contiguous block of rows (devices are laid out host by host); the data
    pipeline of each process reads only those rows.
    """
    index_map = sharding.addressable_devices_indices_map((global_batch, 1))
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))


def make_global_batch(host_batch: Mapping[str, np.ndarray], global_batch: int,
                      shardings: Mapping[str, NamedSharding]) -> dict[str, jax.Array]:
    """Global ``jax.Array`` batch from this process's rows (see :func:`host_rows`).

    On one process this is ``jax.device_put`` of the whole batch.
    """
    out = {}
    for k, v in host_batch.items():
        shape = (global_batch,) + tuple(v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v), shape)
    return out


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=64"`` or ``"data=2,fsdp=4,tensor=8"`` -> ``{"data": ..., "fsdp": ..., "tensor": ...}``.

    Missing axes have size 1.
    """
    sizes = {k: 1 for k in sh.MESH_AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: bad entry {part!r}; write AXIS=SIZE with AXIS one of "
                             f"{list(sh.MESH_AXES)}, e.g. --mesh fsdp=64 or data=2,fsdp=32.")
        sizes[name] = int(value)
    return sizes


def per_device_memory(model: str, optimizer: str, mesh: Mapping[str, int],
                      rank: int | None = None, dtype: str = "fp32",
                      rules: sh.Rules = sh.DEFAULT_RULES,
                      **model_overrides: Any) -> dict[str, int]:
    """Bytes ONE device holds for a preset on a mesh of ``{axis: size}`` (no devices needed).

    Returns ``{"params", "frozen", "grads", "optimizer"}``: trainable parameters,
    the other model variables and gradients sharded by
    :func:`lowrank_jax.sharding.param_specs`, the optimizer state by
    :func:`lowrank_jax.sharding.optimizer_state_specs`. ``model_overrides`` go to
    the preset (e.g. ``linear="lora"``).
    """
    from flax import nnx

    from lowrank_jax.alias import LOWRANK_OPTIMIZERS, OPTIMIZERS, accepted_kwargs
    from lowrank_jax.memory import DTYPES
    from lowrank_jax.models import Llama, get_preset

    cfg = get_preset(model, param_dtype=DTYPES[dtype], **model_overrides)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    _, params, frozen = nnx.split(abstract, nnx.Param, ...)
    kwargs = (accepted_kwargs(optimizer, {"rank": rank})
              if rank is not None and optimizer in LOWRANK_OPTIMIZERS else {})
    tx = OPTIMIZERS[optimizer](1e-3, **kwargs)
    pspecs = sh.param_specs(params, mesh, rules)
    ospecs = sh.optimizer_state_specs(tx, params, pspecs, mesh)
    state = jax.eval_shape(tx.init, params)
    p_bytes = sh.per_device_nbytes(params, pspecs, mesh)
    f_bytes = sh.per_device_nbytes(frozen, sh.param_specs(frozen, mesh, rules), mesh)
    return {"params": p_bytes, "frozen": f_bytes, "grads": p_bytes,
            "optimizer": sh.per_device_nbytes(state, ospecs, mesh)}


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())
