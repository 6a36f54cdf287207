"""Optimizers over a whole parameter tree, one per paper, optax style.

Each alias routes the selected 2-D leaves (default: GaLore's rule, 2-D leaves
whose path contains ``attn``/``attention``/``mlp``) through
:func:`scale_by_lowrank` and every other leaf through the same inner optimizer
at full size, then scales by the learning rate and applies decoupled weight
decay on the full-size parameters. Defaults are the reference code's
hyper-parameters and formulas, so ``galore_adamw(lr, rank=r)`` *is* GaLore.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lowrank_jax.adam_mini import llama_partition, scale_by_adam_mini
from lowrank_jax.block_subspace import scale_by_block_subspace
from lowrank_jax.inner import (
    scale_by_adam_bias_correction,
    scale_by_reference_adafactor,
    scale_by_reference_adam,
)
from lowrank_jax.projectors import PROJECTORS, SwitchProjector
from lowrank_jax.quantized import scale_by_adam_8bit
from lowrank_jax.selection import DENSE, LOWRANK, resolve_labels
from lowrank_jax.transform import scale_by_compressed_momentum, scale_by_lowrank
from lowrank_jax.tree_util import path_string
from lowrank_jax.weight_decay import add_decayed_weights_after_update

ScalarOrSchedule = float | Callable[[Any], Any]

__all__ = [
    "LOWRANK_OPTIMIZERS",
    "OPTIMIZERS",
    "adam_mini",
    "adamw",
    "apollo_adamw",
    "apollo_mini",
    "dct_adamw",
    "fira_adamw",
    "flora",
    "frugal",
    "galore_adafactor",
    "galore_adam_mini",
    "galore_adamw",
    "galore_adamw8bit",
    "golore_adamw",
    "sara_adamw",
]


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _assemble(learning_rate, lowrank_tx, dense_tx, *, labels, weight_decay,
              decay_after_update: bool, post: optax.GradientTransformation | None = None):
    """partition(lowrank | dense) -> [post] -> learning rate -> weight decay."""
    parts = [optax.partition({LOWRANK: lowrank_tx, DENSE: dense_tx}, resolve_labels(labels))]
    if post is not None:
        parts.append(post)
    if not decay_after_update and not _is_zero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if decay_after_update and not _is_zero(weight_decay):
        parts.append(add_decayed_weights_after_update(learning_rate, weight_decay))
    return optax.chain(*parts)


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, **unused: Any
          ) -> optax.GradientTransformation:
    """Full-rank AdamW as the papers' baselines use it (``torch.optim.AdamW`` defaults).

    ``optax.adamw`` with eps 1e-8 and weight decay 0 unless given (optax's own
    default decay is 1e-4). Extra keyword arguments (``rank``...) are ignored so
    configs can switch optimizers freely.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = adamw(1e-3)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    del unused
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def galore_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    decay_after_update: bool = True, inner: str = "adam", num_heads: int | None = None,
    stagger: bool = False,
) -> optax.GradientTransformation:
    """GaLore-AdamW (Zhao et al. 2024; jiaweizzhao/GaLore ``galore_torch/adamw.py``).

    Selected matrices: top-``rank`` SVD projector refreshed every
    ``update_proj_gap`` steps, Adam on the projected gradient with eps added to
    the uncorrected ``sqrt(v)``, back-projection times ``scale``. Other leaves:
    the same Adam at full size. Weight decay is applied after the update, as the
    reference does (``decay_after_update=False`` gives optax's placement).

    Args:
      learning_rate: a float or an optax schedule.
      rank, update_proj_gap, scale: GaLore's ``rank``, ``T`` and ``scale``.
      b1, b2, eps: Adam's constants (reference eps 1e-6).
      weight_decay: decoupled decay on the full-size parameters (all leaves).
      labels: ``None`` (GaLore's name rule), a pytree of bools / labels, or a
        function of the params returning one.
      proj_type, moments, layout, seed, projector, stagger: see :func:`scale_by_lowrank`
        (``stagger=True`` spreads the SVDs of different matrices over the steps of a period).
      inner: ``"adam"`` (the reference's Adam) or ``"adam_mini"``: Adam-mini
        (:func:`lowrank_jax.adam_mini.scale_by_adam_mini`) with one second-moment
        value per row of each projected ``(k, r)`` matrix (``partition="projected"``)
        and Adam-mini's name-based blocks for the other leaves (``num_heads`` as
        :func:`lowrank_jax.adam_mini.llama_partition`).

    >>> import jax, jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = galore_adamw(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> jax.tree.map(jnp.shape, updates)["attn"]["q"]
    (16, 8)
    """
    if inner == "adam":
        small, dense = scale_by_reference_adam(b1, b2, eps), scale_by_reference_adam(b1, b2, eps)
    elif inner == "adam_mini":
        small = scale_by_adam_mini(b1, b2, eps, partition="projected")
        dense = scale_by_adam_mini(b1, b2, eps, partition=llama_partition(num_heads, layout))
    else:
        raise ValueError(f"inner={inner!r} is not supported; use 'adam' or 'adam_mini'.")
    lowrank = scale_by_lowrank(
        small, rank=rank, projector=projector, update_every=update_proj_gap, scale=scale,
        proj_type=proj_type, moments=moments, seed=seed, layout=layout, stagger=stagger)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update)


