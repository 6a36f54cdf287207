"""Q-GaLore: INT4 projectors, lazy per-layer subspace refreshes, INT8 weights.

GaLore's SVD projector (top-``r`` singular vectors of the gradient, ``std`` side) with
three changes from Zhang et al. 2024 (VITA-Group/Q-GaLore, pip ``q-galore-torch``):

1. **Quantised projector.** After each SVD the projector, as the reference stores it
   (``P`` ``(r, n)`` for a right projector, ``A`` ``(m, r)`` for a left one), is
   flattened row-major into groups of ``group_size`` entries (whole rows when
   ``group_size <= 0``); each group gets ``scale = max(max - min, 1e-5) / (2^b - 1)``
   and ``zero = clip(-round(min / scale), 0, 2^b - 1)``; codes
   ``clip(round(x / scale) + zero, 0, 2^b - 1)`` (uint8, one per entry); the projector
   used is ``scale * (code - zero)``.
2. **Lazy refresh.** Leaf ``i`` refreshes at 0-based steps with
   ``count % gap_i == 0`` (``gap_i`` starts at ``update_proj_gap``). After each SVD
   but the first, the cosine between the new and the previous top singular vector
   (``P[0]`` / ``A[:, 0]``, before quantisation; signed) enters a queue of the last
   ``queue_size`` values; when the queue is full and its mean is ``>= cos_threshold``,
   ``gap_i <- int(gap_i * gamma_proj)``.
3. **INT8 weights** (optional, :func:`int8_weight_rounding`): after the update, each
   projected weight is re-quantised to 8 bits (groups of 256 in torch layout) with
   stochastic rounding, as the reference's simulation mode does.

The inner optimizer is bitsandbytes' 8-bit AdamW in the reference (32-bit states for
tensors under 4096 elements). ``inner="adam"`` is
:func:`lowrank_jax.torch_adam.scale_by_torch_adam` (bitsandbytes' 32-bit formula,
``m_hat / (sqrt(v_hat) + eps)``, exact bias corrections); ``inner="adam8bit"``
uses :func:`lowrank_jax.quantized.scale_by_adam_8bit` (our code book; eps on the
uncorrected root).

Reference: VITA-Group/Q-GaLore ``q_galore_torch/q_galore_projector.py``,
``q_galore_adamw8bit.py``, ``q_galore_adamw8bit_simulate.py``; see
``docs/methods/qgalore.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.quantized import scale_by_adam_8bit
from lowrank_jax.selection import LOWRANK, resolve_labels
from lowrank_jax.state_reader import find_states
from lowrank_jax.stateful_lowrank import scale_by_stateful_lowrank
from lowrank_jax.torch_adam import scale_by_torch_adam
from lowrank_jax.transform import check_static_int
from lowrank_jax.tree_util import path_string
from lowrank_jax.weight_decay import add_decayed_weights_after_update

__all__ = ["Int8RoundingState", "LazyRefreshCounts", "QGaLoreProjector", "QGaLoreState",
           "dequantize_groups", "group_count", "int8_weight_rounding", "lazy_refresh_counts",
           "qgalore_adamw8bit", "quantize_groups", "svd_counts"]


def group_count(size: int, group_size: int) -> int:
    """Groups of ``group_size`` entries that hold ``size`` entries (the last one padded)."""
    return -(-size // group_size)


def quantize_groups(w: jax.Array, bits: int, group_size: int, stochastic_key=None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric ``bits``-bit quantisation of ``w`` by groups of its row-major entries.

    Args:
      w: ``(a, b)`` float matrix.
      bits: bits per code (``<= 8``).
      group_size: entries per group; ``<= 0``: one group per row. When ``a * b`` is not
        a multiple, the last group is completed with copies of the last entry (its
        minimum and maximum, hence its scale and zero point, are those of its real
        entries; the reference requires a multiple).
      stochastic_key: ``None`` for round-to-nearest-even, else a PRNG key for
        stochastic rounding (``floor(w / s) + 1`` with probability ``frac(w / s)``).

    Returns:
      ``(codes (groups, group) uint8, scales (groups, 1), zeros (groups, 1))`` float32.

    As in the reference, the zero point is clipped to ``[0, 2^bits - 1]``: a group whose
    values are all far from zero on one side saturates (second row below).

    >>> import jax.numpy as jnp
    >>> c, s, z = quantize_groups(jnp.array([[-1.0, 2.0], [2.0, 3.0]]), 2, 2)
    >>> c.tolist(), dequantize_groups(c, s, z, (2, 2)).tolist()
    ([[0, 3], [3, 3]], [[-1.0, 2.0], [1.0, 1.0]])
    """
    w = w.astype(jnp.float32)
    if group_size > 0:
        flat = w.reshape(-1)
        pad = group_count(flat.size, group_size) * group_size - flat.size
        if pad:
            flat = jnp.concatenate([flat, jnp.broadcast_to(flat[-1], (pad,))])
        rows = flat.reshape(-1, group_size)
    else:
        rows = w
    max_int = 2 ** bits - 1
    hi = jnp.max(rows, axis=1, keepdims=True)
    lo = jnp.min(rows, axis=1, keepdims=True)
    scales = jnp.maximum(hi - lo, 1e-5) / max_int
    zeros = jnp.clip(-jnp.round(lo / scales), 0, max_int)
    scaled = rows / scales
    if stochastic_key is None:
        rounded = jnp.round(scaled)
    else:
        down = jnp.floor(scaled)
        up = jnp.ceil(scaled)
        u = jax.random.uniform(stochastic_key, scaled.shape, jnp.float32)
        rounded = jnp.where(u < scaled - down, up, down)
    codes = jnp.clip(rounded + zeros, 0, max_int).astype(jnp.uint8)
    return codes, scales, zeros


