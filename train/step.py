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

One :func:`jax.jit` with ``donate_argnums=0`` and explicit shardings on a mesh
with one axis ``data`` (``jax.make_mesh((n,), ("data",))``, ``n=1`` by default):
every state leaf replicated, batches ``{"tokens": (B, L+1), "mask": (B, L)}``
sharded over ``data`` on the batch axis.

The optimizer is ``clip_by_global_norm(grad_clip)`` then the alias of
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

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax.models import Llama, LlamaConfig, next_token_loss, relora_merge_and_reinit
from train.config import OptimizerConfig, TrainConfig, model_config
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


def make_mesh(data_parallel: int = 1) -> jax.sharding.Mesh:
    """A mesh with one axis ``data`` of ``data_parallel`` devices."""
    if data_parallel > jax.device_count():
        raise ValueError(
            f"data_parallel={data_parallel} but only {jax.device_count()} device(s) are visible")
    # Auto axes: the model is written for jit's sharding propagation, not explicit
    # sharding-in-types (the default of ``jax.make_mesh`` in recent JAX).
    return jax.make_mesh((data_parallel,), ("data",), devices=jax.devices()[:data_parallel],
                         axis_types=(jax.sharding.AxisType.Auto,))


def build_optimizer(opt: OptimizerConfig, schedule: optax.Schedule, seed: int = 0
                    ) -> optax.GradientTransformation:
    """``[clip_by_global_norm] -> OPTIMIZERS[name](schedule, ...)``, in ``MultiSteps`` if needed."""
    alias = lj.OPTIMIZERS[opt.name]
    kwargs: dict[str, Any] = {"rank": opt.rank, "update_proj_gap": opt.update_proj_gap,
                              "scale": opt.scale, "weight_decay": opt.weight_decay}
    params = inspect.signature(alias).parameters
    takes_seed = "seed" in params or any(
        p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_seed and opt.name != "adamw":
        kwargs["seed"] = seed
    if opt.name == "adamw":
        kwargs = {"weight_decay": opt.weight_decay}
    kwargs.update(opt.kwargs)
    tx = alias(schedule, **kwargs)
    if opt.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
    if opt.accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulate)
    return tx


