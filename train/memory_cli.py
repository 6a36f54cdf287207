"""``lowrank-memory``: bytes of parameters, gradients and optimizer state for a preset.

    lowrank-memory --model llama_7b --optimizer galore_adamw --rank 1024 [--json]
    lowrank-memory --model llama_60m --linear lora --linear-rank 128
    lowrank-memory --model llama_7b --optimizer adamw galore_adamw --rank 1024 --mesh fsdp=64

``--linear`` picks the attention/MLP layer type (CoLA, SLTrain, LoRA/ReLoRA);
gradients and optimizer state then cover the trainable scalars only, and the
``frozen`` column holds the rest of the model (LoRA's base weights, SLTrain's
int32 support indices).

``--mesh data=D,fsdp=F,tensor=T`` adds what ONE device holds when the state is
sharded as ``lowrank-train`` shards it on that mesh (``docs/distributed.md``);
no devices are needed. A size that does not divide a dimension it should split
leaves that dimension whole on every device (as in ``lowrank-train``): the
figures count it so and a ``warning:`` line says which (``train/mesh_arg.py``).

``--compiled`` also compiles the real jitted train step on abstract inputs
(:mod:`train.compiled_memory`: nothing is allocated) and prints XLA's memory
analysis per device: arguments, outputs, aliased (donated) bytes, temporaries
and the peak, for ``--batch`` sequences of ``--seq`` tokens, optionally with
``--per-layer-update``, ``--scan-layers``, ``--remat`` and ``--state-dtype``::

    lowrank-memory --compiled --model llama_7b --optimizer galore_adamw8bit --rank 1024 \
        --batch 1 --seq 256 --dtype bf16 --per-layer-update

On CPU the compiled figure is XLA:CPU's; ``docs/memory.md`` says how it relates
to a GPU's. With ``--mesh`` the step is compiled on that many simulated CPU devices.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import Any

from lowrank_jax.alias import OPTIMIZERS
from lowrank_jax.memory import DTYPES, memory_report
from lowrank_jax.models import LINEAR_BUILDERS, PRESETS
from train.mesh import per_device_memory
from train.mesh_arg import mesh_fit_warnings, parse_mesh_arg
from train.user_errors import OneLineArgumentParser


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f}"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="lowrank-memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--optimizer", nargs="+", default=["adamw"],
                        help=f"one or more of: {', '.join(OPTIMIZERS)}")
    parser.add_argument("--rank", type=int, default=None, help="rank of the projection methods")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--linear", default="dense", choices=sorted(LINEAR_BUILDERS),
                        help="attention/MLP layer type (architecture methods)")
    parser.add_argument("--linear-rank", type=int, default=None,
                        help="r of the CoLA/SLTrain/LoRA factors (preset default: 128)")
    parser.add_argument("--mesh", default=None,
                        help="per-device bytes on a mesh, e.g. fsdp=64 or data=2,fsdp=8,tensor=4")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    compiled = parser.add_argument_group("compiled step (--compiled)")
    compiled.add_argument("--compiled", action="store_true",
                          help="also compile the train step and report XLA's memory analysis")
    compiled.add_argument("--batch", type=int, default=1, help="sequences per step")
    compiled.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    compiled.add_argument("--per-layer-update", action="store_true",
                          help="update each block inside the backward pass (train.per_layer)")
    compiled.add_argument("--scan-layers", action="store_true",
                          help="stack the blocks under jax.lax.scan")
    compiled.add_argument("--remat", default="none", help="block rematerialisation policy")
    compiled.add_argument("--state-dtype", default="param", choices=["param", "float32"],
                          help="optimizer state and maths in the parameter dtype or float32")
    compiled.add_argument("--accumulate", type=int, default=1,
                          help="gradient accumulation micro-steps (the batch is split)")
    return parser


def _train_config(args: argparse.Namespace, optimizer: str, dtype: str) -> Any:
    """The ``TrainConfig`` whose step ``--compiled`` measures."""
    from lowrank_jax.memory import DTYPES as NAMES
    from train.config import config_from_dict, validate

    overrides = {} if args.linear_rank is None else {"linear_rank": args.linear_rank}
    optim: dict[str, Any] = {"name": optimizer, "state_dtype": args.state_dtype,
                             "accumulate": args.accumulate}
    if args.rank is not None:
        optim["rank"] = args.rank
    raw = {"model": {"preset": args.model, "param_dtype": NAMES[dtype], "dtype": NAMES[dtype],
                     "linear": args.linear, "scan_layers": args.scan_layers,
                     "remat": args.remat, "overrides": overrides},
           "optimizer": optim, "batch_size": args.batch * args.accumulate,
           "seq_len": args.seq, "per_layer_update": args.per_layer_update,
           "mesh": parse_mesh_arg(args.mesh) if args.mesh else {}}
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def _simulate_devices(mesh: str | None) -> None:
    """Ask for enough CPU devices for ``--mesh`` (only before JAX has started a backend)."""
    if not mesh:
        return
    import jax

    n = math.prod(parse_mesh_arg(mesh).values())
    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except RuntimeError:
        pass  # a backend already exists; build_trainer reports too few devices



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model not in PRESETS:
            raise ValueError(f"unknown model preset {args.model!r}; valid: {', '.join(PRESETS)}")
        for name in args.optimizer:
            if name not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
        for name in ("rank", "linear_rank"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, name)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            overrides = {} if args.linear_rank is None else {"linear_rank": args.linear_rank}
            reports = [memory_report(args.model, opt, args.rank, dtype, linear=args.linear,
                                     model_overrides=overrides)
                       for dtype in args.dtype for opt in args.optimizer]
            compiled = []
            if args.compiled:
                _simulate_devices(args.mesh)
                from train.compiled_memory import compiled_step_memory

                compiled = [compiled_step_memory(_train_config(args, r.optimizer, r.dtype))
                            for r in reports]
            per_device, mesh_warnings = [], []
            if args.mesh is not None:
                mesh = parse_mesh_arg(args.mesh)
                mesh_warnings = mesh_fit_warnings(args.model, mesh, linear=args.linear, **overrides)
                per_device = [per_device_memory(args.model, r.optimizer, mesh, args.rank, r.dtype,
                                                linear=args.linear, **overrides)
                              for r in reports]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in mesh_warnings:  # sizes that do not divide the model (train/mesh_arg.py)
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        rows = [r.as_dict() for r in reports]
        for row, dev in zip(rows, per_device):
            row["per_device"] = {**dev, "total": sum(dev.values()), "mesh": args.mesh,
                                 "warnings": mesh_warnings}
        for row, c in zip(rows, compiled):
            row["compiled"] = {**c.as_dict(), "batch": args.batch, "seq": args.seq,
                               "per_layer_update": args.per_layer_update,
                               "scan_layers": args.scan_layers, "remat": args.remat,
                               "state_dtype": args.state_dtype, "mesh": args.mesh}
        print(json.dumps(rows, indent=2))
        return 0
    first = reports[0]
    print(f"{args.model} (linear={args.linear}): {first.num_params:,} scalars, "
          f"{first.num_trainable:,} trainable (GiB = 2^30 bytes)")
    print(f"{'optimizer':18s} {'dtype':5s} {'rank':>5s} {'params':>9s} {'frozen':>9s} "
          f"{'grads':>9s} {'opt state':>9s} {'total':>9s} {'state scalars':>14s}")
    for r in reports:
        print(f"{r.optimizer:18s} {r.dtype:5s} {r.rank or '-'!s:>5s} {_gib(r.params_bytes)} "
              f"{_gib(r.frozen_bytes)} {_gib(r.grads_bytes)} {_gib(r.optimizer_bytes)} "
              f"{_gib(r.total_bytes)} {r.num_optimizer_scalars:>14,}")
    if compiled:
        mode = "per-layer update" if args.per_layer_update else "standard step"
        layout = "scanned" if args.scan_layers else "unrolled"
        print(f"compiled train step ({mode}, {layout} layers, batch {args.batch} x {args.seq} "
              f"tokens, remat {args.remat}; XLA memory analysis per device, GiB):")
        print(f"{'optimizer':18s} {'dtype':5s} {'arguments':>9s} {'outputs':>9s} {'aliased':>9s} "
              f"{'temps':>9s} {'peak':>9s} {'analytic':>9s} {'compile s':>9s}")
        for r, c in zip(reports, compiled):
            print(f"{r.optimizer:18s} {r.dtype:5s} {_gib(c.arguments)} {_gib(c.outputs)} "
                  f"{_gib(c.aliased)} {_gib(c.temporaries)} {_gib(c.peak)} "
                  f"{_gib(r.total_bytes)} {c.compile_seconds:9.1f}")
    if per_device:
        print(f"per device on mesh {args.mesh}:")
        for r, dev in zip(reports, per_device):
            print(f"{r.optimizer:18s} {r.dtype:5s} {r.rank or '-'!s:>5s} {_gib(dev['params'])} "
                  f"{_gib(dev['frozen'])} {_gib(dev['grads'])} {_gib(dev['optimizer'])} "
                  f"{_gib(sum(dev.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