def dequantize_groups(codes: jax.Array, scales: jax.Array, zeros: jax.Array,
                      shape: tuple[int, int]) -> jax.Array:
    """``scales * (codes - zeros)`` as a float32 matrix of ``shape`` (padding dropped)."""
    values = (scales * (codes.astype(jnp.float32) - zeros)).reshape(-1)
    return values[:math.prod(shape)].reshape(shape)


class QGaLoreState(NamedTuple):
    """Per-leaf state of :class:`QGaLoreProjector`.

    Attributes:
      codes: ``(groups, group)`` uint8 codes of the projector in the reference's layout
        (``(r, d)`` for a right projector, ``(d, r)`` for a left one); the float basis
        ``(d, r)`` itself when quantisation is off.
      scales, zeros: ``(groups, 1)`` float32 (``(0, 1)`` when quantisation is off).
      gap: int32 current refresh period of this leaf.
      queue: ``(queue_size,)`` float32 last cosines, most recent last.
      queue_len: int32 number of valid cosines.
      last_vector: ``(d,)`` float32 top singular vector of the last SVD.
      svds: int32 SVDs done so far.
    """

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array
    gap: jax.Array
    queue: jax.Array
    queue_len: jax.Array
    last_vector: jax.Array
    svds: jax.Array


def _cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    return jnp.sum(a * b) / (jnp.maximum(jnp.linalg.norm(a), eps)
                             * jnp.maximum(jnp.linalg.norm(b), eps))


