"""Residual rules: how a projected step becomes the full-size update of one matrix.

After :func:`lowrank_jax.scale_by_lowrank` has projected a gradient ``G`` to
``R = P(G)`` and run the inner optimizer on it (``N = inner(R)``), a *residual
rule* turns ``(G, R, N)`` into the update of the full matrix. The rule owns its
settings (the ``scale`` factor, Fira's ``gamma``, APOLLO's scaling mode...) and
a small per-leaf state. A rule is a frozen dataclass with two pure methods::

    init() -> state                                   # per leaf, e.g. a limiter norm
    apply(x: ResidualInputs, state) -> (update, state)

``x.back(n)`` maps a small matrix back to full size (no scale factor; the
projection step materialises the basis once and shares it), so a rule that
does not back-project (APOLLO) costs no back-projection. ``one_sided`` says
whether the rule needs the rank axis of the small matrices (Fira, APOLLO: their
norms run along it), which excludes ``proj_type="full"``.

Rules here: :class:`BackProjection` (GaLore: ``scale * Back(N)``, the
complement of the subspace gets nothing), :class:`FiraResidual` (Fira),
:class:`ApolloScaling` (APOLLO), :class:`StateFreeResidual` (FRUGAL signSGD /
SGD). A new method's rule is one more such class.

References: GaLore (jiaweizzhao/GaLore ``galore_torch/adamw.py``), Fira
(xichen-fy/Fira ``optimizer_torch/fira_adamw.py``), APOLLO
(zhuhanqing/APOLLO ``apollo_torch/apollo.py``), FRUGAL (fzmushko/FRUGAL
``frugal/proj_optimizer_templates.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "RESIDUALS",
    "ApolloScaling",
    "BackProjection",
    "FiraResidual",
    "LimiterState",
    "ResidualInputs",
    "ResidualRule",
    "StateFreeResidual",
    "get_residual",
]


class ResidualInputs(NamedTuple):
    """What a residual rule sees for one matrix (stored orientation).

    Attributes:
      grad: the full gradient ``G``, shape ``(a, b)``.
      small: the projected gradient ``R`` (the small shape).
      inner: the inner optimizer's output ``N`` on ``R`` (the small shape).
      back: ``small matrix -> (a, b)``, the back-projection without scale factor.
      rank_axis: the axis of the small matrices whose length is the rank (``None``
        for a two-sided projection).
    """

    grad: jax.Array
    small: jax.Array
    inner: jax.Array
    back: Callable[[jax.Array], jax.Array]
    rank_axis: int | None


class ResidualRule(Protocol):
    """What a residual rule provides (see the module docstring)."""

    name: str
    one_sided: bool

    def init(self) -> Any: ...

    def apply(self, x: ResidualInputs, state: Any) -> tuple[jax.Array, Any]: ...


class LimiterState(NamedTuple):
    """Per-leaf state of Fira's norm-growth limiter (also used by APOLLO)."""

    prev_norm: jax.Array  # float32 scalar: the limited norm of the last step
    has_prev: jax.Array   # bool scalar


def _limiter_init() -> LimiterState:
    return LimiterState(jnp.zeros([], jnp.float32), jnp.asarray(False))


def _limit(u: jax.Array, state: LimiterState, gamma: float, tiny: float = 1e-8
           ) -> tuple[jax.Array, LimiterState]:
    """Fira's norm-growth limiter: ``u / l`` with ``l = max(||u|| / (prev + tiny), gamma) / gamma``.

    The first call keeps ``u`` and stores ``||u||``; later calls store ``||u|| / l``.
    """
    norm = jnp.linalg.norm(u)
    limiter = jnp.where(state.has_prev,
                        jnp.maximum(norm / (state.prev_norm + tiny), gamma) / gamma, 1.0)
    return u / limiter, LimiterState((norm / limiter).astype(jnp.float32), jnp.asarray(True))


