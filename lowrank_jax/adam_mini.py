"""Adam-mini: Adam with one second-moment value per parameter block.

Adam-mini (Zhang et al. 2024, zyushun/Adam-mini ``adam_mini/adam_mini.py``,
v1.1) keeps Adam's first moment ``m`` per element but replaces the per-element
``v`` by the running mean of ``g^2`` over a *block*::

    m     = b1 m + (1 - b1) g
    vmean = b2 vmean + (1 - b2) mean_block(g^2)
    u     = (m / (1 - b1^t)) / (sqrt(vmean) / sqrt(1 - b2^t) + eps)

(``eps`` after the bias-corrected root, as torch's Adam; reference eps 1e-8).
The reference partitions a Transformer by parameter name:

* query and key weights: one block per attention head (the head's rows of the
  torch ``(out, in)`` weight, i.e. ``head_dim * in`` elements);
* value, attention output, MLP weights: one block per output neuron (row of the
  torch weight; a column of a Flax ``(in, out)`` kernel);
* embedding and output (LM head): one block per token;
* biases: plain Adam (a block per element);
* everything else (norm scales): one block for the whole tensor.

:func:`llama_partition` implements that rule for this package's models (Flax
layout) and torch-layout trees; :func:`scale_by_adam_mini` takes the rule (or
any other) and is an optax transformation, so it can also be the inner
transformation of :func:`lowrank_jax.scale_by_lowrank`. There the leaves are
projected matrices ``(k, r)`` (or ``(r, k)``) whose long axis indexes the
original neurons that were *not* projected and whose short axis holds ``r``
rotated coordinates, each a mix of all neurons of the projected side. A block is
then one index of the long axis with its ``r`` coordinates (``partition=
"projected"``): per-neuron blocks as Adam-mini uses for its value/MLP weights,
since the neurons of the kept side are still separate while the rotated
coordinates no longer belong to any single neuron.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.inner import _one_minus_power
from lowrank_jax.tree_util import path_string

__all__ = ["ADAM_MINI_NAMES", "PARTITIONS", "AdamMiniNames", "AdamMiniState", "MiniBlocks", "block_count", "llama_partition",
           "scale_by_adam_mini"]

PARTITIONS = ("llama", "projected", "tensor", "elementwise")


@dataclasses.dataclass(frozen=True)
class AdamMiniNames:
    """Adam-mini's name rules as data (pip ``adam-mini`` 1.1.1, ``adam_mini.py`` l.115-128, l.141).

    A parameter's name (its path with ``/`` read as ``.``, lower case) is matched
    by substring, in this order: ``adam`` names get plain Adam; ``query_key`` names
    one block per head; ``embed``/``output``/``value``/``attn_proj``/``mlp`` names one
    block per output neuron (per token for embeddings); anything else one block.
    Names containing a ``no_decay`` entry get no weight decay. Extend with
    :meth:`extended`.

    >>> AdamMiniNames().extended(mlp=("ffn",)).mlp
    ('feed_forward', 'linear', 'mlp', 'ffn')
    """

    embed: tuple[str, ...] = ("embed", "embd", "wte")
    output: tuple[str, ...] = ("lm_head", "output", "final_layer")
    query_key: tuple[str, ...] = ("k_proj", "q_proj", "wq", "wk", "query", "key")
    value: tuple[str, ...] = ("v_proj", "wv", "value")
    attn_proj: tuple[str, ...] = ("o_proj", "wo", "attn.proj")
    mlp: tuple[str, ...] = ("feed_forward", "linear", "mlp")
    adam: tuple[str, ...] = ("bias",)
    no_decay: tuple[str, ...] = ("norm", "ln", "bias")

    def extended(self, **more: tuple[str, ...]) -> AdamMiniNames:
        """A copy with the given names appended to the given fields."""
        unknown = set(more) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"AdamMiniNames has no field {min(unknown)!r}; fields: "
                             f"{[f.name for f in dataclasses.fields(self)]}.")
        return dataclasses.replace(
            self, **{k: tuple(getattr(self, k)) + tuple(v) for k, v in more.items()})

    @staticmethod
    def normalise(path: str) -> str:
        """The string the rules are matched against: ``'layers/0/attn/proj'`` -> ``'layers.0.attn.proj'``."""
        return path.lower().replace("/", ".")

    def has(self, field: str, path: str) -> bool:
        """Whether ``path`` contains one of the names of ``field``."""
        name = self.normalise(path)
        return any(t in name for t in getattr(self, field))

    def decays(self, path: str) -> bool:
        """Whether the parameter at ``path`` gets weight decay."""
        return not self.has("no_decay", path)


ADAM_MINI_NAMES = AdamMiniNames()


class MiniBlocks(NamedTuple):
    """How one leaf is cut into blocks: view it as ``view`` and average ``g^2`` over ``axes``.

    ``axes=()`` is plain Adam (one block per element); all axes, one block per leaf.
    """

    view: tuple[int, ...]
    axes: tuple[int, ...]


class AdamMiniState(NamedTuple):
    """State of :func:`scale_by_adam_mini`: ``mu`` full-size, ``nu`` one value per block."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def block_count(blocks: MiniBlocks) -> int:
    """Number of blocks (= second-moment values) of a leaf."""
    return int(np.prod([n for i, n in enumerate(blocks.view) if i not in blocks.axes],
                       dtype=np.int64))


