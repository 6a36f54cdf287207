"""Learning-rate schedules: linear warmup then cosine to a floor (GaLore's recipe).

GaLore (jiaweizzhao/GaLore ``peft_pretraining/training_utils.py``,
``get_cosine_schedule_with_warmup`` with ``min_lr_ratio=0.1``) multiplies the
peak learning rate by::

    t < W:   t / max(1, W)
    t >= W:  r + (1 - r) * 0.5 * (1 + cos(pi * (t - W) / max(1, T - W)))

where ``t`` is the number of updates already done (so the first update uses
``lr * 0``, as ``torch.optim.lr_scheduler.LambdaLR`` does), ``W`` the warmup
steps, ``T`` the total steps and ``r`` the floor ratio. optax passes the same
``t`` (the optimizer's update count) to a schedule.

>>> import numpy as np
>>> s = warmup_cosine(1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
>>> [round(float(s(t)), 4) for t in (0, 5, 10, 55, 100)]
[0.0, 0.5, 1.0, 0.55, 0.1]
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from train.config import TrainConfig

__all__ = ["make_schedule", "warmup_constant", "warmup_cosine"]


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
    """GaLore's cosine schedule with linear warmup to ``min_lr_ratio * peak_lr``.

    Args:
      peak_lr: learning rate at the end of warmup.
      total_steps: ``T``, the number of updates of the run.
      warmup_steps: ``W``.
      min_lr_ratio: the floor reached at ``t = T``.

    Returns:
      ``t -> lr`` (float32 scalar), ``t`` an int count of updates done.
    """
    w = float(max(1, warmup_steps))
    decay_len = float(max(1, total_steps - warmup_steps))

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = t / w
        progress = jnp.clip((t - warmup_steps) / decay_len, 0.0, 1.0)
        cosine = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return peak_lr * jnp.where(t < warmup_steps, warm, cosine)

    return schedule


def warmup_constant(peak_lr: float, warmup_steps: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` updates, then ``peak_lr``."""
    w = float(max(1, warmup_steps))

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        return peak_lr * jnp.where(t < warmup_steps, t / w, 1.0)

    return schedule


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """The schedule a :class:`~train.config.TrainConfig` asks for (counts optimizer updates).

    With ``relora.reset_every > 0`` the cosine becomes ReLoRA's cosine with restarts
    (:func:`lowrank_jax.models.cosine_with_restarts_schedule`).
    """
    s = cfg.schedule
    if s.name == "cosine" and cfg.relora.reset_every > 0:
        from lowrank_jax.models import cosine_with_restarts_schedule

        return cosine_with_restarts_schedule(
            cfg.optimizer.lr, cfg.steps, cfg.warmup_steps, cfg.relora.reset_every,
            cfg.relora.restart_warmup_steps, s.min_lr_ratio)
    if s.name == "cosine":
        return warmup_cosine(cfg.optimizer.lr, cfg.steps, cfg.warmup_steps, s.min_lr_ratio)
    if s.name == "constant":
        return warmup_constant(cfg.optimizer.lr, cfg.warmup_steps)
    raise ValueError(f"unknown schedule {s.name!r}; valid schedules: cosine, constant")