def galore_adam_mini(learning_rate: ScalarOrSchedule, rank: int = 128,
                     update_proj_gap: int = 200, scale: float = 0.25, eps: float = 1e-8,
                     **kwargs: Any) -> optax.GradientTransformation:
    """GaLore with Adam-mini as the inner optimizer: :func:`galore_adamw` ``(inner="adam_mini")``.

    The projected ``(k, r)`` moments become a ``(k, r)`` first moment and ``k``
    second-moment values per matrix (eps 1e-8, Adam-mini's default).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = galore_adam_mini(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    return galore_adamw(learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                        eps=eps, inner="adam_mini", **kwargs)


def adam_mini(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, num_heads: int | None = None,
              layout: str = "flax", partition: Any = None, **unused: Any
              ) -> optax.GradientTransformation:
    """Adam-mini (Zhang et al. 2024; zyushun/Adam-mini): AdamW with one ``v`` per block.

    Blocks by :func:`lowrank_jax.adam_mini.llama_partition` (per head for query/key
    when ``num_heads`` is given, else per output neuron; per output neuron for
    value/output/MLP; per token for embedding and LM head; one per norm) unless
    ``partition`` is given. Decoupled weight decay ``W -= lr * wd * W`` before the
    update, skipped for norms and biases (as the reference). Extra keyword
    arguments (``rank``...) are ignored so configs can switch optimizers freely.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = adam_mini(1e-3)
    >>> tx.init(params)[0].nu["mlp"]["up"].shape     # one value per output neuron
    (1, 8)
    """
    del unused
    rule = llama_partition(num_heads, layout) if partition is None else partition
    parts = [scale_by_adam_mini(b1, b2, eps, partition=rule)]
    if not _is_zero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: not norms, not biases (Adam-mini's rule)."""

    def keep(path, _):
        name = path_string(path).lower()
        return not ("norm" in name or "bias" in name)

    return jax.tree_util.tree_map_with_path(keep, params)


def sara_adamw(learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
               scale: float = 0.25, **kwargs: Any) -> optax.GradientTransformation:
    """SARA-AdamW (arXiv 2502.05790): GaLore with importance-sampled singular vectors.

    ``rank`` singular vectors drawn without replacement with probability
    proportional to the singular values, sorted, at every refresh; the rest is
    GaLore-AdamW (same keyword arguments).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = sara_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    return galore_adamw(learning_rate, rank=rank, update_proj_gap=update_proj_gap,
                        scale=scale, projector="sara", **kwargs)


def golore_adamw(learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, random_after: int = 0, moments: str = "transport",
                 **kwargs: Any) -> optax.GradientTransformation:
    """GoLore (pkumelon/Golore): GaLore whose late projections are random.

    Refreshes at 0-based steps ``>= random_after`` use a Haar-random matrix with
    orthonormal columns instead of the SVD (the paper switches after 80% of
    training: pass ``random_after=int(0.8 * total_steps)``). The reference moves
    the first moment into the new basis at each refresh (``moments='transport'``);
    its code assigns the moved moment to a temporary and so drops it after that
    step, which this implementation does not reproduce.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = golore_adamw(1e-2, rank=4, random_after=1000)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    switch = SwitchProjector(PROJECTORS["svd"], PROJECTORS["random"], int(random_after))
    return galore_adamw(learning_rate, rank=rank, update_proj_gap=update_proj_gap,
                        scale=scale, projector=switch, moments=moments, **kwargs)


