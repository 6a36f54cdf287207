"""The jitted train and eval steps, on a pure-JAX train state.

The model is split once, ``graphdef, params, model_state = nnx.split(model,
nnx.Param, ...)``; the state the step carries is a plain pytree
(:class:`TrainState`), so orbax saves and restores it directly::

    TrainState(params:      nnx.State of the model's Params (fp32 or bf16)
               opt_state:   the optax state (projectors, moments, counters)
               step:        int32 () micro-steps done
               rng:         uint32 (2,) the run's PRNG key
               model_state: nnx.State of every other model variable: LoRA's frozen
                            ``kernel``, SLTrain's ``sparse_index`` support, dropout
                            RNG streams (empty for dense models))

Only ``params`` are differentiated and updated by the optimizer; ``model_state``
changes only through dropout RNG counts and ReLoRA resets (:attr:`Trainer.reset`).

One :func:`jax.jit` with ``donate_argnums=0`` and explicit shardings on the
mesh ``(data, fsdp, tensor)`` of ``cfg.mesh`` (one device by default): params and
``model_state`` by :func:`lowrank_jax.sharding.param_specs` with the config's
logical-axis rules ``cfg.mesh.rules`` (by default FSDP over the model
width, tensor parallelism over heads/MLP/vocab), the optimizer state by
:func:`lowrank_jax.sharding.optimizer_state_specs`, ``step``/``rng`` replicated,
batches ``{"tokens": (B, L+1), "mask": (B, L)}`` split over ``data`` x ``fsdp``
on the batch axis (``docs/distributed.md``).

The optimizer is ``clip_by_global_norm_torch(grad_clip)`` (PyTorch's
``clip_grad_norm_``: ``g * min(1, c / (||g|| + 1e-6))``, as the reference loops
clip) then the alias of
``lowrank_jax.OPTIMIZERS`` with the schedule as its learning rate, wrapped in
``optax.MultiSteps`` when ``accumulate > 1`` (the clip then acts on the mean
gradient of the update, as in PyTorch loops that clip after accumulating).

Evaluation: :func:`make_eval_step` returns the summed token loss and the number
of tokens of a batch; over a fixed list of validation batches the loop reports
``val_loss = sum(sum_loss) / sum(num_tokens)`` and ``val_ppl = exp(val_loss)``.

Comparing with GaLore's numbers: their ``evaluate_model``
(``torchrun_main.py``) sums the per-batch mean losses of ``n`` batches and
divides by ``n + 1``. With equal-sized full batches our ``val_loss`` equals
their per-batch mean, so their reported loss is ``val_loss * n / (n + 1)`` and
their perplexity ``exp(val_loss * n / (n + 1))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax import sharding as sh
from lowrank_jax.clipping import clip_by_global_norm_torch
from lowrank_jax.models import (
    Llama,
    LlamaConfig,
    next_token_loss,
    relora_merge_and_reinit,
    stack_layers,
    unstack_layers,
)
from train.config import OptimizerConfig, TrainConfig, axis_rules, mesh_shape, model_config
from train.finite_guard import guard_step
from train.mesh import host_rows, make_global_batch
from train.per_layer import layerwise_init, layerwise_specs, make_per_layer_step
from train.schedule import make_schedule

__all__ = ["TrainState", "Trainer", "build_optimizer", "build_trainer", "make_mesh"]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    """Everything a run needs to continue bit-exactly (a pure pytree)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    model_state: Any


def make_mesh(shape: int | Mapping[str, int] = 1) -> jax.sharding.Mesh:
    """The ``(data, fsdp, tensor)`` mesh of ``shape`` (an int: that many ``data`` devices).

    A ``-1`` size takes the devices left over; a mesh larger than the visible
    devices is a one-line ``ValueError``.
    """
    sizes = {"data": shape} if isinstance(shape, int) else dict(shape)
    n = jax.device_count()
    if -1 not in sizes.values() and math.prod(sizes.values()) > n:
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but only {n} "
                         "are visible")
    if -1 in sizes.values():
        return sh.make_mesh(sizes)
    # a mesh on fewer devices than visible uses the first ones
    return sh.make_mesh(sizes, jax.devices()[:math.prod(sizes.values())])