@dataclasses.dataclass(frozen=True)
class QGaLoreProjector:
    """Q-GaLore's projector as a stateful projector (:mod:`lowrank_jax.stateful_lowrank`).

    Args:
      update_proj_gap: initial refresh period.
      bits: projector bits (``None``: keep it in float, the reference's ``quant=False``).
      group_size: quantisation group (entries of the reference-layout projector).
      cos_threshold, gamma_proj, queue_size: the lazy-refresh rule (module docstring).
      abs_cosine: use ``|cos|``. The reference's cosine is signed, so a sign flip of the
        top singular vector (the SVD's free choice) counts as a change of subspace;
        ``True`` makes the rule independent of that choice. Default ``False``.
    """

    update_proj_gap: int = 200
    bits: int | None = 4
    group_size: int = 256
    cos_threshold: float = 0.4
    gamma_proj: float = 2
    queue_size: int = 5
    abs_cosine: bool = False
    name: str = "qgalore"

    def _layout_shape(self, d, rank, ctx):
        return (rank, d) if ctx.reduces_input else (d, rank)

    def _groups(self, d, rank, ctx):
        a, b = self._layout_shape(d, rank, ctx)
        if self.group_size <= 0:
            return a, b
        return group_count(a * b, self.group_size), self.group_size

    def init(self, d, rank, dtype, ctx):
        if self.bits is None:
            codes = jnp.zeros((d, rank), dtype)
            scales = zeros = jnp.zeros((0, 1), jnp.float32)
        else:
            groups, size = self._groups(d, rank, ctx)
            codes = jnp.zeros((groups, size), jnp.uint8)
            scales = zeros = jnp.zeros((groups, 1), jnp.float32)
        return QGaLoreState(codes, scales, zeros, jnp.asarray(self.update_proj_gap, jnp.int32),
                            jnp.zeros((self.queue_size,), jnp.float32),
                            jnp.zeros([], jnp.int32), jnp.zeros((d,), jnp.float32),
                            jnp.zeros([], jnp.int32))

    def due(self, state, count):
        return count % state.gap == 0

    def compute(self, key, x, rank, previous, count, ctx):
        del key, count
        _, _, vh = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
        basis = vh[:rank].T                                       # (d, r)
        top = basis[:, 0]
        had = previous.svds > 0
        cos = _cosine(previous.last_vector, top)
        cos = jnp.abs(cos) if self.abs_cosine else cos
        queue = jnp.where(had, jnp.concatenate([previous.queue[1:], cos[None]]),
                          previous.queue)
        qlen = jnp.where(had, jnp.minimum(previous.queue_len + 1, self.queue_size),
                         previous.queue_len)
        lazy = had & (qlen == self.queue_size) & (jnp.mean(queue) >= self.cos_threshold)
        grown = jnp.floor(previous.gap.astype(jnp.float32) * self.gamma_proj).astype(jnp.int32)
        gap = jnp.where(lazy, grown, previous.gap)
        if self.bits is None:
            codes, scales, zeros = basis.astype(previous.codes.dtype), previous.scales, \
                previous.zeros
        else:
            stored = basis.T if ctx.reduces_input else basis
            codes, scales, zeros = quantize_groups(stored, self.bits, self.group_size)
            codes = codes.reshape(previous.codes.shape)
        return QGaLoreState(codes, scales, zeros, gap, queue, qlen, top, previous.svds + 1)

    def basis(self, state, d, dtype, ctx):
        if self.bits is None:
            return state.codes.astype(dtype)
        rank = ctx.rank
        stored = dequantize_groups(state.codes, state.scales, state.zeros,
                                   self._layout_shape(d, rank, ctx))
        return (stored.T if ctx.reduces_input else stored).astype(dtype)

    def nbytes(self, d, rank, dtype, reduces_input: bool = True):
        """Exact bytes of one leaf's state (the side matters only for ``group_size <= 0``)."""
        ctx = _Side(reduces_input)
        state = jax.eval_shape(lambda: self.init(d, rank, dtype, ctx))
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(state))


class _Side(NamedTuple):
    reduces_input: bool


class Int8RoundingState(NamedTuple):
    """State of :func:`int8_weight_rounding`."""

    count: jax.Array  # int32
    key: jax.Array    # uint32 (2,) raw key data


