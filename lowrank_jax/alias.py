"""Optimizers over a whole parameter tree, one per paper, optax style.

Each alias routes the selected leaves (default: GaLore's rule, 2-D leaves whose
path contains ``attn``/``attention``/``mlp``) through
:func:`lowrank_jax.scale_by_lowrank` (a projector + an inner optax
transformation + a residual rule) and every other leaf through the same inner
optimizer at full size, then scales by the learning rate and applies decoupled
weight decay. Defaults are the reference code's hyper-parameters and formulas,
so ``galore_adamw(lr, rank=r)`` *is* GaLore.

Every alias has an explicit signature (no ``**kwargs``), so it works inside
``optax.inject_hyperparams`` (pass the integer arguments in ``static_args``) and
:func:`validate_alias_kwargs` can check a config against it.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.adam_mini import (
    ADAM_MINI_NAMES,
    AdamMiniNames,
    llama_partition,
    scale_by_adam_mini,
)
from lowrank_jax.block_subspace import scale_by_block_subspace
from lowrank_jax.coap import coap_adamw
from lowrank_jax.compressed_momentum import scale_by_compressed_momentum
from lowrank_jax.grass import grass_adamw
from lowrank_jax.gum import gum_muon
from lowrank_jax.inner import (
    scale_by_adam_bias_correction,
    scale_by_reference_adafactor,
    scale_by_reference_adam,
    scale_by_torch_adam,
)
from lowrank_jax.projectors import PROJECTORS, SwitchProjector
from lowrank_jax.qgalore import qgalore_adamw8bit
from lowrank_jax.quantized import scale_by_adam_8bit
from lowrank_jax.residuals import ApolloScaling, BackProjection, FiraResidual, StateFreeResidual
from lowrank_jax.selection import DENSE, LOWRANK, matrix_labels, resolve_labels
from lowrank_jax.transform import scale_by_lowrank
from lowrank_jax.weight_decay import add_decayed_weights_after_update

ScalarOrSchedule = float | Callable[[Any], Any]

__all__ = [
    "DCT_REFERENCE_RIGHT_SHAPES",
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
    "frugal_projection",
    "galore_adafactor",
    "galore_adam_mini",
    "galore_adamw",
    "galore_adamw8bit",
    "golore_adamw",
    "sara_adamw",
    "validate_alias_kwargs",
]

# ---------------------------------------------------------------------------- checks


def _is_python_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(name: str, value: Any, low: float | None = None, high: float | None = None,
           *, high_open: bool = False, low_open: bool = False) -> None:
    """Reject a bad Python number by name (arrays and schedules pass: they are traced)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not _is_python_number(value):
        return
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}.")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}.")


def _check_adam(learning_rate, b1, b2, eps, weight_decay) -> None:
    _check("learning_rate", learning_rate, 0.0)
    _check("b1", b1, 0.0, 1.0, high_open=True)
    _check("b2", b2, 0.0, 1.0, high_open=True)
    _check("eps", eps, 0.0)
    _check("weight_decay", weight_decay, 0.0)