def build_optimizer(opt: OptimizerConfig, schedule: optax.Schedule, seed: int = 0
                    ) -> optax.GradientTransformation:
    """``[clip_by_global_norm] -> OPTIMIZERS[name](schedule, ...)``, in ``MultiSteps`` if needed."""
    alias = lj.OPTIMIZERS[opt.name]
    # the config's common fields go to the aliases that take them (lj.alias.accepted_kwargs)
    kwargs: dict[str, Any] = lj.alias.accepted_kwargs(opt.name, {
        "rank": opt.rank, "update_proj_gap": opt.update_proj_gap, "scale": opt.scale,
        "weight_decay": opt.weight_decay, "seed": seed,
        # projectors stored in the dtype the optimizer sees the parameters in (GaLore's
        # reference casts its projector to the gradient's dtype): bfloat16 for bf16
        # parameters unless optimizer.state_dtype is float32
        "projector_dtype": None})
    kwargs.update(opt.kwargs)
    tx = alias(schedule, **kwargs)
    if opt.grad_clip > 0:
        tx = optax.chain(clip_by_global_norm_torch(opt.grad_clip), tx)
    if opt.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulate)
    return tx


@dataclass
class Trainer:
    """The compiled pieces of a run.

    Attributes:
      model_cfg: the ``LlamaConfig``.
      graphdef: the model's static structure.
      tx: the full optimizer, on the model's parameter layout (with ``scan_layers``
        it runs on their unrolled view; with ``per_layer_update`` the step applies the
        underlying transformation block by block instead).
      schedule: ``optimizer step -> lr``.
      mesh: the device mesh.
      state_sharding: a pytree of ``NamedSharding`` shaped like the state.
      batch_sharding: ``{"tokens", "mask"}`` -> sharding over ``data`` x ``fsdp``.
      abstract_state: ``jax.ShapeDtypeStruct`` pytree of the state, with shardings
        (the restore target for orbax).
      init: ``rng (uint32 (2,)) -> TrainState`` (jitted).
      step: ``(TrainState, Batch) -> (TrainState, Metrics)`` (jitted, state donated);
        metrics ``loss``, ``grad_norm`` (before clipping; of the mean gradient of
        the update when accumulating) and ``lr`` (float32 scalars), and ``nonfinite``
        (bool: the step was not finite and, by default, left the state unchanged;
        :mod:`train.finite_guard`).
      eval_step: ``(params, model_state, Batch) -> {"sum_loss", "num_tokens"}``
        (jitted; dropout off).
      reset: ``TrainState -> TrainState`` (jitted, state donated): one ReLoRA reset
        keyed by ``fold_in(rng, step)``; ``None`` unless ``relora.reset_every > 0``.
      step_fn, eval_fn, reset_fn: the same three functions before ``jax.jit`` (for
        ``jax.vmap`` over seeds, :mod:`train.seeds`).
    """

    model_cfg: LlamaConfig
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: dict[str, NamedSharding]
    abstract_state: TrainState
    init: Callable[[jax.Array], TrainState]
    step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    eval_step: Callable[[Any, Any, Batch], Metrics]
    reset: Callable[[TrainState], TrainState] | None = None
    step_fn: Callable[[TrainState, Batch], tuple[TrainState, Metrics]] | None = None
    eval_fn: Callable[[Any, Any, Batch], Metrics] | None = None
    reset_fn: Callable[[TrainState], TrainState] | None = None

    def put_batch(self, batch: dict[str, Any]) -> Batch:
        """Global host numpy batch -> device arrays split over ``data`` x ``fsdp``.

        With several processes each keeps only the rows its devices hold
        (:func:`train.mesh.host_rows`) and the global array is assembled from them.
        """
        if jax.process_count() == 1:
            return {k: jax.device_put(v, self.batch_sharding[k]) for k, v in batch.items()}
        n = len(next(iter(batch.values())))
        rows = host_rows(n, self.batch_sharding["tokens"])
        return make_global_batch({k: v[rows] for k, v in batch.items()}, n,
                                 self.batch_sharding)