def fira_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    gamma: float = 1.01, decay_after_update: bool = True, stagger: bool = False,
) -> optax.GradientTransformation:
    """Fira-AdamW (Chen et al. 2024; xichen-fy/Fira ``optimizer_torch/fira_adamw.py``).

    GaLore-AdamW plus the residual ``(G - scale P P^T G) * phi`` with
    ``phi = ||N|| / ||R||`` along the projected axis and the norm-growth limiter
    (``gamma``). ``scale`` is the paper's alpha (0.25 up to 350M, 0.0625 for
    1B/7B). Adam's bias correction is applied after the residual rule, as the
    reference does.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = fira_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    lowrank = scale_by_lowrank(
        scale_by_reference_adam(b1, b2, eps, bias_correction=False), rank=rank,
        projector=projector, update_every=update_proj_gap, scale=scale, proj_type=proj_type,
        moments=moments, residual="fira", seed=seed, layout=layout, fira_gamma=gamma,
        stagger=stagger)
    dense = scale_by_reference_adam(b1, b2, eps, bias_correction=False)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update,
                     post=scale_by_adam_bias_correction(b1, b2))


def dct_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 1,
    scale: float = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", refresh_rule: str = "first_and_multiples",
) -> optax.GradientTransformation:
    """SVD-free low-rank AdamW with a DCT basis (IST-DASLab ``fft_low_rank/dct_adamw.py``).

    The subspace is the ``rank`` DCT-II basis vectors best aligned (l1) with the
    gradient, recomputed at step 1 and every ``update_proj_gap`` steps (reference
    default: every step); only their int32 indices are stored. Adam is
    ``optax.scale_by_adam`` (eps on the bias-corrected root, as torch's AdamW
    and the reference), no scale factor, weight decay before the update.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = dct_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    lowrank = scale_by_lowrank(
        optax.scale_by_adam(b1, b2, eps), rank=rank, projector="dct",
        update_every=update_proj_gap, scale=scale, proj_type=proj_type, moments=moments,
        layout=layout, refresh_rule=refresh_rule)
    return _assemble(learning_rate, lowrank, optax.scale_by_adam(b1, b2, eps), labels=labels,
                     weight_decay=weight_decay, decay_after_update=False)


def galore_adafactor(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, weight_decay: float = 0.0, labels: Any = None,
    proj_type: str = "std", moments: str = "keep", layout: str = "flax", seed: int = 0,
    projector: Any = "svd", inner: str = "reference", stagger: bool = False,
) -> optax.GradientTransformation:
    """GaLore-Adafactor (jiaweizzhao/GaLore ``galore_torch/adafactor.py``).

    ``inner="reference"``: Hugging Face Adafactor as GaLore configures it
    (decay -0.8, clipping 1, eps 1e-30, no relative step, no parameter scaling,
    no first moment); ``inner="optax"``: ``optax.scale_by_factored_rms()`` followed
    by ``optax.clip_by_block_rms(1.0)``. Weight decay before the update, as HF.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = galore_adafactor(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    if inner == "reference":
        make = scale_by_reference_adafactor
    elif inner == "optax":
        def make():
            return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
    else:
        raise ValueError(f"inner={inner!r} is not supported; use 'reference' or 'optax'.")
    lowrank = scale_by_lowrank(make(), rank=rank, projector=projector,
                               update_every=update_proj_gap, scale=scale, proj_type=proj_type,
                               moments=moments, seed=seed, layout=layout, stagger=stagger)
    return _assemble(learning_rate, lowrank, make(), labels=labels, weight_decay=weight_decay,
                     decay_after_update=False)


def apollo_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 256, update_proj_gap: int = 200,
    scale: float = 1.0, scaling: str = "channel", scale_front: bool = False,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
    labels: Any = None, proj_type: str = "std", layout: str = "flax", seed: int = 0,
    projector: Any = "gaussian", gamma: float = 1.01, decay_after_update: bool = True,
) -> optax.GradientTransformation:
    """APOLLO (Zhu et al. 2024; zhuhanqing/APOLLO ``apollo_torch/``): SGD-like memory, AdamW-like steps.

    Selected matrices ``G`` (shape ``(a, b)``): a random projector ``N(0,1)/sqrt(r)``
    (``(d, r)``, side by the ``std`` rule, redrawn with a new key every
    ``update_proj_gap`` steps, moments kept), Adam on ``R = P(G)`` (eps 1e-6,
    ``N = m / (sqrt(v) + eps)``, moments of shape ``(max, r)``), **no
    back-projection**: ``U = G * s`` with ``s = ||N||_k / (||R||_k + 1e-8)`` over the
    rank axis (``scaling="channel"``, one factor per row/column of ``G``) or
    ``||N||_F / (||R||_F + 1e-8)`` (``"tensor"``); ``sqrt(scale)`` on ``U`` before
    (``scale_front``) or after Fira's norm-growth limiter (``gamma``). Then
    ``W -= lr * sqrt(1-b2^t)/(1-b1^t) * U`` (bias correction after the scaling rule,
    as the reference), and ``W -= lr * wd * W``. Other leaves: the same Adam at
    full size. Reference hyper-parameters: lr 0.01, weight decay 0, rank ~ d/4.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = apollo_adamw(1e-2, rank=2)
    >>> state = tx.init(params)
    >>> updates, _ = tx.update(params, state, params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    lowrank = scale_by_lowrank(
        scale_by_reference_adam(b1, b2, eps, bias_correction=False), rank=rank,
        projector=projector, update_every=update_proj_gap, scale=scale, proj_type=proj_type,
        moments="keep", residual="apollo", seed=seed, layout=layout, fira_gamma=gamma,
        apollo_scaling=scaling, apollo_scale_front=scale_front)
    dense = scale_by_reference_adam(b1, b2, eps, bias_correction=False)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update,
                     post=scale_by_adam_bias_correction(b1, b2))