def int8_weight_rounding(bits: int = 8, group_size: int = 256, stochastic: bool = True,
                         layout: str = "flax", seed: int = 0) -> optax.GradientTransformation:
    """Keep 2-D weights on an ``bits``-bit grid: ``new W = Q(W + u)``; outputs ``Q(W + u) - W``.

    A leaf whose update is exactly zero (a zero learning rate, a skipped step) is left
    as it is: on the grid, as the reference's INT8 weights always are, ``Q(W) = W``.

    ``Q`` is :func:`quantize_groups` (stochastic rounding when ``stochastic``) over groups
    of ``group_size`` consecutive entries of the weight in torch layout ``(out, in)``
    (a Flax kernel is transposed first), followed by dequantisation: the reference's
    simulation of INT8 weights (``q_galore_adamw8bit_simulate.py``). Put it last in a
    chain (after the learning rate and weight decay); it needs ``params``.

    >>> import jax.numpy as jnp
    >>> tx = int8_weight_rounding(group_size=4, stochastic=False)
    >>> w = {"k": jnp.array([[0.0, 0.3], [0.5, 1.0]])}
    >>> u, _ = tx.update({"k": jnp.zeros((2, 2))}, tx.init(w), w)
    >>> bool(jnp.abs(u["k"]).max() < 1.0 / 255)
    True
    """
    if layout not in ("flax", "torch"):
        raise ValueError(f"layout={layout!r} is not supported; use 'flax' or 'torch'.")

    def init_fn(params):
        def check(path, p):
            if p.ndim != 2:
                raise ValueError(f"int8_weight_rounding: leaf {path_string(path)!r} of shape "
                                 f"{tuple(p.shape)} is not a 2-D matrix; exclude it.")
        jax.tree_util.tree_map_with_path(check, params)
        return Int8RoundingState(jnp.zeros([], jnp.int32),
                                 jax.random.key_data(jax.random.key(seed)))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("int8_weight_rounding needs params (pass them to update).")
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        leaves, treedef = jax.tree.flatten(updates)
        ps = treedef.flatten_up_to(params)
        out = []
        for i, (u, p) in enumerate(zip(leaves, ps)):
            w = p.astype(jnp.float32) + u.astype(jnp.float32)
            torch_w = w.T if layout == "flax" else w
            key = jax.random.fold_in(step_key, i) if stochastic else None
            codes, scales, zeros = quantize_groups(torch_w, bits, group_size, key)
            q = dequantize_groups(codes, scales, zeros, torch_w.shape)
            q = q.T if layout == "flax" else q
            moved = jnp.any(u != 0)
            out.append(jnp.where(moved, q - p.astype(jnp.float32), 0.0).astype(u.dtype))
        return treedef.unflatten(out), Int8RoundingState(optax.safe_increment(state.count),
                                                         state.key)

    return optax.GradientTransformation(init_fn, update_fn)


class LazyRefreshCounts(NamedTuple):
    """SVDs of one Q-GaLore projector (int32 arrays; batched like the state under ``vmap``).

    Attributes:
      done: SVDs computed so far.
      fixed: SVDs a fixed-period GaLore (period ``update_proj_gap``) would have computed
        over the same updates, ``ceil(count / update_proj_gap)``.
    """

    done: jax.Array
    fixed: jax.Array

    @property
    def saved(self) -> jax.Array:
        """SVDs the lazy rule skipped: ``fixed - done``."""
        return self.fixed - self.done


def lazy_refresh_counts(opt_state: Any) -> dict[str, LazyRefreshCounts]:
    """``{param name: LazyRefreshCounts}`` for every Q-GaLore projector in ``opt_state``.

    Found anywhere in the state (chains, ``optax.partition``, ``MultiSteps``, ...), named
    as :func:`lowrank_jax.projector_bases` names them.

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((16, 8))}}
    >>> tx = qgalore_adamw8bit(1e-2, rank=2, update_proj_gap=4, proj_group_size=8,
    ...                        weight_bits=None)
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...     _, state = tx.update(params, state, params)
    >>> c = lazy_refresh_counts(state)["attn/q"]
    >>> int(c.done), int(c.fixed), int(c.saved)
    (2, 2, 0)
    """
    out: dict[str, LazyRefreshCounts] = {}
    states = find_states(opt_state)
    for i, st in enumerate(states):
        proj = st.layout.projector
        if not isinstance(proj, QGaLoreProjector):
            continue
        gap = proj.update_proj_gap
        fixed = (jnp.asarray(st.count, jnp.int32) + gap - 1) // gap
        for name, pstate in zip(st.layout.names, st.layout.leaves(st.projector)):
            key = f"{i}:{name}" if len(states) > 1 else name
            out[key] = LazyRefreshCounts(pstate.svds, fixed)
    return out


def svd_counts(opt_state: Any) -> dict[str, int]:
    """``{param name: SVDs done}`` for every Q-GaLore projector in ``opt_state`` (host ints)."""
    return {k: int(np.asarray(c.done)) for k, c in lazy_refresh_counts(opt_state).items()}