def _ratio(n: jax.Array, r: jax.Array, axis: int | None, tiny: float = 1e-8) -> jax.Array:
    """``||N|| / (||R|| + tiny)`` along ``axis`` (keepdims) or over the whole matrix."""
    n32, r32 = n.astype(jnp.float32), r.astype(jnp.float32)
    if axis is None:
        return jnp.linalg.norm(n32) / (jnp.linalg.norm(r32) + tiny)
    return (jnp.linalg.norm(n32, axis=axis, keepdims=True)
            / (jnp.linalg.norm(r32, axis=axis, keepdims=True) + tiny))


def _check_number(name: str, value: Any, *, positive: bool = False) -> None:
    """Reject a non-finite (or, with ``positive``, non-positive) Python number by name.

    Arrays pass unchecked: ``optax.inject_hyperparams`` hands numeric settings over
    as (traced) arrays.
    """
    if isinstance(value, jax.Array) or hasattr(value, "aval") or hasattr(value, "__array__"):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class BackProjection:
    """GaLore: the update is ``scale * Back(N)``; the complement of the subspace gets nothing.

    >>> import jax.numpy as jnp
    >>> rule = BackProjection(scale=0.5)
    >>> x = ResidualInputs(jnp.ones((2, 3)), jnp.ones((2, 1)), jnp.ones((2, 1)),
    ...                    lambda s: jnp.tile(s, (1, 3)), 1)
    >>> rule.apply(x, rule.init())[0].tolist()
    [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """

    scale: float = 0.25
    name: str = "none"
    one_sided: bool = False

    def __post_init__(self):
        _check_number("scale", self.scale)

    def init(self) -> Any:
        return ()

    def apply(self, x: ResidualInputs, state: Any) -> tuple[jax.Array, Any]:
        return self.scale * x.back(x.inner.astype(x.grad.dtype)), state


@dataclasses.dataclass(frozen=True)
class FiraResidual:
    """Fira: ``scale * Back(N) + S`` with the scaled residual ``S`` and the norm-growth limiter.

    ``phi = ||N||_k / (||R||_k + 1e-8)`` along the rank axis (one factor per row of a
    right projector's ``(m, r)`` matrices, per column of a left one's), ``S = (G -
    scale * Back(R)) * phi`` (``scale`` inside, as the reference), then
    ``S /= l`` with ``l = max(||S|| / (prev + 1e-8), gamma) / gamma`` once a previous
    norm exists (xichen-fy/Fira ``optimizer_torch/fira_adamw.py``).
    """

    scale: float = 0.25
    gamma: float = 1.01
    name: str = "fira"
    one_sided: bool = True

    def __post_init__(self):
        _check_number("scale", self.scale)
        _check_number("gamma", self.gamma, positive=True)

    def init(self) -> LimiterState:
        return _limiter_init()

    def apply(self, x: ResidualInputs, state: LimiterState) -> tuple[jax.Array, LimiterState]:
        g32 = x.grad.astype(jnp.float32)
        s_in = self.scale * x.back(x.small.astype(jnp.float32))
        residual = (g32 - s_in) * _ratio(x.inner, x.small, x.rank_axis)
        residual, state = _limit(residual, state, self.gamma)
        out = self.scale * x.back(x.inner.astype(x.grad.dtype))
        return (out + residual).astype(x.grad.dtype), state


APOLLO_SCALINGS = ("channel", "tensor")