def apollo_mini(learning_rate: ScalarOrSchedule, rank: int = 1, update_proj_gap: int = 200,
                scale: float = 128.0, scaling: str = "tensor", scale_front: bool = True,
                **kwargs: Any) -> optax.GradientTransformation:
    """APOLLO-Mini: :func:`apollo_adamw` at rank 1, tensor-wise scaling, ``scale=128`` in front.

    The state of a projected ``(a, b)`` matrix is a rank-1 projector and two
    ``(max(a, b), 1)`` moments.

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = apollo_mini(1e-2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["attn"]["q"].shape
    (16, 8)
    """
    return apollo_adamw(learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                        scaling=scaling, scale_front=scale_front, **kwargs)


FRUGAL_STATE_FREE = {"signsgd": "signsgd", "sgd": "sgd", "none": None}


def frugal(
    learning_rate: ScalarOrSchedule, rank: int = 128, density: float | None = None,
    update_proj_gap: int = 200, state_free: str = "signsgd", subspace: str = "blocks",
    block_order: str = "descending", projector: Any = "svd",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    labels: Any = None, proj_type: str = "std", layout: str = "flax", seed: int = 0,
    decay_after_update: bool = False, scale: float | None = None,
) -> optax.GradientTransformation:
    """FRUGAL (Zmushko et al. 2024; fzmushko/FRUGAL): Adam in a subspace, signSGD on the rest.

    ``subspace="blocks"`` (default; the reference's pre-training setting): the
    selected matrices are blocks, ``round(density * n)`` of them (``density``
    defaults to 0.25) get Adam at a time, cycled in ``block_order``
    (``"descending"`` through the parameter tree's flatten order, as the
    reference's pre-training scripts; ``"ascending"``, ``"random"``) and changed at
    every refresh; all other selected matrices get the state-free step. See
    :func:`lowrank_jax.block_subspace.scale_by_block_subspace` (its state holds the
    moments of the active blocks only).

    ``subspace="projection"``: every selected matrix ``G`` gets a rank-``r``
    subspace (``projector="svd"`` GaLore's, ``"random"`` Haar-random orthonormal,
    ``"columns"`` random coordinates; ``r`` is ``rank``, or ``density * d`` per leaf
    when ``density`` is given, ``d`` the reduced dimension) refreshed every
    ``update_proj_gap`` steps, state-full Adam on ``R = P(G)``, and
    ``update = Back(N) + sign(G - P P^T G)``.

    In both modes Adam is torch's (``m_hat / (sqrt(v_hat) + eps)``,
    ``optax.scale_by_adam``), its moments **and step count reset** at each refresh;
    the state-free rule is ``sign(.)`` (``state_free="signsgd"``), the raw gradient
    (``"sgd"``) or nothing (``"none"``); everything is times ``-lr``. Other leaves
    (norms, embeddings, head): Adam at full size. Weight decay before the update,
    as the reference. ``scale`` is accepted for config compatibility and ignored
    (FRUGAL has no scale factor).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = frugal(1e-2, rank=2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    del scale
    if state_free not in FRUGAL_STATE_FREE:
        raise ValueError(f"state_free={state_free!r} is not supported; use one of "
                         f"{list(FRUGAL_STATE_FREE)}.")
    if subspace == "blocks":
        if not (isinstance(projector, str) and projector == "svd"):
            raise ValueError(f"projector={projector!r} needs subspace='projection'; the "
                             "default subspace='blocks' chooses whole matrices.")
        lowrank = scale_by_block_subspace(
            b1, b2, eps, density=0.25 if density is None else density,
            update_every=update_proj_gap, state_free=state_free, block_order=block_order,
            seed=seed)
    elif subspace == "projection":
        lowrank = scale_by_lowrank(
            optax.scale_by_adam(b1, b2, eps), rank=rank, projector=projector,
            update_every=update_proj_gap, scale=1.0, proj_type=proj_type, moments="reset",
            residual=FRUGAL_STATE_FREE[state_free], seed=seed, layout=layout, density=density)
    else:
        raise ValueError(f"subspace={subspace!r} is not supported; use 'blocks' or "
                         "'projection'.")
    return _assemble(learning_rate, lowrank, optax.scale_by_adam(b1, b2, eps), labels=labels,
                     weight_decay=weight_decay, decay_after_update=decay_after_update)


def flora(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 1000,
    b1: float = 0.9, weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    layout: str = "flax", seed: int = 0, projector: Any = "gaussian",
    decay_rate: float = -0.8, clip_threshold: float = 1.0, scale: float | None = None,
) -> optax.GradientTransformation:
    """Flora (Hao et al. 2024; BorealisAI/flora-opt): Adafactor with a compressed momentum.

    Every leaf: Hugging Face Adafactor (:func:`scale_by_reference_adafactor`:
    factored second moment, update clipping) giving ``u``. Selected matrices: the
    first moment is kept as ``C`` of shape ``(max, r)`` behind a Gaussian projection
    ``B ~ N(0,1)/sqrt(r)`` of shape ``(d, r)``: ``C <- b1 C + (1-b1) down(u)``, update
    ``up(C)``; every ``update_proj_gap`` (``kappa``) steps a new ``B`` is drawn and
    ``C <- down_new(up_old(C))`` (:func:`scale_by_compressed_momentum`). Other
    leaves: ``m <- b1 m + (1-b1) u`` at full size (HF's ``beta1``). Weight decay
    before the update, as HF Adafactor. ``scale`` is accepted for config
    compatibility and ignored (Flora has no scale factor).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = flora(1e-2, rank=2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    del scale
    lowrank = optax.chain(
        scale_by_reference_adafactor(decay_rate, clip_threshold=clip_threshold),
        scale_by_compressed_momentum(b1, rank=rank, projector=projector,
                                     update_every=update_proj_gap, proj_type=proj_type,
                                     seed=seed, layout=layout))
    dense = optax.chain(scale_by_reference_adafactor(decay_rate, clip_threshold=clip_threshold),
                        optax.ema(b1, debias=False))
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=False)


def galore_adamw8bit(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    decay_after_update: bool = True, block_size: int = 256,
) -> optax.GradientTransformation:
    """GaLore-AdamW8bit: :func:`galore_adamw` whose Adam moments are 8-bit blockwise quantised.

    Both the projected moments ``(max, r)`` and the full-size moments of the other
    leaves use :func:`lowrank_jax.quantized.scale_by_adam_8bit` (``moments="transport"``
    is not supported).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = galore_adamw8bit(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    make = lambda: scale_by_adam_8bit(b1, b2, eps, block_size=block_size)
    lowrank = scale_by_lowrank(
        make(), rank=rank, projector=projector, update_every=update_proj_gap, scale=scale,
        proj_type=proj_type, moments=moments, seed=seed, layout=layout)
    return _assemble(learning_rate, lowrank, make(), labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update)


LOWRANK_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "galore_adamw": galore_adamw,
    "galore_adafactor": galore_adafactor,
    "sara_adamw": sara_adamw,
    "fira_adamw": fira_adamw,
    "golore_adamw": golore_adamw,
    "dct_adamw": dct_adamw,
    "apollo_adamw": apollo_adamw,
    "apollo_mini": apollo_mini,
    "frugal": frugal,
    "flora": flora,
    "galore_adamw8bit": galore_adamw8bit,
    "galore_adam_mini": galore_adam_mini,
}

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": adamw, "adam_mini": adam_mini, **LOWRANK_OPTIMIZERS}