def _tensor(shape) -> MiniBlocks:
    return MiniBlocks(tuple(shape), tuple(range(len(shape))))


def llama_partition(num_heads: int | None = None, layout: str = "flax",
                    names: AdamMiniNames = ADAM_MINI_NAMES
                    ) -> Callable[[str, tuple[int, ...]], MiniBlocks]:
    """Adam-mini's name-based partition for LLaMA-like trees (see the module docstring).

    Args:
      num_heads: attention heads; query/key weights get one block per head of
        ``in / num_heads`` columns (Flax) or rows (torch) per head (grouped-query
        keys get ``out / head_dim`` heads). ``None``: per output neuron instead.
      layout: ``"flax"`` (kernels ``(in, out)``) or ``"torch"`` (``(out, in)``);
        embeddings are ``(vocab, dim)`` in both.
      names: the name rules (:class:`AdamMiniNames`; the reference's by default).

    Returns:
      A function ``(path, shape) -> MiniBlocks``.

    >>> rule = llama_partition(num_heads=4)
    >>> rule("layers/0/attn/q_proj/kernel", (64, 64))
    MiniBlocks(view=(64, 4, 16), axes=(0, 2))
    >>> rule("layers/0/mlp/up_proj/kernel", (64, 176)).axes   # per output neuron
    (0,)
    """
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout={layout!r} is not supported; use 'flax' or 'torch'.")
    out_axis, in_axis = (1, 0) if layout == "flax" else (0, 1)

    def rule(path: str, shape: tuple[int, ...]) -> MiniBlocks:
        if names.has("adam", path):
            return MiniBlocks(tuple(shape), ())
        if len(shape) != 2:
            return _tensor(shape)
        if names.has("query_key", path) and num_heads is not None:
            if shape[in_axis] % num_heads:
                raise ValueError(f"adam_mini: {path!r} has {shape[in_axis]} inputs, not "
                                 f"divisible by num_heads={num_heads}.")
            head_dim = shape[in_axis] // num_heads
            if shape[out_axis] % head_dim:
                raise ValueError(f"adam_mini: {path!r} has {shape[out_axis]} outputs, not a "
                                 f"multiple of head_dim={head_dim}.")
            heads = shape[out_axis] // head_dim
            if layout == "flax":
                return MiniBlocks((shape[0], heads, head_dim), (0, 2))
            return MiniBlocks((heads, head_dim * shape[1]), (1,))
        if names.has("embed", path):
            return MiniBlocks(tuple(shape), (1,))                 # (vocab, dim): per token
        if any(names.has(f, path) for f in ("query_key", "output", "value", "attn_proj", "mlp")):
            return MiniBlocks(tuple(shape), (in_axis,))           # per output neuron / token
        return _tensor(shape)

    return rule