def _grad_norm(grads: Any, opt_state: Any, accumulate: int) -> jax.Array:
    """Global norm of the gradient the optimizer acts on at the end of this micro-step."""
    if accumulate <= 1:
        return optax.tree.norm(grads)
    # optax.MultiSteps keeps the running mean ``acc`` of the first ``mini_step`` grads.
    n = opt_state.mini_step.astype(jnp.float32)
    mean = jax.tree.map(lambda g, a: a + (g.astype(a.dtype) - a) / (n + 1.0),
                        grads, opt_state.acc_grads)
    return optax.tree.norm(mean)


def optimizer_view(cfg: TrainConfig, mcfg: LlamaConfig) -> Callable[[Any], Any]:
    """What the optimizer sees of a params/grads tree: a float32 cast if ``state_dtype`` asks."""
    if cfg.optimizer.state_dtype == "float32" and mcfg.param_dtype != "float32":
        return lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    return lambda tree: tree


def _on_model_layout(tx: optax.GradientTransformation, to_opt: Callable[[Any], Any],
                     from_opt: Callable[[Any], Any]) -> optax.GradientTransformation:
    """``tx`` run on ``to_opt`` of the params/grads, its updates mapped back by ``from_opt``."""

    def init(params: Any) -> Any:
        return tx.init(to_opt(params))

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = tx.update(to_opt(grads), state,
                                   None if params is None else to_opt(params))
        return from_opt(updates), state

    return optax.GradientTransformation(init, update)


def _per_layer_only(*args: Any) -> Any:
    raise NotImplementedError("with per_layer_update the train step applies the optimizer "
                              "block by block (train.per_layer); there is no whole-tree update")