def _dtype(name: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        return jnp.dtype(value)
    except TypeError as err:
        raise ValueError(f"{name}={value!r} is not a dtype; use e.g. 'float32' or "
                         "'bfloat16'.") from err


def _is_zero(x) -> bool:
    return _is_python_number(x) and x == 0


def checking_gradient_tree(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` whose update first checks that the gradients have the parameters' tree and shapes.

    The check runs at trace time only and turns a mismatch into one line naming the
    leaf (instead of an error deep inside ``tx``); the state is ``tx``'s own.
    """
    from lowrank_jax.tree_util import path_string

    def update_fn(updates, state, params=None, **extra):
        if params is None:
            return tx.update(updates, state, params, **extra)
        g = {path_string(k): x for k, x in jax.tree_util.tree_flatten_with_path(updates)[0]}
        p = {path_string(k): x for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        for name in sorted(set(g) ^ set(p)):
            where = "the gradients" if name in p else "the parameters"
            raise ValueError(f"leaf {name!r} is missing from {where}: the gradients must have "
                             "the parameters' tree.")
        for name, x in g.items():
            if tuple(x.shape) != tuple(p[name].shape):
                raise ValueError(f"gradient of leaf {name!r} has shape {tuple(x.shape)}, the "
                                 f"parameter {tuple(p[name].shape)}.")
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _assemble(learning_rate, lowrank_tx, dense_tx, *, labels, weight_decay,
              decay_after_update: bool, post: optax.GradientTransformation | None = None,
              decay_mask: Any = None, pre_lr: optax.GradientTransformation | None = None):
    """partition(lowrank | dense) -> [post] -> [decay] -> [pre_lr] -> learning rate -> [decay]."""
    parts = [checking_gradient_tree(
        optax.partition({LOWRANK: lowrank_tx, DENSE: dense_tx}, resolve_labels(labels)))]
    if post is not None:
        parts.append(post)
    if not decay_after_update and not _is_zero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    if pre_lr is not None:
        parts.append(pre_lr)
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if decay_after_update and not _is_zero(weight_decay):
        parts.append(add_decayed_weights_after_update(learning_rate, weight_decay,
                                                      mask=decay_mask))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------- full rank


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, mu_dtype: Any = None
          ) -> optax.GradientTransformation:
    """Full-rank AdamW as the papers' baselines use it (``torch.optim.AdamW`` defaults).

    torch's formula (:func:`lowrank_jax.inner.scale_by_torch_adam`; ``optax.adamw``'s
    up to float32 rounding of the bias corrections), eps 1e-8, decay ``W -= lr * wd * W``
    before the update, weight decay 0 unless given (optax's own default is 1e-4).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = adamw(1e-3)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    parts = [scale_by_torch_adam(b1, b2, eps, mu_dtype=_dtype("mu_dtype", mu_dtype))]
    if not _is_zero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def adam_mini(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, num_heads: int | None = None,
              layout: str = "flax", partition: Any = None,
              names: AdamMiniNames = ADAM_MINI_NAMES, mu_dtype: Any = None
              ) -> optax.GradientTransformation:
    """Adam-mini (Zhang et al. 2024; pip ``adam-mini`` 1.1.1): AdamW with one ``v`` per block.

    Blocks by :func:`lowrank_jax.adam_mini.llama_partition` with the name rules
    ``names`` (:class:`~lowrank_jax.adam_mini.AdamMiniNames`: per head for query/key
    when ``num_heads`` is given, else per output neuron; per output neuron for
    value/output/MLP/"linear" names; per token for embedding and LM head; plain Adam
    for biases; one block otherwise) unless ``partition`` is given. Decoupled weight
    decay ``W -= lr * wd * W`` before the update, skipped for names containing
    ``names.no_decay`` ("norm", "ln", "bias"), as the reference.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = adam_mini(1e-3)
    >>> tx.init(params)[0].nu["mlp"]["up"].shape     # one value per output neuron
    (1, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    if not isinstance(names, AdamMiniNames):
        raise TypeError(f"names must be an AdamMiniNames, got {type(names).__name__}.")
    rule = llama_partition(num_heads, layout, names) if partition is None else partition
    mu = _dtype("mu_dtype", mu_dtype)
    parts = [scale_by_adam_mini(b1, b2, eps, partition=rule, mu_dtype=mu)]
    if not _is_zero(weight_decay):
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask(names)))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def _decay_mask(names: AdamMiniNames) -> Callable[[Any], Any]:
    """True for the leaves that get weight decay under Adam-mini's name rule."""
    from lowrank_jax.tree_util import path_string

    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: names.decays(path_string(path)), params)


# ---------------------------------------------------------------------------- GaLore family


def _galore_family(learning_rate, *, rank, update_proj_gap, scale, b1, b2, eps, weight_decay,
                   labels, proj_type, moments, layout, seed, projector, decay_after_update,
                   stagger, projector_dtype, dimension_numbers, small, dense):
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    lowrank = scale_by_lowrank(
        small, rank=rank, projector=projector, update_every=update_proj_gap,
        residual=BackProjection(scale), proj_type=proj_type, moments=moments, seed=seed,
        layout=layout, stagger=stagger, projector_dtype=_dtype("projector_dtype", projector_dtype),
        dimension_numbers=dimension_numbers)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update)


def galore_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    decay_after_update: bool = True, stagger: bool = False, mu_dtype: Any = None,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
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
      proj_type, moments, layout, seed, projector, stagger, projector_dtype,
        dimension_numbers: see :func:`lowrank_jax.scale_by_lowrank`.
      mu_dtype: dtype of the stored first moments (e.g. ``"bfloat16"``).

    >>> import jax, jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = galore_adamw(1e-2, rank=4)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> jax.tree.map(jnp.shape, updates)["attn"]["q"]
    (16, 8)
    """
    mu = _dtype("mu_dtype", mu_dtype)
    return _galore_family(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
        eps=eps, weight_decay=weight_decay, labels=labels, proj_type=proj_type, moments=moments,
        layout=layout, seed=seed, projector=projector, decay_after_update=decay_after_update,
        stagger=stagger, projector_dtype=projector_dtype,
        dimension_numbers=dimension_numbers,
        small=scale_by_reference_adam(b1, b2, eps, mu_dtype=mu),
        dense=scale_by_reference_adam(b1, b2, eps, mu_dtype=mu))


def galore_adam_mini(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    decay_after_update: bool = True, stagger: bool = False, num_heads: int | None = None,
    names: AdamMiniNames = ADAM_MINI_NAMES, mu_dtype: Any = None,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """GaLore with Adam-mini as the inner optimizer.

    The projected ``(k, r)`` matrices get Adam-mini with one second-moment value
    per index of the long axis (``partition="projected"``: the kept neurons are still
    separate, the ``r`` rotated coordinates are not); the other leaves get
    Adam-mini's name-based blocks (``num_heads``, ``names`` as
    :func:`lowrank_jax.adam_mini.llama_partition`). Everything else is
    :func:`galore_adamw` (eps 1e-8, Adam-mini's default).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = galore_adam_mini(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    mu = _dtype("mu_dtype", mu_dtype)
    return _galore_family(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
        eps=eps, weight_decay=weight_decay, labels=labels, proj_type=proj_type, moments=moments,
        layout=layout, seed=seed, projector=projector, decay_after_update=decay_after_update,
        stagger=stagger, projector_dtype=projector_dtype,
        dimension_numbers=dimension_numbers,
        small=scale_by_adam_mini(b1, b2, eps, partition="projected", mu_dtype=mu),
        dense=scale_by_adam_mini(b1, b2, eps, partition=llama_partition(num_heads, layout, names),
                                 mu_dtype=mu))


def sara_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0,
    decay_after_update: bool = True, stagger: bool = False, mu_dtype: Any = None,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """SARA-AdamW (arXiv 2502.05790): GaLore with importance-sampled singular vectors.

    ``rank`` singular vectors drawn without replacement with probability
    proportional to the singular values, sorted, at every refresh; the rest is
    :func:`galore_adamw` (same arguments).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = sara_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    return galore_adamw(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
        eps=eps, weight_decay=weight_decay, labels=labels, proj_type=proj_type, moments=moments,
        layout=layout, seed=seed, projector="sara", decay_after_update=decay_after_update,
        stagger=stagger, mu_dtype=mu_dtype, projector_dtype=projector_dtype,
        dimension_numbers=dimension_numbers)


def golore_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, random_after: int = 0, moments: str = "transport",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
    labels: Any = None, proj_type: str = "std", layout: str = "flax", seed: int = 0,
    decay_after_update: bool = True, stagger: bool = False, mu_dtype: Any = None,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """GoLore (pkumelon/Golore): GaLore whose late projections are random.

    Refreshes at 0-based steps ``>= random_after`` use a Haar-random matrix with
    orthonormal columns instead of the SVD (the paper switches after 80% of
    training: pass ``random_after=int(0.8 * total_steps)``). The reference
    (``golore_torch/adamw.py``) moves the first moment into the new basis at each
    refresh but assigns the moved moment to a temporary: the refresh step uses it,
    the stored moment stays as it was before that step (old coordinates, without
    that step's gradient). ``moments="transport_unstored"`` reproduces the reference;
    the default ``"transport"`` stores the moved moment (the method as described).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = golore_adamw(1e-2, rank=4, random_after=1000)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    from lowrank_jax.transform import check_static_int

    switch = SwitchProjector(PROJECTORS["svd"], PROJECTORS["random"],
                             check_static_int("random_after", random_after, minimum=0))
    return galore_adamw(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
        eps=eps, weight_decay=weight_decay, labels=labels, proj_type=proj_type, moments=moments,
        layout=layout, seed=seed, projector=switch, decay_after_update=decay_after_update,
        stagger=stagger, mu_dtype=mu_dtype, projector_dtype=projector_dtype,
        dimension_numbers=dimension_numbers)


def galore_adamw8bit(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    decay_after_update: bool = True, block_size: int = 256, stagger: bool = False,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
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
    return _galore_family(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, b1=b1, b2=b2,
        eps=eps, weight_decay=weight_decay, labels=labels, proj_type=proj_type, moments=moments,
        layout=layout, seed=seed, projector=projector, decay_after_update=decay_after_update,
        stagger=stagger, projector_dtype=projector_dtype,
        dimension_numbers=dimension_numbers, small=make(), dense=make())


def galore_adafactor(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, weight_decay: float = 0.0, labels: Any = None,
    proj_type: str = "std", moments: str = "keep", layout: str = "flax", seed: int = 0,
    projector: Any = "svd", inner: str = "reference", stagger: bool = False,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
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
    _check("learning_rate", learning_rate, 0.0)
    _check("weight_decay", weight_decay, 0.0)
    if inner == "reference":
        make = scale_by_reference_adafactor
    elif inner == "optax":
        def make():
            return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0))
    else:
        raise ValueError(f"inner={inner!r} is not supported; use 'reference' or 'optax'.")
    lowrank = scale_by_lowrank(
        make(), rank=rank, projector=projector, update_every=update_proj_gap,
        residual=BackProjection(scale), proj_type=proj_type, moments=moments, seed=seed,
        layout=layout, stagger=stagger, projector_dtype=_dtype("projector_dtype", projector_dtype),
        dimension_numbers=dimension_numbers)
    return _assemble(learning_rate, lowrank, make(), labels=labels, weight_decay=weight_decay,
                     decay_after_update=False)


def fira_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 200,
    scale: float = 0.25, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", seed: int = 0, projector: Any = "svd",
    gamma: float = 1.01, decay_after_update: bool = True, stagger: bool = False,
    mu_dtype: Any = None, projector_dtype: Any = "float32", dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """Fira-AdamW (Chen et al. 2024; xichen-fy/Fira ``optimizer_torch/fira_adamw.py``).

    GaLore-AdamW plus the residual ``(G - scale P P^T G) * phi`` with
    ``phi = ||N|| / ||R||`` along the projected axis and the norm-growth limiter
    (``gamma``): :class:`lowrank_jax.residuals.FiraResidual`. ``scale`` is the paper's
    alpha (0.25 up to 350M, 0.0625 for 1B/7B). Adam's bias correction is applied
    after the residual rule, as the reference does.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = fira_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    mu = _dtype("mu_dtype", mu_dtype)
    lowrank = scale_by_lowrank(
        scale_by_reference_adam(b1, b2, eps, bias_correction=False, mu_dtype=mu), rank=rank,
        projector=projector, update_every=update_proj_gap, proj_type=proj_type,
        moments=moments, residual=FiraResidual(scale, gamma), seed=seed, layout=layout,
        stagger=stagger, projector_dtype=_dtype("projector_dtype", projector_dtype),
        dimension_numbers=dimension_numbers)
    dense = scale_by_reference_adam(b1, b2, eps, bias_correction=False, mu_dtype=mu)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update,
                     post=scale_by_adam_bias_correction(b1, b2))


#: The weight shapes ``(out, in)`` the DCT reference projects on the right although
#: ``out < in`` (``dct_adamw.py`` ``init_state`` and ``fft_projector.py`` ``_setup``).
DCT_REFERENCE_RIGHT_SHAPES = ((512, 3584), (512, 4096), (1024, 3584), (1024, 4096))


def dct_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 1,
    scale: float = 1.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    moments: str = "keep", layout: str = "flax", refresh_rule: str = "first_and_multiples",
    right_projection_shapes: tuple = (), one_dct_matrix: bool = False, mu_dtype: Any = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """SVD-free low-rank AdamW with a DCT basis (IST-DASLab ``fft_low_rank/dct_adamw.py``).

    The subspace is the ``rank`` DCT-II basis vectors best aligned (l1) with the
    gradient, recomputed at step 1 and every ``update_proj_gap`` steps (reference
    default: every step); only their int32 indices are stored. Adam is
    torch's (:func:`lowrank_jax.inner.scale_by_torch_adam`, eps on the bias-corrected
    root, as the reference),
    ``scale`` on the back-projection (the reference has none: 1), weight decay before
    the update.

    Reference quirks, as options (defaults give the same result on LLaMA shapes):

    * ``right_projection_shapes``: torch ``(out, in)`` shapes reduced on the ``in``
      side even though ``out < in``; the reference hard-codes
      :data:`DCT_REFERENCE_RIGHT_SHAPES` (its DCT matrix has the hidden size, so those
      GQA key/value weights can only be projected on that side).
    * ``one_dct_matrix=True``: the reference builds one DCT matrix, of the first
      projected weight's size, and uses it for every weight; then every leaf's reduced
      dimension must equal the first's (an error names the leaf that does not).
      Default: a DCT matrix of each leaf's own size (the same matrix when sizes agree).

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = dct_adamw(1e-2, rank=4)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    shapes = {tuple(int(x) for x in s) for s in right_projection_shapes}
    sides = proj_type
    if shapes:
        def sides(torch_shape):
            return "right" if tuple(torch_shape) in shapes else proj_type
    mu = _dtype("mu_dtype", mu_dtype)
    lowrank = scale_by_lowrank(
        scale_by_torch_adam(b1, b2, eps, mu_dtype=mu), rank=rank, projector="dct",
        update_every=update_proj_gap, residual=BackProjection(scale), proj_type=sides,
        moments=moments, layout=layout, refresh_rule=refresh_rule,
        dimension_numbers=dimension_numbers)
    if one_dct_matrix:
        lowrank = _one_size(lowrank)
    return _assemble(learning_rate, lowrank, scale_by_torch_adam(b1, b2, eps, mu_dtype=mu),
                     labels=labels, weight_decay=weight_decay, decay_after_update=False)


def _one_size(tx: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose init rejects leaves whose reduced size differs from the first leaf's."""

    def init_fn(params):
        state = tx.init(params)
        info = state.layout
        sizes = [d for dims in info.dims for d in dims]
        for name, dims in zip(info.names, info.dims):
            if any(d != sizes[0] for d in dims):
                raise ValueError(
                    f"one_dct_matrix=True: leaf {name!r} is reduced along {dims}, but the DCT "
                    f"matrix is built from the first weight ({info.names[0]!r}, size "
                    f"{sizes[0]}); use one_dct_matrix=False (a matrix per size).")
        return state

    return optax.GradientTransformationExtraArgs(init_fn, tx.update)


# ---------------------------------------------------------------------------- APOLLO


def apollo_adamw(
    learning_rate: ScalarOrSchedule, rank: int = 256, update_proj_gap: int = 200,
    scale: float = 1.0, scaling: str = "channel", scale_front: bool = False,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
    labels: Any = None, proj_type: str = "std", layout: str = "flax", seed: int = 0,
    projector: Any = "gaussian", gamma: float = 1.01, limiter: bool = True,
    decay_after_update: bool = True, mu_dtype: Any = None, projector_dtype: Any = "float32",
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """APOLLO (Zhu et al. 2024; zhuhanqing/APOLLO ``apollo_torch/apollo.py``).

    Selected matrices ``G``: a random projector ``N(0,1)/sqrt(r)`` (``(d, r)``, side
    by the ``std`` rule, redrawn every ``update_proj_gap`` steps, moments kept), Adam
    on ``R = P(G)`` (eps 1e-6, ``N = m / (sqrt(v) + eps)``), **no back-projection**:
    ``U = G * s`` with ``s = ||N||_k / (||R||_k + 1e-8)`` over the rank axis
    (``scaling="channel"``) or ``||N||_F / (||R||_F + 1e-8)`` (``"tensor"``);
    ``sqrt(scale)`` on ``U`` before (``scale_front``) or after Fira's norm-growth
    limiter (``gamma``; ``limiter=False`` is the reference's ``disable_nl``):
    :class:`lowrank_jax.residuals.ApolloScaling`. Then
    ``W -= lr * sqrt(1-b2^t)/(1-b1^t) * U`` and ``W -= lr * wd * W``. Other leaves:
    the same Adam at full size. Reference hyper-parameters: lr 0.01, wd 0, rank ~ d/4.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = apollo_adamw(1e-2, rank=2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    mu = _dtype("mu_dtype", mu_dtype)
    lowrank = scale_by_lowrank(
        scale_by_reference_adam(b1, b2, eps, bias_correction=False, mu_dtype=mu), rank=rank,
        projector=projector, update_every=update_proj_gap, proj_type=proj_type, moments="keep",
        residual=ApolloScaling(scale, scaling, scale_front, gamma, limiter), seed=seed,
        layout=layout, projector_dtype=_dtype("projector_dtype", projector_dtype),
        dimension_numbers=dimension_numbers)
    dense = scale_by_reference_adam(b1, b2, eps, bias_correction=False, mu_dtype=mu)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update,
                     post=scale_by_adam_bias_correction(b1, b2))


def apollo_mini(
    learning_rate: ScalarOrSchedule, rank: int = 1, update_proj_gap: int = 200,
    scale: float = 128.0, scaling: str = "tensor", scale_front: bool = True,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
    labels: Any = None, proj_type: str = "std", layout: str = "flax", seed: int = 0,
    projector: Any = "gaussian", gamma: float = 1.01, limiter: bool = True,
    decay_after_update: bool = True, mu_dtype: Any = None, projector_dtype: Any = "float32",
    dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """APOLLO-Mini: :func:`apollo_adamw` at rank 1, tensor-wise scaling, ``scale=128`` in front.

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = apollo_mini(1e-2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["attn"]["q"].shape
    (16, 8)
    """
    return apollo_adamw(
        learning_rate, rank=rank, update_proj_gap=update_proj_gap, scale=scale, scaling=scaling,
        scale_front=scale_front, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        labels=labels, proj_type=proj_type, layout=layout, seed=seed, projector=projector,
        gamma=gamma, limiter=limiter, decay_after_update=decay_after_update, mu_dtype=mu_dtype,
        projector_dtype=projector_dtype, dimension_numbers=dimension_numbers)


# ---------------------------------------------------------------------------- FRUGAL

FRUGAL_STATE_FREE = ("signsgd", "sgd", "none")


def frugal(
    learning_rate: ScalarOrSchedule, density: float = 0.25, update_proj_gap: int = 200,
    state_free: str = "signsgd", block_order: str = "descending",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    labels: Any = None, seed: int = 0, decay_after_update: bool = False,
) -> optax.GradientTransformation:
    """FRUGAL, blockwise (Zmushko et al. 2024; fzmushko/FRUGAL ``BlockOptimizer``).

    The reference's pre-training setting: the selected matrices are blocks,
    ``round(density * n)`` of them get Adam at a time, cycled in ``block_order``
    (``"descending"`` through the parameter tree's flatten order, as the reference's
    scripts; ``"ascending"``, ``"random"``) and changed at every refresh, with Adam's
    moments and step count reset; the other selected matrices get the state-free
    step ``sign(G)`` (``"signsgd"``), ``G`` (``"sgd"``) or nothing (``"none"``); see
    :func:`lowrank_jax.block_subspace.scale_by_block_subspace`. Other leaves: Adam at
    full size. Adam is torch's (``m_hat / (sqrt(v_hat) + eps)``); weight decay before
    the update, as the reference. The projection variant is :func:`frugal_projection`.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = frugal(1e-2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    from lowrank_jax.transform import check_choice, check_density

    check_choice("state_free", state_free, FRUGAL_STATE_FREE)
    lowrank = scale_by_block_subspace(
        b1, b2, eps, density=check_density(density), update_every=update_proj_gap,
        state_free=state_free, block_order=block_order, seed=seed)
    return _assemble(learning_rate, lowrank, scale_by_torch_adam(b1, b2, eps), labels=labels,
                     weight_decay=weight_decay, decay_after_update=decay_after_update)


def frugal_projection(
    learning_rate: ScalarOrSchedule, rank: int | None = None, density: float | None = None,
    update_proj_gap: int = 200, state_free: str = "signsgd", projector: Any = "svd",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    labels: Any = None, proj_type: str | None = None, layout: str = "flax", seed: int = 0,
    decay_after_update: bool = False, state_free_scale: float = 1.0, mu_dtype: Any = None,
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """FRUGAL with a projected subspace (fzmushko/FRUGAL ``GaloreOptimizer``, ``CoordOptimizer``).

    Every selected matrix ``G`` gets a subspace refreshed every ``update_proj_gap``
    steps: ``projector="svd"`` (GaLore's), ``"random"`` (Haar-random orthonormal) or
    ``"columns"`` (random coordinates). Its rank is ``rank``, or ``density * d`` per
    leaf (``d`` the reduced dimension; ``round`` as the reference's
    ``galore_projector.py``, ``int`` for ``"columns"`` as its
    ``coordinate_projector.py``; no cap); neither given: ``density=0.25``, the
    reference's default. ``"columns"`` always keeps columns of the torch ``(out, in)``
    weight (``proj_type="right"``; ``"left"`` is the reference's ``"rows"``); the
    others reduce by ``proj_type`` (default ``"std"``). Torch-style Adam on ``R = P(G)``
    with moments **and step count reset** at every refresh, and
    ``update = Back(N) + state_free_scale * sign(G - Back(R))``
    (:class:`lowrank_jax.residuals.StateFreeResidual`; ``"sgd"``: ``G - Back(R)``,
    ``"none"``: nothing). Weight decay before the update.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = frugal_projection(1e-2, rank=2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check_adam(learning_rate, b1, b2, eps, weight_decay)
    from lowrank_jax.transform import check_choice

    check_choice("state_free", state_free, FRUGAL_STATE_FREE)
    if rank is None and density is None:
        density = 0.25
    columns = isinstance(projector, str) and projector == "columns"
    if proj_type is None:
        proj_type = "right" if columns else "std"
    rule = (BackProjection(1.0) if state_free == "none"
            else StateFreeResidual(state_free, 1.0, state_free_scale))
    mu = _dtype("mu_dtype", mu_dtype)
    lowrank = scale_by_lowrank(
        scale_by_torch_adam(b1, b2, eps, mu_dtype=mu), rank=rank, density=density,
        density_rounding="floor" if columns else "round", projector=projector,
        update_every=update_proj_gap, proj_type=proj_type, moments="reset", residual=rule,
        seed=seed, layout=layout, projector_dtype=_dtype("projector_dtype", projector_dtype),
        dimension_numbers=dimension_numbers)
    return _assemble(learning_rate, lowrank, scale_by_torch_adam(b1, b2, eps, mu_dtype=mu),
                     labels=labels, weight_decay=weight_decay,
                     decay_after_update=decay_after_update)


# ---------------------------------------------------------------------------- Flora


def flora(
    learning_rate: ScalarOrSchedule, rank: int = 128, update_proj_gap: int = 1000,
    b1: float = 0.9, decay_rate: float = -0.8, clip_threshold: float = 1.0,
    scale_parameter: bool = True, min_scale: float = 1e-3, eps: float = 1e-30,
    weight_decay: float = 0.0, labels: Any = None, proj_type: str = "std",
    layout: str = "flax", seed: int = 0, projector: Any = "gaussian",
    projector_dtype: Any = "float32", dimension_numbers: Any = None,
) -> optax.GradientTransformation:
    """Flora (Hao et al. 2024; BorealisAI/flora-opt ``flora_opt/optimizers/torch/flora.py``).

    Every leaf: Hugging Face Adafactor's normalised update ``u`` (factored second
    moment for matrices, decay ``decay_rate``, ``eps``). Selected matrices (default:
    the reference's rule, 2-D with ``min(shape) >= rank`` and ``max/min <= 4``) keep
    their first moment compressed (:func:`scale_by_compressed_momentum`, ``kappa =
    update_proj_gap``): the output is ``(1 - b1) u + b1 up(C_{t-1})``, then ``C`` is
    updated (resampled first at steps ``kappa, 2 kappa, ...``). Other leaves keep a
    full momentum ``m = (1 - b1) u + b1 m``, output ``m``. Then, as the reference:
    the update is divided by ``max(rms / clip_threshold, 1)``, weight decay is added
    (``u + wd * W``), and with ``scale_parameter`` the step is multiplied by
    ``max(min_scale, rms(W))``; ``W -= lr * step``.

    >>> import jax.numpy as jnp
    >>> params = {"mlp": {"up": jnp.ones((16, 8))}, "norm": jnp.ones(8)}
    >>> tx = flora(1e-2, rank=2)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["mlp"]["up"].shape
    (16, 8)
    """
    _check("learning_rate", learning_rate, 0.0)
    _check("b1", b1, 0.0, 1.0, high_open=True)
    _check("clip_threshold", clip_threshold, 0.0, low_open=True)
    _check("min_scale", min_scale, 0.0)
    _check("eps", eps, 0.0)
    _check("weight_decay", weight_decay, 0.0)
    from lowrank_jax.transform import check_static_int

    if labels is None:
        labels = matrix_labels(min_dim=check_static_int("rank", rank), max_aspect=4)
    clip = optax.clip_by_block_rms(clip_threshold)
    lowrank = optax.chain(
        scale_by_reference_adafactor(decay_rate, eps=eps, clip_threshold=None),
        scale_by_compressed_momentum(b1, rank=rank, projector=projector,
                                     update_every=update_proj_gap, proj_type=proj_type,
                                     seed=seed, layout=layout,
                                     projector_dtype=_dtype("projector_dtype", projector_dtype),
                                     dimension_numbers=dimension_numbers),
        clip)
    dense = optax.chain(scale_by_reference_adafactor(decay_rate, eps=eps, clip_threshold=None),
                        optax.ema(b1, debias=False), clip)
    return _assemble(learning_rate, lowrank, dense, labels=labels, weight_decay=weight_decay,
                     decay_after_update=False,
                     pre_lr=(optax.scale_by_param_block_rms(min_scale) if scale_parameter
                             else None))


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
    "frugal_projection": frugal_projection,
    "flora": flora,
    "galore_adamw8bit": galore_adamw8bit,
    "galore_adam_mini": galore_adam_mini,
    "coap_adamw": coap_adamw,
    "qgalore_adamw8bit": qgalore_adamw8bit,
    "grass_adamw": grass_adamw,
    "gum_muon": gum_muon,
}

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": adamw, "adam_mini": adam_mini, **LOWRANK_OPTIMIZERS}


def alias_arguments(name: str) -> tuple[str, ...]:
    """The keyword arguments of alias ``name`` (its real signature, ``learning_rate`` first)."""
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(str(name), OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown optimizer {name!r}{hint}; valid: {', '.join(OPTIMIZERS)}.")
    return tuple(inspect.signature(OPTIMIZERS[name]).parameters)


def validate_alias_kwargs(name: str, kwargs: dict) -> None:
    """Raise a one-line ``ValueError`` naming the first key of ``kwargs`` that alias ``name``
    does not take (checked against its real signature), with the closest valid name.

    >>> validate_alias_kwargs("galore_adamw", {"rank": 8, "moments": "reset"})
    >>> validate_alias_kwargs("galore_adamw", {"momets": "reset"})
    Traceback (most recent call last):
    ...
    ValueError: optimizer 'galore_adamw' has no argument 'momets'; did you mean 'moments'?
    """
    valid = alias_arguments(name)
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = (f"did you mean {close[0]!r}?" if close
                    else f"its arguments: {', '.join(valid[1:])}.")
            raise ValueError(f"optimizer {name!r} has no argument {key!r}; {hint}")


def accepted_kwargs(name: str, candidates: dict) -> dict:
    """The entries of ``candidates`` that alias ``name`` takes (for callers that offer a
    common set, such as ``rank``, to every alias)."""
    valid = set(alias_arguments(name))
    return {k: v for k, v in candidates.items() if k in valid}