@dataclass
class Trainer:
    """The compiled pieces of a run.

    Attributes:
      model_cfg: the ``LlamaConfig``.
      graphdef: the model's static structure.
      tx: the full optimizer.
      schedule: ``optimizer step -> lr``.
      mesh: the device mesh.
      state_sharding: a pytree of ``NamedSharding`` shaped like the state.
      batch_sharding: ``{"tokens", "mask"}`` -> sharding over ``data``.
      abstract_state: ``jax.ShapeDtypeStruct`` pytree of the state, with shardings
        (the restore target for orbax).
      init: ``rng (uint32 (2,)) -> TrainState`` (jitted).
      step: ``(TrainState, Batch) -> (TrainState, Metrics)`` (jitted, state donated);
        metrics ``loss``, ``grad_norm`` (before clipping; of the mean gradient of
        the update when accumulating) and ``lr`` (float32 scalars).
      eval_step: ``(params, model_state, Batch) -> {"sum_loss", "num_tokens"}``
        (jitted; dropout off).
      reset: ``TrainState -> TrainState`` (jitted, state donated): one ReLoRA reset
        keyed by ``fold_in(rng, step)``; ``None`` unless ``relora.reset_every > 0``.
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

    def put_batch(self, batch: dict[str, Any]) -> Batch:
        """Host numpy batch -> device arrays sharded over ``data``."""
        return {k: jax.device_put(v, self.batch_sharding[k]) for k, v in batch.items()}


def _grad_norm(grads: Any, opt_state: Any, accumulate: int) -> jax.Array:
    """Global norm of the gradient the optimizer acts on at the end of this micro-step."""
    if accumulate <= 1:
        return optax.tree.norm(grads)
    # optax.MultiSteps keeps the running mean ``acc`` of the first ``mini_step`` grads.
    n = opt_state.mini_step.astype(jnp.float32)
    mean = jax.tree.map(lambda g, a: a + (g.astype(a.dtype) - a) / (n + 1.0),
                        grads, opt_state.acc_grads)
    return optax.tree.norm(mean)


def build_trainer(cfg: TrainConfig) -> Trainer:
    """Model, optimizer, shardings and the jitted init / train / eval steps of ``cfg``."""
    mcfg = model_config(cfg)
    schedule = make_schedule(cfg)
    tx = build_optimizer(cfg.optimizer, schedule, cfg.seed)
    accumulate = cfg.optimizer.accumulate
    mesh = make_mesh(cfg.data_parallel)
    replicated = NamedSharding(mesh, P())
    batch_sharding = {"tokens": NamedSharding(mesh, P("data", None)),
                      "mask": NamedSharding(mesh, P("data", None))}

    abstract_model = nnx.eval_shape(lambda: Llama(mcfg, rngs=nnx.Rngs(0)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract_model.eval()  # dropout off: a static attribute, so a second graph
    eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init_fn(rng: jax.Array) -> TrainState:
        init_key, run_key = jax.random.split(rng)
        _, params, model_state = nnx.split(Llama(mcfg, rngs=nnx.Rngs(init_key)), nnx.Param, ...)
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32), run_key,
                          model_state)

    shapes = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    state_sharding = jax.tree.map(lambda _: replicated, shapes)
    abstract_state = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        model = nnx.merge(graphdef, state.params, state.model_state)
        # nnx's grad (w.r.t. the Params) lets dropout advance its RNG counts in place.
        (loss, _), grads = nnx.value_and_grad(lambda m: next_token_loss(m, batch),
                                              has_aux=True)(model)
        _, _, model_state = nnx.split(model, nnx.Param, ...)
        grad_norm = _grad_norm(grads, state.opt_state, accumulate)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        lr = schedule(state.step // accumulate)
        new_state = TrainState(params, opt_state, state.step + 1, state.rng, model_state)
        return new_state, {"loss": loss, "grad_norm": grad_norm,
                           "lr": jnp.asarray(lr, jnp.float32)}

    def eval_fn(params: Any, model_state: Any, batch: Batch) -> Metrics:
        _, aux = next_token_loss(nnx.merge(eval_graphdef, params, model_state), batch)
        return aux

    init = jax.jit(init_fn, out_shardings=state_sharding)
    step = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
    eval_step = jax.jit(eval_fn, in_shardings=(state_sharding.params,
                                               state_sharding.model_state, batch_sharding),
                        out_shardings=replicated)
    reset = None
    if cfg.relora.reset_every > 0:
        reset = jax.jit(_relora_reset(graphdef, cfg), in_shardings=(state_sharding,),
                        out_shardings=state_sharding, donate_argnums=0)
    return Trainer(mcfg, graphdef, tx, schedule, mesh, state_sharding, batch_sharding,
                   abstract_state, init, step, eval_step, reset)


def _relora_reset(graphdef: nnx.GraphDef, cfg: TrainConfig
                  ) -> Callable[[TrainState], TrainState]:
    """The pure ReLoRA reset of a train state (see :func:`relora_merge_and_reinit`)."""
    r = cfg.relora
    alpha = float(model_config(cfg).lora_alpha)

    def reset(state: TrainState) -> TrainState:
        full = nnx.state(nnx.merge(graphdef, state.params, state.model_state))
        key = jax.random.fold_in(state.rng, state.step)
        full, opt_state = relora_merge_and_reinit(full, state.opt_state, key, r.prune_fraction,
                                                  r.prune, alpha=alpha)
        _, params, model_state = nnx.split(nnx.merge(graphdef, full), nnx.Param, ...)
        return state._replace(params=params, opt_state=opt_state, model_state=model_state)

    return reset