class _OnMesh:
    """A jitted function called under ``jax.set_mesh(mesh)`` (activation constraints resolve)."""

    def __init__(self, fn: Any, mesh: jax.sharding.Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self.mesh):
            return self.fn(*args)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower`` under the mesh."""
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Model, optimizer, shardings and the jitted init / train / eval steps of ``cfg``.

    ``model.scan_layers``: the optimizer runs on the unrolled view of the stacked
    parameters (:func:`lowrank_jax.models.unstack_layers`), so its state has the
    layout of an unrolled run. ``per_layer_update``: :mod:`train.per_layer`.
    """
    mcfg = model_config(cfg)
    schedule = make_schedule(cfg)
    tx = build_optimizer(cfg.optimizer, schedule, cfg.seed)
    accumulate = cfg.optimizer.accumulate
    per_layer = cfg.per_layer_update
    mesh = make_mesh(mesh_shape(cfg))
    replicated = NamedSharding(mesh, P())
    rules = axis_rules(cfg)
    batch_sharding = {"tokens": NamedSharding(mesh, sh.batch_spec(mesh, rules)),
                      "mask": NamedSharding(mesh, sh.batch_spec(mesh, rules))}

    abstract_model = nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    view = optimizer_view(cfg, mcfg)
    n_layers = mcfg.num_layers
    if per_layer:
        run_tx = optax.GradientTransformation(lambda p: layerwise_init(tx, view(p)),
                                              _per_layer_only)
    elif mcfg.scan_layers:
        run_tx = _on_model_layout(tx, lambda t: view(unstack_layers(t, n_layers)), stack_layers)
    else:
        run_tx = _on_model_layout(tx, view, lambda t: t)
    per_layer_fn = make_per_layer_step(abstract_model, tx, mcfg.remat, accumulate, view,
                                       skip_nonfinite=cfg.nonfinite.skip) if per_layer else None
    abstract_model.eval()  # dropout off: a static attribute, so a second graph
    eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init_fn(rng: jax.Array) -> TrainState:
        init_key, run_key = jax.random.split(rng)
        _, params, model_state = nnx.split(Llama(mcfg, rngs=nnx.Rngs(init_key)), nnx.Param, ...)
        return TrainState(params, run_tx.init(params), jnp.zeros((), jnp.int32), run_key,
                          model_state)

    shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    param_specs = sh.param_specs(shapes.params, mesh, rules)
    if per_layer:
        opt_specs = layerwise_specs(tx, view(shapes.params), param_specs, mesh)
    elif mcfg.scan_layers:
        opt_specs = sh.optimizer_state_specs(tx, view(unstack_layers(shapes.params, n_layers)),
                                             unstack_layers(param_specs, n_layers), mesh)
    else:
        opt_specs = sh.optimizer_state_specs(tx, view(shapes.params), param_specs, mesh)
    specs = TrainState(param_specs, opt_specs, P(), P(),
                       sh.param_specs(shapes.model_state, mesh, rules))
    state_sharding = sh.named_shardings(specs, mesh)
    abstract_state = jax.tree.map(
        lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd), shapes,
        state_sharding)

    def standard_step(state: TrainState, batch: Batch) -> tuple[Any, Any, Any, Metrics]:
        model = nnx.merge(graphdef, state.params, state.model_state)
        # nnx's grad (w.r.t. the Params) lets dropout advance its RNG counts in place.
        (loss, _), grads = nnx.value_and_grad(lambda m: next_token_loss(m, batch),
                                              has_aux=True)(model)
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        opt_grads = view(unstack_layers(grads, n_layers)) if mcfg.scan_layers else view(grads)
        grad_norm = _grad_norm(opt_grads, state.opt_state, accumulate)
        updates, opt_state = run_tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return params, model_state, opt_state, {"loss": loss, "grad_norm": grad_norm}

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if per_layer:
            params, model_state, opt_state, metrics = per_layer_fn(
                state.params, state.model_state, state.opt_state, batch)
        else:
            params, model_state, opt_state, metrics = standard_step(state, batch)
        lr = schedule(state.step // accumulate)
        new_state = TrainState(params, opt_state, state.step + 1, state.rng, model_state)
        return new_state, {**metrics, "lr": jnp.asarray(lr, jnp.float32)}

    # NaN/inf: state unchanged. The per-layer step skips group by group (each block keeps
    # its state when its gradient is not finite): a whole-state choice would hold the
    # old state next to the new one, which the per-layer step exists to avoid
    train_step = guard_step(train_step, skip=cfg.nonfinite.skip and not per_layer)

    def eval_fn(params: Any, model_state: Any, batch: Batch) -> Metrics:
        _, aux = next_token_loss(nnx.merge(eval_graphdef, params, model_state), batch)
        return aux

    init = jax.jit(init_fn, out_shardings=state_sharding)
    step = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
    eval_step = jax.jit(eval_fn, in_shardings=(state_sharding.params,
                                               state_sharding.model_state, batch_sharding),
                        out_shardings=replicated)
    if mesh.size > 1:
        step, eval_step = _OnMesh(step, mesh), _OnMesh(eval_step, mesh)
    reset = reset_fn = None
    if cfg.relora.reset_every > 0:
        reset_fn = _relora_reset(graphdef, cfg)
        reset = jax.jit(reset_fn, in_shardings=(state_sharding,),
                        out_shardings=state_sharding, donate_argnums=0)
    return Trainer(mcfg, graphdef, run_tx, schedule, mesh, state_sharding, batch_sharding,
                   abstract_state, init, step, eval_step, reset, train_step, eval_fn,
                   reset_fn)


def _relora_reset(graphdef: nnx.GraphDef, cfg: TrainConfig
                  ) -> Callable[[TrainState], TrainState]:
    """The pure ReLoRA reset of a train state (see :func:`relora_merge_and_reinit`)."""
    r = cfg.relora
    alpha = float(model_config(cfg).linear.alpha)

    def reset(state: TrainState) -> TrainState:
        full = nnx.state(nnx.merge(graphdef, state.params, state.model_state))
        key = jax.random.fold_in(state.rng, state.step)
        full, opt_state = relora_merge_and_reinit(full, state.opt_state, key, r.prune_fraction,
                                                  r.prune, alpha=alpha)
        _, params, model_state = nnx.split(nnx.merge(graphdef, full), nnx.Param, ...)
        return state._replace(params=params, opt_state=opt_state, model_state=model_state)

    return reset