def qgalore_adamw8bit(
    learning_rate: Any, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    labels: Any = None, layout: str = "flax", proj_bits: int | None = 4,
    proj_group_size: int = 256, cos_threshold: float = 0.4, gamma_proj: float = 2,
    queue_size: int = 5, abs_cosine: bool = False, weight_bits: int | None = 8,
    weight_group_size: int = 256,
    stochastic_round: bool = True, inner: str = "adam8bit", block_size: int = 256,
    seed: int = 0,
) -> optax.GradientTransformation:
    """Q-GaLore-AdamW8bit (VITA-Group/Q-GaLore ``QGaLoreAdamW8bit``; pip ``q-galore-torch``).

    Selected matrices: the lazily refreshed, INT4 projector of
    :class:`QGaLoreProjector` (GaLore's ``std`` side), Adam on the projected gradient,
    ``scale`` on the back-projection, then ``W -= lr wd W`` after the update. Other
    leaves: the same Adam at full size with decoupled decay before the update (as
    bitsandbytes). With ``weight_bits`` (default 8) the selected matrices are kept on an
    INT8 grid by :func:`int8_weight_rounding` (stochastic rounding by default).

    Args:
      learning_rate: a float or an optax schedule.
      rank, update_proj_gap, scale: GaLore's ``rank``, initial ``T`` and ``scale``.
      b1, b2, eps: Adam's constants (the class defaults; the reference's LLaMA scripts
        use ``b2 = 0.95``).
      weight_decay: decoupled weight decay.
      labels: which leaves are projected (``None``: GaLore's name rule).
      layout: ``"flax"`` or ``"torch"``.
      proj_bits, proj_group_size: projector quantisation (``None``: float projector).
      cos_threshold, gamma_proj, queue_size, abs_cosine: the lazy-refresh rule
        (:class:`QGaLoreProjector`).
      weight_bits, weight_group_size, stochastic_round: INT8 weights (``None``: off).
      inner: ``"adam8bit"`` or ``"adam"`` (bitsandbytes' 32-bit formula).
      block_size: quantisation block of ``"adam8bit"``.
      seed: seed of the stochastic rounding.

    >>> import jax.numpy as jnp
    >>> params = {"attn": {"q": jnp.ones((32, 16))}, "norm": jnp.ones(16)}
    >>> tx = qgalore_adamw8bit(1e-2, rank=8, proj_group_size=16, weight_group_size=16)
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["attn"]["q"].shape
    (32, 16)
    """
    from lowrank_jax.alias import _is_zero
    from lowrank_jax.selection import DENSE

    if inner == "adam8bit":
        make = lambda: scale_by_adam_8bit(b1, b2, eps, block_size=block_size)
    elif inner == "adam":
        make = lambda: scale_by_torch_adam(b1, b2, eps)
    else:
        raise ValueError(f"inner={inner!r} is not supported; use 'adam8bit' or 'adam'.")
    for name, value in (("update_proj_gap", update_proj_gap), ("queue_size", queue_size),
                        ("block_size", block_size)):
        check_static_int(name, value)
    for name, value in (("proj_group_size", proj_group_size),
                        ("weight_group_size", weight_group_size)):
        check_static_int(name, value, minimum=-(2 ** 31))      # <= 0: whole rows
    for name, value in (("proj_bits", proj_bits), ("weight_bits", weight_bits)):
        if value is not None and check_static_int(name, value) > 8:
            raise ValueError(f"{name} must be an int in [1, 8] or None, got {value!r}.")
    proj = QGaLoreProjector(update_proj_gap, proj_bits, proj_group_size, cos_threshold,
                            gamma_proj, queue_size, abs_cosine)
    lowrank = scale_by_stateful_lowrank(make(), rank=rank, projector=proj, scale=scale,
                                        proj_type="std", layout=layout, seed=seed)
    label_fn = resolve_labels(labels)
    is_lowrank = lambda p: jax.tree.map(lambda lab: lab == LOWRANK, label_fn(p))
    is_dense = lambda p: jax.tree.map(lambda lab: lab == DENSE, label_fn(p))
    parts = [optax.partition({LOWRANK: lowrank, DENSE: make()}, label_fn)]
    decay = not _is_zero(weight_decay)
    if decay:
        parts.append(optax.masked(optax.add_decayed_weights(weight_decay), is_dense))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    if decay:
        parts.append(add_decayed_weights_after_update(learning_rate, weight_decay,
                                                      mask=is_lowrank))
    if weight_bits is not None:
        parts.append(optax.masked(
            int8_weight_rounding(weight_bits, weight_group_size, stochastic_round, layout, seed),
            is_lowrank))
    return optax.chain(*parts)