def _projected_rule(path: str, shape: tuple[int, ...]) -> MiniBlocks:
    del path
    if len(shape) != 2:
        return _tensor(shape)
    short = 0 if shape[0] < shape[1] else 1        # the rank axis (ties: the last)
    return MiniBlocks(tuple(shape), (short,))


def _resolve(partition: Any) -> Callable[[str, tuple[int, ...]], MiniBlocks]:
    if callable(partition):
        return partition
    if partition == "llama":
        return llama_partition()
    if partition == "projected":
        return _projected_rule
    if partition == "tensor":
        return lambda path, shape: _tensor(shape)
    if partition == "elementwise":
        return lambda path, shape: MiniBlocks(tuple(shape), ())
    raise ValueError(f"partition={partition!r} is not supported; use one of {list(PARTITIONS)} "
                     "or a function (path, shape) -> MiniBlocks.")


def scale_by_adam_mini(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                       partition: Any = "llama", mu_dtype: Any = None
                       ) -> optax.GradientTransformation:
    """Adam-mini's direction: per-element first moment, one second moment per block.

    Args:
      b1, b2, eps: Adam's constants (``eps`` added to the bias-corrected root).
      partition: ``"llama"`` (:func:`llama_partition` without heads; pass
        ``llama_partition(num_heads=...)`` for per-head query/key blocks),
        ``"projected"`` (for projected ``(k, r)`` matrices: one block per index of
        the long axis), ``"tensor"``, ``"elementwise"`` (= Adam), or a function
        ``(path: str, shape) -> MiniBlocks``.
      mu_dtype: dtype of the stored first moment (``None``: the updates' dtype).

    Returns:
      An optax ``GradientTransformation``; ``nu`` leaves have the reduced shape
      (``view`` with the block axes of length 1), float32.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam_mini(partition="projected")
    >>> state = tx.init({"w": jnp.zeros((64, 8))})
    >>> state.nu["w"].shape                       # one value per row of the (k, r) matrix
    (64, 1)
    >>> u, _ = tx.update({"w": jnp.ones((64, 8))}, state)
    >>> round(float(u["w"][0, 0]), 4)
    1.0
    """
    rule = _resolve(partition)

    def blocks_of(path, leaf) -> MiniBlocks:
        shape = tuple(leaf.shape)
        blocks = rule(path_string(path), shape)
        if int(np.prod(blocks.view, dtype=np.int64)) != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"adam_mini: partition view {blocks.view} does not match leaf "
                             f"{path_string(path)!r} of shape {shape}.")
        return blocks

    def reduced_shape(blocks: MiniBlocks) -> tuple[int, ...]:
        return tuple(1 if i in blocks.axes else n for i, n in enumerate(blocks.view))

    def init_fn(params):
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params)
        nu = jax.tree_util.tree_map_with_path(
            lambda path, p: jnp.zeros(reduced_shape(blocks_of(path, p)), jnp.float32), params)
        return AdamMiniState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        bc1, bc2 = _one_minus_power(b1, t), _one_minus_power(b2, t)

        def leaf(path, g, m, v):
            blocks = blocks_of(path, g)
            g32 = g.astype(jnp.float32)
            m = b1 * m.astype(jnp.float32) + (1 - b1) * g32
            g2 = (g32 * g32).reshape(blocks.view)
            v = b2 * v + (1 - b2) * (jnp.mean(g2, axis=blocks.axes, keepdims=True)
                                     if blocks.axes else g2)
            denom = jnp.sqrt(v) / jnp.sqrt(bc2) + eps
            u = ((m / bc1).reshape(blocks.view) / denom).reshape(g.shape)
            return u.astype(g.dtype), m.astype(g.dtype if mu_dtype is None else mu_dtype), v

        triples = jax.tree_util.tree_map_with_path(leaf, updates, state.mu, state.nu)
        treedef = jax.tree.structure(updates)
        flat = treedef.flatten_up_to(triples)
        out = treedef.unflatten([x[0] for x in flat])
        mu = treedef.unflatten([x[1] for x in flat])
        nu = treedef.unflatten([x[2] for x in flat])
        return out, AdamMiniState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)
