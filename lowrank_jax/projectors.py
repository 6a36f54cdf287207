"""Projectors: how a rank-r subspace is chosen from a gradient.

A projector works on a matrix ``x`` of shape ``(k, d)`` whose **last** axis
``d`` is the one being reduced (the wrapper transposes the stored gradient so
this holds). It owns a small state (an orthonormal basis, or only indices),
and exposes the basis ``B`` of shape ``(d, r)`` so that the projected gradient
is ``x @ B`` and the back-projection of a small ``n`` is ``n @ B.T``.

Every projector is a frozen dataclass with four pure methods::

    init(d, rank, dtype) -> state            # zeros, before the first refresh
    compute(key, x, rank, previous, count) -> state
    basis(state, d, dtype) -> (d, rank)      # the matrix used by project/back
    nbytes(d, rank, dtype) -> int            # exact bytes of the state

so a new projector is a few lines. ``compute`` runs only on refresh steps,
under ``lax.cond``, on a gradient whose non-finite entries were replaced by zeros
(:func:`lowrank_jax.steps.compute_projector`; the result is discarded when the
gradient was not finite). ``basis`` is also how :func:`lowrank_jax.projector_bases`
reads a projector's state, so it must work on concrete arrays outside ``jit``.

References: GaLore (jiaweizzhao/GaLore ``galore_torch/galore_projector.py``),
randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4), FRUGAL's random
columns (fzmushko/FRUGAL),
SARA (arXiv 2502.05790), GoLore (pkumelon/Golore
``golore_torch/golore_projector.py``), SVD-free DCT (IST-DASLab
``fft_low_rank/fft_projector.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PROJECTORS",
    "ColumnsProjector",
    "ColumnsState",
    "DCTProjector",
    "DCTState",
    "OnlinePCAProjector",
    "OnlinePCAState",
    "Projector",
    "RSVDProjector",
    "RandomProjector",
    "SARAProjector",
    "SVDProjector",
    "SwitchProjector",
    "dct_basis",
    "get_projector",
    "pca_loss",
    "sample_without_replacement",
]


class Projector(Protocol):
    """What a projector provides (see the module docstring)."""

    name: str

    def init(self, d: int, rank: int, dtype: Any) -> Any: ...

    def compute(self, key: jax.Array, x: jax.Array, rank: int, previous: Any,
                count: jax.Array) -> Any: ...

    def basis(self, state: Any, d: int, dtype: Any) -> jax.Array: ...

    def nbytes(self, d: int, rank: int, dtype: Any) -> int: ...


def _right_singular(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Singular values ``(min(k, d),)`` and right singular vectors as columns ``(d, min)``.

    The SVD is done in float32 whatever the input dtype (GaLore does the same).
    """
    _, s, vh = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
    return s, vh.T


@dataclasses.dataclass(frozen=True)
class _DenseBasisProjector:
    """Shared plumbing for projectors whose state is the basis matrix itself."""

    def init(self, d: int, rank: int, dtype: Any) -> jax.Array:
        return jnp.zeros((d, rank), dtype)

    def basis(self, state: jax.Array, d: int, dtype: Any) -> jax.Array:
        del d
        return state.astype(dtype)

    def nbytes(self, d: int, rank: int, dtype: Any) -> int:
        return d * rank * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class SVDProjector(_DenseBasisProjector):
    """GaLore: the top-``rank`` right singular vectors of ``x`` (float32 SVD).

    >>> import jax, jax.numpy as jnp
    >>> p = SVDProjector()
    >>> x = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
    >>> q = p.compute(jax.random.key(0), x, 2, p.init(3, 2, jnp.float32), 0)
    >>> q.shape
    (3, 2)
    """

    name: str = "svd"

    def compute(self, key, x, rank, previous, count):
        del key, count
        _, v = _right_singular(x)
        return v[:, :rank].astype(previous.dtype)


