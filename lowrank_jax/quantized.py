"""8-bit Adam moments: blockwise dynamic quantisation (Dettmers et al. 2022, "8-bit Optimizers").

Each moment tensor is flattened, padded to a multiple of ``block_size`` (256)
and split in blocks; a block stores its absolute maximum (float32) and one
uint8 code per element, an index into a fixed 256-entry *dynamic* code book
(a few values per decade, from ``1e-6`` up to ``1``: fine resolution near zero,
coarse near the block maximum). The first moment uses a signed code book, the
second (non-negative) an unsigned one with twice the resolution. Moments are
dequantised, updated in float32 and requantised every step (round to nearest
code), so the state costs ``1 + 4 / block_size`` bytes per element instead of 4.

:func:`scale_by_adam_8bit` has the formulas of
:func:`lowrank_jax.inner.scale_by_reference_adam` (GaLore's Adam), so it can be
the inner transformation of any projection method (its state then lives at the
projected shapes). Leaves with fewer than ``min_size`` elements keep float32
moments (as bitsandbytes does for small tensors).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.inner import _bias_factor
from lowrank_jax.tree_util import map_unzip

__all__ = [
    "QuantizedAdamState",
    "QuantizedTensor",
    "dequantize",
    "dynamic_code_book",
    "quantize",
    "scale_by_adam_8bit",
]


def dynamic_code_book(signed: bool) -> np.ndarray:
    """The sorted float32 code values in ``[-1, 1]`` (signed, 255) or ``[0, 1]`` (unsigned, 256).

    Decade ``i = 0..6`` covers ``[10^(i-7), 10^(i-6)]`` (magnitudes relative to the block
    maximum) with ``2^i`` (signed; 63 for the top decade) or ``2^(i+1)`` (unsigned)
    evenly spaced values (the midpoints of a uniform split of ``[0.1, 1] * 10^(i-6)``),
    mirrored for the signed book; ``0``, ``1`` (and ``-1``) are exact codes.

    >>> book = dynamic_code_book(signed=True)
    >>> book.shape, float(book.min()), float(book.max()), bool(0.0 in book)
    ((255,), -1.0, 1.0, True)
    """
    values = [0.0, 1.0]
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)
        if signed and i == 6:
            n -= 1  # leaves room for the exact -1
        edges = np.linspace(0.1, 1.0, n + 1)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values.extend(mids.tolist())
        if signed:
            values.extend((-mids).tolist())
    if signed:
        values.append(-1.0)
    book = np.sort(np.asarray(values, np.float64)).astype(np.float32)
    assert book.shape == ((255,) if signed else (256,)), book.shape
    return book


_SIGNED = dynamic_code_book(True)
_UNSIGNED = dynamic_code_book(False)


class QuantizedTensor(NamedTuple):
    """A blockwise-quantised tensor (its shape and dtype are those of the updates)."""

    codes: jax.Array   # (n_blocks, block_size) uint8
    absmax: jax.Array  # (n_blocks,) float32


def _n_blocks(size: int, block_size: int) -> int:
    return max(1, -(-size // block_size))


def quantize(x: jax.Array, signed: bool, block_size: int = 256) -> QuantizedTensor:
    """Quantise ``x`` (any shape) blockwise to the nearest code of the dynamic code book.

    >>> import jax.numpy as jnp
    >>> q = quantize(jnp.array([0.5, -1.0, 0.25]), signed=True)
    >>> [round(v, 2) for v in dequantize(q, (3,), jnp.float32).tolist()]
    [0.49, -1.0, 0.25]
    """
    flat = x.astype(jnp.float32).reshape(-1)
    n = _n_blocks(flat.size, block_size)
    flat = jnp.pad(flat, (0, n * block_size - flat.size)).reshape(n, block_size)
    return _quantize_blocks(flat, signed)


def _nearest_code(scaled: jax.Array, signed: bool) -> jax.Array:
    """Index of the nearest code of each entry of ``scaled`` (uint8, the same shape).

    The number of midpoints between neighbouring codes that lie below the value
    (``searchsorted(mids, x, side='left')``), found by an 8-step binary search over
    the midpoints padded with ``+inf`` to 255 entries.  The first step compares
    with one scalar so that no step gathers at constant indices (XLA would
    constant-fold such a gather into a table the size of the moment).
    """
    book = _SIGNED if signed else _UNSIGNED
    mids = (book[1:] + book[:-1]) / 2
    pad = np.concatenate([mids, np.full(255 - mids.size, np.inf, np.float32)])
    table = jnp.asarray(pad)
    idx = jnp.where(float(pad[127]) < scaled, 128, 0).astype(jnp.int32)
    for step in (64, 32, 16, 8, 4, 2, 1):
        candidate = idx + step
        idx = jnp.where(table[candidate - 1] < scaled, candidate, idx)
    return idx.astype(jnp.uint8)


def dequantize(q: QuantizedTensor, shape: tuple[int, ...], dtype: Any, signed: bool = True
               ) -> jax.Array:
    """Float values of ``q`` in ``shape`` / ``dtype`` (``signed`` must match :func:`quantize`)."""
    book = jnp.asarray(_SIGNED if signed else _UNSIGNED)
    vals = book[q.codes.astype(jnp.int32)] * q.absmax[:, None]
    size = int(np.prod(shape, dtype=np.int64))
    return vals.reshape(-1)[:size].reshape(shape).astype(dtype)


class QuantizedAdamState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`; ``mu``/``nu`` leaves are :class:`QuantizedTensor`
    (float32 arrays for leaves smaller than ``min_size``)."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                       bias_correction: bool = True, block_size: int = 256,
                       min_size: int = 4096) -> optax.GradientTransformation:
    """GaLore's Adam (:func:`~lowrank_jax.inner.scale_by_reference_adam`) with 8-bit moments.

    ``m`` (signed code book) and ``v`` (unsigned) are stored blockwise quantised
    (``block_size`` elements per float32 absmax); each step dequantises, applies
    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, ``u = m / (sqrt(v) + eps)``
    (times ``sqrt(1-b2^t)/(1-b1^t)`` when ``bias_correction``) in float32 and
    requantises. Usable as the ``inner`` of :func:`lowrank_jax.scale_by_lowrank`
    (not with ``moments='transport'``, which needs a float ``mu``).

    Args:
      b1, b2, eps, bias_correction: as :func:`scale_by_reference_adam`.
      block_size: elements per quantisation block.
      min_size: leaves with fewer elements keep float32 moments.

    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam_8bit()
    >>> state = tx.init({"w": jnp.zeros((64, 128))})
    >>> state.mu["w"].codes.shape, state.mu["w"].codes.dtype
    ((32, 256), dtype('uint8'))
    >>> u, state = tx.update({"w": jnp.ones((64, 128))}, state)
    >>> round(float(u["w"][0, 0]), 3)
    1.0
    """

    def quantized(p) -> bool:
        return int(np.prod(p.shape, dtype=np.int64)) >= min_size

    def init_leaf(p, signed):
        if not quantized(p):
            return jnp.zeros(p.shape, jnp.float32)
        n = _n_blocks(int(np.prod(p.shape, dtype=np.int64)), block_size)
        return QuantizedTensor(jnp.full((n, block_size), _zero_code(signed), jnp.uint8),
                               jnp.zeros((n,), jnp.float32))

    def init_fn(params):
        mu = jax.tree.map(lambda p: init_leaf(p, True), params)
        nu = jax.tree.map(lambda p: init_leaf(p, False), params)
        return QuantizedAdamState(jnp.zeros([], jnp.int32), mu, nu)

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        factor = _bias_factor(count, b1, b2) if bias_correction else None

        def adam(g, m, v):
            g32 = g.astype(jnp.float32)
            m = b1 * m + (1 - b1) * g32
            v = b2 * v + (1 - b2) * g32 * g32
            u = m / (jnp.sqrt(v) + eps)
            return (u if factor is None else u * factor), m, v

        def blocks(args):
            """The update of ``(rows, block_size)`` blocks of one quantised leaf."""
            g, mc, ma, vc, va = args
            m = jnp.asarray(_SIGNED)[mc.astype(jnp.int32)] * ma[:, None]
            v = jnp.asarray(_UNSIGNED)[vc.astype(jnp.int32)] * va[:, None]
            u, m, v = adam(g, m, v)
            mq, vq = _quantize_blocks(m, True), _quantize_blocks(v, False)
            return u.astype(g.dtype), mq.codes, mq.absmax, vq.codes, vq.absmax

        def leaf(g, mq, vq):
            if not isinstance(mq, QuantizedTensor):
                u, m, v = adam(g, mq, vq)
                return u.astype(g.dtype), m, v
            # blockwise, a chunk of blocks at a time: the float32 moments of a large
            # leaf (a 32000 x 4096 embedding: 500 MiB each) never exist whole
            n, size = mq.codes.shape[0], int(np.prod(g.shape, dtype=np.int64))
            flat = jnp.pad(g.reshape(-1), (0, n * block_size - size)).reshape(n, block_size)
            args = (flat, mq.codes, mq.absmax, vq.codes, vq.absmax)
            rows = _chunk_rows(n, max(1, _CHUNK // block_size))
            if rows < n:
                # the moments are the loop's carry, each chunk rewritten in place
                # (no second copy of the codes); the updates are written into ``flat``
                def body(i, carry):
                    start = i * rows
                    part = jax.tree.map(
                        lambda a: jax.lax.dynamic_slice_in_dim(a, start, rows), carry)
                    return jax.tree.map(
                        lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, start, 0),
                        carry, blocks(part))

                out = jax.lax.fori_loop(0, n // rows, body, args)
            else:
                out = blocks(args)
            u, mc, ma, vc, va = out
            u = u.reshape(-1)[:size].reshape(g.shape)
            return u, QuantizedTensor(mc, ma), QuantizedTensor(vc, va)

        out, mu, nu = map_unzip(leaf, updates, state.mu, state.nu, n_out=3)
        return out, QuantizedAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


#: elements per chunk of a quantised leaf's update (4 MiB per float32 temporary)
_CHUNK = 2**20


def _chunk_rows(n: int, target: int) -> int:
    """The largest divisor of ``n`` blocks that is at most ``target`` (``n`` itself when
    ``n <= target`` or when no divisor comes within 16x of ``target``)."""
    if n <= target:
        return n
    best = max(d for d in range(1, target + 1) if n % d == 0)
    return best if best * 16 >= target else n


def _quantize_blocks(x: jax.Array, signed: bool) -> QuantizedTensor:
    """:func:`quantize` of ``(n, block_size)`` blocks (one absmax per row)."""
    absmax = jnp.max(jnp.abs(x), axis=1)
    scaled = x / jnp.where(absmax > 0, absmax, 1.0)[:, None]
    return QuantizedTensor(_nearest_code(scaled, signed), absmax)


def _zero_code(signed: bool) -> int:
    return int(np.flatnonzero((_SIGNED if signed else _UNSIGNED) == 0.0)[0])