@dataclasses.dataclass(frozen=True)
class ApolloScaling:
    """APOLLO: no back-projection; the update is the raw gradient times ``||N|| / ||R||``.

    ``s = ||N||_k / (||R||_k + 1e-8)`` along the rank axis (``scaling="channel"``) or
    over the whole matrix (``"tensor"``); ``U = G * s``; ``sqrt(scale)`` multiplies
    ``U`` before the norm-growth limiter (``scale_front``) or after it; ``limiter=False``
    is the reference's ``disable_nl`` (zhuhanqing/APOLLO ``apollo_torch/apollo.py``).
    """

    scale: float = 1.0
    scaling: str = "channel"
    scale_front: bool = False
    gamma: float = 1.01
    limiter: bool = True
    name: str = "apollo"
    one_sided: bool = True

    def __post_init__(self):
        _check_number("scale", self.scale)
        _check_number("gamma", self.gamma, positive=True)
        if self.scaling not in APOLLO_SCALINGS:
            raise ValueError(f"scaling={self.scaling!r} is not supported; use one of "
                             f"{list(APOLLO_SCALINGS)}.")

    def init(self) -> LimiterState:
        return _limiter_init()

    def apply(self, x: ResidualInputs, state: LimiterState) -> tuple[jax.Array, LimiterState]:
        axis = x.rank_axis if self.scaling == "channel" else None
        u = x.grad.astype(jnp.float32) * _ratio(x.inner, x.small, axis)
        root = jnp.sqrt(jnp.asarray(self.scale, jnp.float32))
        if self.scale_front:
            u = u * root
        if self.limiter:
            u, state = _limit(u, state, self.gamma)
        if not self.scale_front:
            u = u * root
        return u.astype(x.grad.dtype), state


STATE_FREE_RULES = ("signsgd", "sgd")


@dataclasses.dataclass(frozen=True)
class StateFreeResidual:
    """FRUGAL: ``scale * Back(N)`` plus a state-free step on the complement ``G - Back(R)``.

    ``rule="signsgd"`` adds ``free_scale * sign(G - Back(R))``, ``"sgd"`` adds
    ``free_scale * (G - Back(R))`` (fzmushko/FRUGAL ``proj_optimizer_templates.py``,
    ``inactive_update_rule`` and ``inactive_lr_scale``).
    """

    rule: str = "signsgd"
    scale: float = 1.0
    free_scale: float = 1.0
    name: str = "state_free"
    one_sided: bool = False

    def __post_init__(self):
        _check_number("scale", self.scale)
        _check_number("free_scale", self.free_scale)
        if self.rule not in STATE_FREE_RULES:
            raise ValueError(f"rule={self.rule!r} is not supported; use one of "
                             f"{list(STATE_FREE_RULES)}.")

    def init(self) -> Any:
        return ()

    def apply(self, x: ResidualInputs, state: Any) -> tuple[jax.Array, Any]:
        free = x.grad - x.back(x.small)
        free = jnp.sign(free) if self.rule == "signsgd" else free
        out = self.scale * x.back(x.inner.astype(x.grad.dtype)) + self.free_scale * free
        return out.astype(x.grad.dtype), state


RESIDUALS: dict[str | None, Callable[..., Any]] = {
    None: BackProjection,
    "fira": FiraResidual,
    "apollo": ApolloScaling,
    "signsgd": lambda scale=1.0: StateFreeResidual("signsgd", scale),
    "sgd": lambda scale=1.0: StateFreeResidual("sgd", scale),
}


def get_residual(residual: str | None | Any, scale: float | None = None) -> Any:
    """A residual rule from a name (``None``, ``"fira"``, ``"apollo"``, ``"signsgd"``, ``"sgd"``)
    built with ``scale`` (default 0.25 for ``None``/``"fira"``, 1.0 otherwise), or a rule object
    as is (then ``scale`` must be ``None``: the rule owns it).

    >>> get_residual("fira", 0.5)
    FiraResidual(scale=0.5, gamma=1.01, name='fira', one_sided=True)
    """
    if residual is None or isinstance(residual, str):
        if residual not in RESIDUALS:
            names = [k for k in RESIDUALS if k is not None]
            raise ValueError(f"residual={residual!r} is not known; use None, one of {names} "
                             "or a rule object (lowrank_jax.residuals).")
        make = RESIDUALS[residual]
        return make() if scale is None else make(scale=scale)
    for method in ("init", "apply"):
        if not callable(getattr(residual, method, None)):
            raise TypeError(f"residual={residual!r} has no {method}() method; a residual rule "
                            "needs init and apply (see lowrank_jax.residuals).")
    if scale is not None:
        raise ValueError("scale= cannot be combined with a residual rule object; set the "
                         "rule's own scale (e.g. FiraResidual(scale=0.25)).")
    return residual
