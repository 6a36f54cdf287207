"""Landscapes along the "top-k PCA" directions: grids and the reference's top-K aggregation.

"Beyond Perplexity" probes the loss along direction ``k`` = the k-th rank-1 SVD
term of every weight matrix (:func:`lowrank_jax.metrics.rank1_svd_directions`),
for ``k = 1..20``, and summarises components ``1..K`` for ``K`` in
:data:`TOPK_SUBSETS` (NamrataRShivagunde/low-rank-geometry,
``loss-landscape/scripts/single_checkpoint_scripts/4b_pca_aggregate_subsets.py``):

* the curves of components ``k <= K`` are stacked; their mean over components is
  the subset's curve and ``np.var`` over components (``ddof=0``) its variance curve
  (l.102-104);
* expected sharpness is read off the mean curve at the centre index
  ``len(curve) // 2`` with ``min(c, n - 1 - c)`` symmetric pairs (l.22-28);
* direction variance is the variance curve averaged over all grid points (l.126).

Grids. The reference's grid, :data:`PCA_ALPHAS_REFERENCE` =
``np.arange(-0.05, 0.0501, 0.004)`` (``bash_scripts/pca_top20_60m.sh``), has 26
points and **no** ``alpha = 0``: its "centre" ``26 // 2 = 13`` is ``alpha = +0.002``,
and its 12 pairs ``(0.002 - 0.004 m, 0.002 + 0.004 m)`` are symmetric about that
point, not about the checkpoint. Expected sharpness on it therefore mixes a
first-order (slope) term into the second-order one. :data:`PCA_ALPHAS_CENTERED`
(25 points, the same 0.004 spacing inside the same range, ``alpha = 0`` at index 12)
measures around the checkpoint itself; use it unless reproducing the reference's
numbers. :func:`reference_center_index` gives the centre either grid is read at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lowrank_jax.metrics.landscape import direction_variance, expected_sharpness

#: The reference's top-k grid: 26 points from -0.05 to 0.05, alpha = 0 is not on it.
PCA_ALPHAS_REFERENCE = np.arange(-0.05, 0.0501, 0.004)
#: A symmetric grid with the centre: -0.048..0.048 step 0.004 (25 points, index 12 is 0).
PCA_ALPHAS_CENTERED = np.linspace(-0.048, 0.048, 25)
#: The components 1..K the reference aggregates (pca_top20_*.sh: K in {5, 10, 20}; top-1 too).
TOPK_SUBSETS = (1, 5, 10, 20)
#: Components evaluated by default (k = 1..20).
DEFAULT_TOPK = 20


def reference_center_index(n_alphas: int) -> int:
    """The centre the reference reads a curve of ``n_alphas`` points at: ``n_alphas // 2``.

    On :data:`PCA_ALPHAS_CENTERED` that is ``alpha = 0``; on :data:`PCA_ALPHAS_REFERENCE`
    it is ``alpha = +0.002`` (index 13 of 26).

    >>> reference_center_index(len(PCA_ALPHAS_REFERENCE)), reference_center_index(25)
    (13, 12)
    """
    return int(n_alphas) // 2


def aggregate_topk(curves: Any, ks: Sequence[int], subsets: Iterable[int] = TOPK_SUBSETS,
                   center_index: int | None = None) -> dict[int, dict[str, Any]]:
    """Mean/variance curves, expected sharpness and direction variance of components ``1..K``.

    Args:
      curves: ``(len(ks), n_alphas)`` losses, row ``i`` along component ``ks[i]``.
      ks: the 1-based component of each row.
      subsets: the ``K`` values; a subset aggregates every row with ``k <= K``.
      center_index: where sharpness is read; ``None`` is the reference's
        :func:`reference_center_index`.

    Returns:
      ``{K: {"components": int, "mean_curve": (n_alphas,) ndarray, "variance_curve":
      (n_alphas,) ndarray, "expected_sharpness": float, "direction_variance": float}}``
      for every ``K`` with at least one component (others are left out, as the
      reference skips them).

    >>> out = aggregate_topk(np.array([[1.0, 0.0, 1.0], [3.0, 0.0, 3.0]]), [1, 2], [1, 2])
    >>> out[2]["expected_sharpness"], round(out[2]["direction_variance"], 6), out[1]["components"]
    (2.0, 0.666667, 1)
    """
    curves = np.asarray(curves, np.float64)
    ks = np.asarray([int(k) for k in ks])
    if curves.ndim != 2 or curves.shape[0] != ks.shape[0]:
        raise ValueError(f"curves must be (len(ks), n_alphas) = ({ks.shape[0]}, n), "
                         f"got {curves.shape}")
    centre = reference_center_index(curves.shape[1]) if center_index is None else center_index
    out: dict[int, dict[str, Any]] = {}
    for top in subsets:
        rows = curves[ks <= int(top)]
        if rows.shape[0] == 0:
            continue
        mean = rows.mean(axis=0)
        out[int(top)] = {
            "components": int(rows.shape[0]),
            "mean_curve": mean,
            "variance_curve": rows.var(axis=0),
            "expected_sharpness": float(expected_sharpness(mean, centre)),
            "direction_variance": float(direction_variance(rows)),
        }
    return out