def _span_basis(y: jax.Array, shift: float = 1e-5) -> jax.Array:
    """A well-conditioned basis ``(d, w)`` of ``span(y)`` (shifted Cholesky-QR, one pass).

    Columns are scaled to unit norm, then ``y L^{-T}`` with ``L L^T = y^T y + shift I``.
    The span is exactly that of ``y`` (``L`` is invertible) and the columns are close
    to orthonormal (off-diagonal ``~shift``); it costs two ``d w^2`` products and a
    ``w^3 / 3`` Cholesky instead of a Householder QR.
    """
    y = y / (jnp.linalg.norm(y, axis=0, keepdims=True) + 1e-30)
    gram = y.T @ y
    chol = jnp.linalg.cholesky(gram + shift * jnp.eye(gram.shape[0], dtype=gram.dtype))
    return jax.scipy.linalg.solve_triangular(chol, y.T, lower=True).T


def _random_signs(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """A ``(d, w)`` float32 Rademacher matrix (entries ``+-1`` with probability 1/2).

    One random bit per entry: ``ceil(w / 32)`` uint32 words per row are drawn and
    unpacked, 32 times fewer random words than a Gaussian matrix needs.
    """
    d, w = shape
    words = -(-w // 32)
    bits = jax.random.bits(key, (d, words), jnp.uint32)
    unpacked = (bits[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return unpacked.reshape(d, words * 32)[:, :w].astype(jnp.float32) * 2.0 - 1.0


def _symmetric_gram(x: jax.Array, blocks: int | None = None) -> jax.Array:
    """``x^T x`` ``(d, d)`` from its upper block triangle (``(b + 1) / (2 b)`` of the products).

    The ``d`` columns are split into ``b`` groups; the ``b (b + 1) / 2`` tiles
    ``x_i^T x_j`` (``i <= j``) are computed and the lower ones are their transposes.
    ``blocks=None`` picks ``b = round(d / 192)`` clipped to ``[1, 6]``: tiles of about
    192 columns were the fastest on a 2-core AVX-512 CPU (``d`` 512 to 2048).
    """
    d = x.shape[1]
    if blocks is None:
        blocks = min(6, max(1, round(d / 192)))
    if blocks == 1:
        return x.T @ x
    edges = [i * d // blocks for i in range(blocks + 1)]
    cols = [x[:, a:b] for a, b in itertools.pairwise(edges)]
    tiles = {(i, j): cols[i].T @ cols[j] for i in range(blocks) for j in range(i, blocks)}
    return jnp.block([[tiles[i, j] if i <= j else tiles[j, i].T for j in range(blocks)]
                      for i in range(blocks)])


@dataclasses.dataclass(frozen=True)
class RSVDProjector(_DenseBasisProjector):
    """Randomized SVD: approximate top-``rank`` right singular vectors of ``x``.

    Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 and
    5.3) on the ``(d, d)`` operator ``A = x^T x``, whose eigenvectors are the right
    singular vectors of ``x``:

    1. ``Y = A Omega`` with a Rademacher test matrix ``Omega`` of shape ``(d, w)``,
       ``w = rank + oversample``;
    2. ``power_iters`` times ``Y = A basis(Y)``, with a cheap span-preserving
       re-orthonormalisation between products (shifted Cholesky-QR,
       :func:`_span_basis`);
    3. ``Q``: an orthonormal basis of ``span(Y)`` by shifted Cholesky-QR3 (three
       passes of :func:`_span_basis`, the later ones with a smaller shift; Fukaya
       et al. 2020), orthonormal to float32 round-off even when ``Y`` is
       numerically rank-deficient; no Householder QR;
    4. Rayleigh-Ritz: the eigenvectors ``U`` of the small ``Q^T A Q`` sorted by
       descending eigenvalue (``= sigma^2``) give ``Q U``, whose first ``rank``
       columns are returned: approximate singular vectors in order, so Adam on the
       projected gradient works in the same coordinates as with the exact SVD.

    ``A`` is shifted by ``1e-6 trace(A) / d`` (same eigenvectors), so a zero or
    rank-deficient gradient still gives an orthonormal basis. When ``k >= d``, ``A``
    is formed once (about ``0.6 k d^2`` multiply-adds: only its upper block
    triangle is computed, :func:`_symmetric_gram`) and each application is a
    ``(d, d) @ (d, w)`` product; otherwise ``A`` is applied as ``x^T (x Q)``.
    Float32 throughout; the only dense factorisations are of
    ``(w, w)`` matrices (Cholesky, one ``eigh``).

    Args:
      oversample: extra test vectors (``p`` in Halko et al.).
      power_iters: subspace iterations ``q`` (each one more application of ``A``).

    >>> import jax, jax.numpy as jnp
    >>> p = RSVDProjector()
    >>> x = jax.random.normal(jax.random.key(0), (32, 3)) @ jax.random.normal(jax.random.key(1), (3, 20))
    >>> q = p.compute(jax.random.key(2), x, 3, p.init(20, 3, jnp.float32), 0)
    >>> q.shape, bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-4))
    ((20, 3), True)
    """

    oversample: int = 10
    power_iters: int = 1
    name: str = "rsvd"

    def compute(self, key, x, rank, previous, count):
        del count
        x32 = x.astype(jnp.float32)
        k, d = x32.shape
        width = min(rank + self.oversample, k, d)
        # A + shift I has A's eigenvectors and is positive definite, so every Y below has
        # full column rank even for a zero or rank-deficient gradient (those directions
        # then keep the test matrix's random ones) and the Cholesky steps stay finite.
        shift = 1e-6 * jnp.sum(x32 * x32) / d + 1e-30
        if k >= d:
            gram = _symmetric_gram(x32) + shift * jnp.eye(d, dtype=jnp.float32)
            apply = lambda q: gram @ q
        else:
            apply = lambda q: x32.T @ (x32 @ q) + shift * q
        y = apply(_random_signs(key, (d, width)) / np.sqrt(d))  # (d, width)
        for _ in range(self.power_iters):
            y = apply(_span_basis(y))
        q = _span_basis(_span_basis(_span_basis(y), shift=1e-6), shift=1e-6)  # orthonormal
        h = q.T @ apply(q)                                      # (width, width)
        _, u = jnp.linalg.eigh((h + h.T) / 2)                   # ascending eigenvalues
        v = q @ u[:, ::-1]                                      # (d, width), by sigma desc.
        return v[:, :rank].astype(previous.dtype)


class ColumnsState(NamedTuple):
    """State of the columns projector: the selected coordinate indices only."""

    indices: jax.Array  # (r,) int32, sorted ascending


@dataclasses.dataclass(frozen=True)
class ColumnsProjector:
    """FRUGAL's random coordinate subspace: ``rank`` of the ``d`` coordinates.

    A uniformly random subset of coordinates (no replacement, sorted), redrawn at
    every refresh; the basis is the ``(d, rank)`` one-hot selection matrix, so
    projecting keeps those columns of ``x`` and ``G - P P^T G`` zeroes them.
    Only the int32 indices are stored.

    >>> import jax, jax.numpy as jnp
    >>> p = ColumnsProjector()
    >>> s = p.compute(jax.random.key(0), jnp.ones((4, 6)), 2, p.init(6, 2, jnp.float32), 0)
    >>> p.basis(s, 6, jnp.float32).sum(axis=0).tolist()
    [1.0, 1.0]
    """

    name: str = "columns"

    def init(self, d, rank, dtype):
        del d, dtype
        return ColumnsState(jnp.zeros((rank,), jnp.int32))

    def compute(self, key, x, rank, previous, count):
        del count, previous
        d = x.shape[-1]
        idx = jax.random.permutation(key, d)[:rank]
        return ColumnsState(jnp.sort(idx).astype(jnp.int32))

    def basis(self, state, d, dtype):
        return jax.nn.one_hot(state.indices, d, dtype=dtype).T

    def nbytes(self, d, rank, dtype):
        del d, dtype
        return rank * 4


def sample_without_replacement(key: jax.Array, weights: jax.Array, k: int) -> jax.Array:
    """Draw ``k`` distinct indices with probability proportional to ``weights``.

    Successive sampling without replacement (each draw renormalised over the
    indices not yet drawn) is exactly the law of the top-``k`` of
    ``log(w) + Gumbel`` noise, which is what this computes; the result is sorted
    ascending, as SARA does before slicing the singular vectors.

    Args:
      key: a PRNG key.
      weights: ``(n,)`` non-negative weights (zero weights are drawn last).
      k: how many indices, ``k <= n``.

    Returns:
      ``(k,)`` int32 indices, sorted ascending.

    >>> import jax, jax.numpy as jnp
    >>> idx = sample_without_replacement(jax.random.key(0), jnp.ones(5), 3)
    >>> idx.shape, bool(jnp.all(jnp.diff(idx) > 0))
    ((3,), True)
    """
    w = jnp.asarray(weights, jnp.float32)
    gumbel = jax.random.gumbel(key, w.shape, jnp.float32)
    logits = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    # Indices of zero weight get -inf + noise; add a tiny ordered offset so they
    # are still ranked (after every positive weight) rather than tied.
    scores = jnp.where(jnp.isfinite(logits), logits + gumbel, -1e30 + gumbel)
    _, idx = jax.lax.top_k(scores, k)
    return jnp.sort(idx).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SARAProjector(_DenseBasisProjector):
    """SARA: ``rank`` singular vectors sampled without replacement, p ∝ sigma.

    The sampled indices are sorted ascending (by descending singular value)
    before slicing, as in the SARA paper (arXiv 2502.05790, Alg. 1).
    """

    name: str = "sara"

    def compute(self, key, x, rank, previous, count):
        del count
        s, v = _right_singular(x)
        idx = sample_without_replacement(key, s, rank)
        return jnp.take(v, idx, axis=1).astype(previous.dtype)


@dataclasses.dataclass(frozen=True)
class RandomProjector(_DenseBasisProjector):
    """A random subspace, independent of the gradient (GoLore, APOLLO, Flora).

    ``orthogonal=True`` (GoLore): ``Z (Z^T Z)^{-1/2}`` with ``Z ~ N(0, 1)`` of
    shape ``(d, r)``, i.e. a Haar-random matrix with orthonormal columns (computed
    as ``U V^T`` from the thin SVD of ``Z``, which is the same matrix).
    ``orthogonal=False`` (APOLLO/Flora): ``Z / sqrt(r)``, not orthonormal.
    """

    orthogonal: bool = True
    name: str = "random"

    def compute(self, key, x, rank, previous, count):
        del count
        d = x.shape[-1]
        z = jax.random.normal(key, (d, rank), jnp.float32)
        if self.orthogonal:
            u, _, vh = jnp.linalg.svd(z, full_matrices=False)
            q = u @ vh
        else:
            q = z / math.sqrt(rank)
        return q.astype(previous.dtype)


def dct_basis(indices: jax.Array, d: int, dtype: Any = jnp.float32) -> jax.Array:
    """Columns ``indices`` of the orthonormal DCT matrix used by the DCT projector.

    The matrix is ``Q[k, j] = c_k sqrt(2/d) cos(pi k (2j + 1) / (2d))`` with
    ``c_0 = sqrt(1/2)`` and ``c_k = 1`` otherwise (rows are frequencies ``k``);
    the reference projects ``G @ Q[:, idx]``, so basis vector ``j`` is column
    ``j`` of ``Q``. Built on the fly from the indices: ``d * r`` cosines.

    Args:
      indices: ``(r,)`` int32 column indices in ``[0, d)``.
      d: the reduced dimension.
      dtype: dtype of the result.

    Returns:
      ``(d, r)`` matrix with orthonormal columns.
    """
    k = jnp.arange(d, dtype=jnp.int32)[:, None]
    j = indices.astype(jnp.int32)[None, :]
    # reduce the angle's integer part modulo the period 4d before the float32
    # cosine, so large k * (2j + 1) lose no precision (int32 holds 2 d^2 for d < 32768)
    phase = (k * (2 * j + 1)) % (4 * d)
    q = jnp.sqrt(2.0 / d) * jnp.cos(jnp.pi * phase.astype(jnp.float32) / (2.0 * d))
    q = q * jnp.where(k == 0, jnp.sqrt(0.5), 1.0)
    return q.astype(dtype)


class DCTState(NamedTuple):
    """State of the DCT projector: the selected column indices only."""

    indices: jax.Array  # (r,) int32, in order of descending score


@dataclasses.dataclass(frozen=True)
class DCTProjector:
    """SVD-free projector: top-``rank`` DCT basis vectors by l1 alignment.

    Scores every column ``j`` of ``S = x @ Q`` by ``sum_i |S[i, j]|`` and keeps the
    ``rank`` best, in descending score order (the reference's ``topk`` order is
    implementation-defined). ``x @ Q`` is an inverse orthonormal DCT-II of the
    rows of ``x``, computed by FFT in ``O(k d log d)``; only int32 indices are
    stored. Reference: IST-DASLab ``fft_low_rank/fft_projector.py``.
    """

    name: str = "dct"

    def init(self, d, rank, dtype):
        del d, dtype
        return DCTState(jnp.zeros((rank,), jnp.int32))

    def compute(self, key, x, rank, previous, count):
        del key, count, previous
        # The transform runs along axis 0 of the transposed input: XLA:CPU's FFT rejects
        # (RET_CHECK in fft_thunk) a last-axis FFT of an all-gathered, sharded gradient.
        s = jax.scipy.fft.idct(x.astype(jnp.float32).T, type=2, norm="ortho", axis=0)
        scores = jnp.sum(jnp.abs(s), axis=1)
        _, idx = jax.lax.top_k(scores, rank)
        return DCTState(idx.astype(jnp.int32))

    def basis(self, state, d, dtype):
        return dct_basis(state.indices, d, dtype)

    def nbytes(self, d, rank, dtype):
        del d, dtype
        return rank * 4


@dataclasses.dataclass(frozen=True)
class SwitchProjector:
    """Use ``first`` before optimizer step ``switch_step`` (0-based count), ``second`` after.

    GoLore: SVD projections early, random ones for the last part of training.
    Both projectors must have the same state structure.
    """

    first: Any
    second: Any
    switch_step: int
    name: str = "switch"

    def init(self, d, rank, dtype):
        return self.first.init(d, rank, dtype)

    def compute(self, key, x, rank, previous, count):
        return jax.lax.cond(
            count >= self.switch_step,
            lambda: self.second.compute(key, x, rank, previous, count),
            lambda: self.first.compute(key, x, rank, previous, count),
        )

    def basis(self, state, d, dtype):
        return self.first.basis(state, d, dtype)

    def nbytes(self, d, rank, dtype):
        return self.first.nbytes(d, rank, dtype)


class OnlinePCAState(NamedTuple):
    """State of :class:`OnlinePCAProjector`.

    Attributes:
      basis: ``(d, r)`` the projector in use (not exactly orthonormal).
      grad: ``(d, r)`` float32 gradient of the PCA loss at ``basis`` (applied next time).
      mu, nu: ``(d, r)`` float32 AdamW moments of the projector's optimizer.
      steps: int32 number of computes done.
    """

    basis: jax.Array
    grad: jax.Array
    mu: jax.Array
    nu: jax.Array
    steps: jax.Array


def pca_loss(q: jax.Array, x: jax.Array) -> jax.Array:
    """Online PCA objective ``||x_hat Q Q^T - x_hat||_F^2`` with ``x_hat = x / ||x||_F``."""
    xh = x / jnp.linalg.norm(x)
    return jnp.sum((xh @ q @ q.T - xh) ** 2)


@dataclasses.dataclass(frozen=True)
class OnlinePCAProjector:
    """Online Subspace Descent: the projector follows the gradient by descent on a PCA loss.

    The first compute is GaLore's top-``rank`` SVD. Afterwards, at every compute
    (run it every step: ``update_every=1``), the gradient ``g_t`` of
    :func:`pca_loss` at the projector ``Q_t`` in use is taken from this step's
    ``x``, and the *next* projector is ``Q_{t+1} = AdamW(Q_t, g_t)`` (torch AdamW:
    ``lr``, betas ``(b1, b2)``, ``eps``, decoupled ``weight_decay``), so the
    projection of ``x`` at step ``t`` uses ``Q_t`` as in the reference, which steps
    the projector's optimizer after the back-projection. ``Q`` is not
    re-orthonormalised. The state holds ``Q``, the pending gradient and the AdamW
    moments: four ``(d, r)`` matrices.

    Reference: Liang et al. 2024, kyleliang919/Online-Subspace-Descent
    ``galore_torch/galore_projector.py`` (``proj_type="continuous"``: AdamW with
    lr ``1 / update_proj_gap``, torch's default weight decay 0.01).

    >>> import jax, jax.numpy as jnp
    >>> p = OnlinePCAProjector()
    >>> s = p.compute(None, jnp.eye(4)[:, :3] * jnp.arange(1.0, 4.0), 2, p.init(3, 2, jnp.float32), 0)
    >>> p.basis(s, 3, jnp.float32).shape, int(s.steps)
    ((3, 2), 1)
    """

    lr: float = 1.0 / 200
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    name: str = "online_pca"

    def init(self, d, rank, dtype):
        z = jnp.zeros((d, rank), jnp.float32)
        return OnlinePCAState(jnp.zeros((d, rank), dtype), z, z, z, jnp.zeros([], jnp.int32))

    def compute(self, key, x, rank, previous, count):
        del key, count
        x32 = x.astype(jnp.float32)
        dtype = previous.basis.dtype

        def first():
            _, v = _right_singular(x32)
            return previous._replace(basis=v[:, :rank].astype(dtype))

        def later():
            q = previous.basis.astype(jnp.float32)
            t = previous.steps - 1                      # AdamW steps after this one
            g = previous.grad
            mu = self.b1 * previous.mu + (1 - self.b1) * g
            nu = self.b2 * previous.nu + (1 - self.b2) * g * g
            tf = t.astype(jnp.float32)
            step = (mu / (1 - self.b1 ** tf)) / (jnp.sqrt(nu / (1 - self.b2 ** tf)) + self.eps)
            stepped = q * (1 - self.lr * self.weight_decay) - self.lr * step
            apply = previous.steps >= 2                 # a pending gradient exists
            q = jnp.where(apply, stepped, q)
            return previous._replace(basis=q.astype(dtype), mu=jnp.where(apply, mu, previous.mu),
                                     nu=jnp.where(apply, nu, previous.nu))

        new = jax.lax.cond(previous.steps == 0, first, later)
        grad = jax.grad(pca_loss)(new.basis.astype(jnp.float32), x32)
        return new._replace(grad=grad, steps=previous.steps + 1)

    def basis(self, state, d, dtype):
        del d
        return state.basis.astype(dtype)

    def nbytes(self, d, rank, dtype):
        return d * rank * (np.dtype(dtype).itemsize + 3 * 4) + 4


PROJECTORS: dict[str, Any] = {
    "svd": SVDProjector(),
    "sara": SARAProjector(),
    "random": RandomProjector(orthogonal=True),
    "gaussian": RandomProjector(orthogonal=False, name="gaussian"),
    "dct": DCTProjector(),
    "rsvd": RSVDProjector(),
    "columns": ColumnsProjector(),
    "online_pca": OnlinePCAProjector(),
}


def get_projector(projector: str | Any) -> Any:
    """Return a projector by name (``svd``, ``sara``, ``random``, ``gaussian``, ``dct``,
    ``rsvd``, ``columns``, ``online_pca``).

    An object that already implements the projector methods is returned as is.
    """
    if isinstance(projector, str):
        if projector not in PROJECTORS:
            raise ValueError(
                f"projector={projector!r} is not known; use one of {sorted(PROJECTORS)} "
                "or pass an object with init/compute/basis/nbytes methods."
            )
        return PROJECTORS[projector]
    for method in ("init", "compute", "basis", "nbytes"):
        if not callable(getattr(projector, method, None)):
            raise TypeError(
                f"projector={projector!r} has no {method}() method; a projector needs "
                "init, compute, basis and nbytes (see lowrank_jax.projectors)."
            )
    return projector
