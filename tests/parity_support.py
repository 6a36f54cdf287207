"""Shared helpers of the parity tests (``test_parity_galore``, ``_fira``, ``_dct``).

The parameter tree: a tall ``(24, 10)``, a square ``(10, 10)`` and a wide ``(10, 24)``
attention/MLP matrix (torch shapes) that the default label rule projects, plus a 1-D
``norm`` and a 2-D ``embed`` leaf that it leaves unprojected.  Leaves are addressed by
their path tuple; the tests keep "flat" dicts ``{path: torch-layout array}``.

Tolerances (``assert_trajectory``): per step and leaf, the implementation's update
(float32) must match the reference's ``W_t - W_{t-1}`` (float64) within
``UPDATE_RTOL * max|ref update|``; the parameters within
``UPDATE_RTOL * sum_{s<=t} max|ref update_s| + 2 t eps_f32 max|W|`` (the implementation
stores W in float32: about two roundings of W per step).

``tests/`` is not a package: pytest's default (prepend) import mode puts it on
``sys.path``, so the test modules import this one as ``parity_support``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax as lj

try:
    from . import reference_numpy as ref
except ImportError:  # tests/ is not a package
    import reference_numpy as ref

UPDATE_RTOL = 2e-5
#: the largest relative update error ``||u_t - u_ref_t||_F / ||u_ref_t||_F`` of a run
PARITY_RTOL = 1e-5
MIN_ABS_R = 2e-3
PROJECTED = {("attn", "q"): (24, 10), ("attn", "k"): (10, 10), ("mlp", "up"): (10, 24)}
PLAIN = {("norm",): (10,), ("embed",): (7, 5)}
SHAPES = {**PROJECTED, **PLAIN}


def nest(flat: dict) -> dict:
    """``{path: x}`` -> nested dict, e.g. ``{("a", "b"): 1} -> {"a": {"b": 1}}``."""
    out: dict = {}
    for path, x in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = x
    return out


def get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def to_layout(flat: dict, layout: str) -> dict:
    """Torch-layout NumPy leaves -> nested dict of float32 arrays in ``layout``."""
    conv = {}
    for path, x in flat.items():
        x = np.asarray(x, np.float32)
        conv[path] = x.T.copy() if (layout == "flax" and x.ndim == 2) else x
    return nest(conv)


def from_layout(tree, layout: str) -> dict:
    """Nested tree in ``layout`` -> flat dict of torch-layout float64 arrays."""
    out = {}
    for path in SHAPES:
        x = np.asarray(get(tree, path), np.float64)
        out[path] = x.T if (layout == "flax" and x.ndim == 2) else x
    return out


def params_after_each_step(tx, w0: dict, grads: list[dict], layout: str):
    """Run ``tx`` (jitted update) from ``w0`` over ``grads``; yield the params after each step.

    ``w0`` and every ``grads[t]`` are flat ``{path: torch-layout array}``; each yielded
    dict has the same paths, as torch-layout float64 arrays.
    """
    params = to_layout(w0, layout)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for g in grads:
        updates, state = step(to_layout(g, layout), state, params)
        params = optax.apply_updates(params, updates)
        flat = {}
        for path in w0:
            x = np.asarray(get(params, path), np.float64)
            flat[path] = x.T if (layout == "flax" and x.ndim == 2) else x
        yield flat


def updates_of_each_step(tx, w0: dict, grads: list[dict], layout: str) -> list[dict]:
    """Run ``tx`` (jitted) from ``w0`` over ``grads``; the update of each step (torch layout,
    float64), ``{path: array}`` with the paths of ``w0``."""
    params = to_layout(w0, layout)
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g in grads:
        updates, state = step(to_layout(g, layout), state, params)
        params = optax.apply_updates(params, updates)
        flat = {}
        for path in w0:
            x = np.asarray(get(updates, path), np.float64)
            flat[path] = x.T if (layout == "flax" and x.ndim == 2) else x
        out.append(flat)
    return out


def max_update_error(updates: list, ref_params: list, w0) -> float:
    """``max_t ||u_t - (W_t - W_{t-1})||_F / ||W_t - W_{t-1}||_F``: the relative error of the
    implementation's update of each step against the reference's step (float32 against
    float64: a few 1e-7 for a well-conditioned step)."""
    worst, prev = 0.0, np.asarray(w0, np.float64)
    for u, w in zip(updates, ref_params):
        step = w - prev
        worst = max(worst, float(np.linalg.norm(u - step) / np.linalg.norm(step)))
        prev = w
    return worst


def report_error(alias: str, errors: dict, limit: float = PARITY_RTOL) -> float:
    """Print and check the measured error of a parity run.

    ``errors``: ``{leaf: max over steps of ||u_t - u_ref_t||_F / ||u_ref_t||_F}`` (see
    :func:`max_update_error`). Prints ``parity <alias>: max relative update error <e>``
    (``pytest -s`` shows it; the README's alias table quotes these lines) and asserts
    ``e < limit``. Returns ``e``."""
    worst = max(errors.values())
    print(f"\nparity {alias}: max relative update error {worst:.1e} "
          f"(leaves: {', '.join(f'{k}={v:.1e}' for k, v in errors.items())})")
    assert worst < limit, (alias, errors)
    return worst


def make_svd_problem(seed: int, steps: int, rank: int, gap: int,
                     jitter: float | None = None, condition_every_step: bool = False):
    """Random params and gradients for the SVD-projector tests (GaLore, Fira).

    Projected gradients have well-separated singular values; at refresh steps
    (``(t - 1) % gap == 0``) they are redrawn until every entry of R is >= MIN_ABS_R
    (``ref.min_abs_projection``: Adam is ill-conditioned near |R| ~ eps/sqrt(1-b2)).
    With ``jitter``, each projected leaf's singular vectors stay near a fixed random base
    (drawn right after the params), perturbed by ``jitter`` at every step. With
    ``condition_every_step`` the other steps of a period are redrawn too, until their
    projection on the period's basis (the refresh gradient's top-r singular vectors) has
    every entry >= MIN_ABS_R: for ``moments='reset'``, where the first steps after each
    refresh run Adam on freshly reset moments and are as ill-conditioned as the refresh.
    """
    rng = np.random.default_rng(seed)
    params = {p: rng.standard_normal(s).astype(np.float32) for p, s in SHAPES.items()}
    base = ({} if jitter is None else
            {p: ref.well_conditioned_grad(rng, s) for p, s in PROJECTED.items()})
    grads, period_basis = [], {}
    for t in range(1, steps + 1):
        g = {}
        for p, s in SHAPES.items():
            if p in PROJECTED:
                near = {} if jitter is None else {"near": base[p], "jitter": jitter}
                side = ref.std_side(s)
                while True:
                    x = ref.well_conditioned_grad(rng, s, scale=rng.uniform(0.5, 2.0),
                                                  **near)
                    if (t - 1) % gap == 0:
                        if ref.min_abs_projection(x, rank) >= MIN_ABS_R:
                            period_basis[p] = ref.svd_basis(x, side)[0][:, :rank]
                            break
                    elif not condition_every_step or np.abs(
                            ref.project(x, period_basis[p], side)).min() >= MIN_ABS_R:
                        break
                g[p] = x
            else:
                g[p] = rng.standard_normal(s).astype(np.float32)
        grads.append(g)
    return params, grads


def _as_float64(entry) -> np.ndarray:
    return np.asarray(entry, np.float64)


def run_jax(tx, params, grads, layout, *, entry=_as_float64, plain_masked=True):
    """Run ``tx`` for len(grads) steps; per step the params, updates (torch layout,
    float64) and projector entries of the PROJECTED leaves (``entry`` of each; by default
    the float64 array as returned, ``(d, r)`` for an SVD projector).  Asserts that the
    state holds exactly one low-rank state and, with ``plain_masked``, that the PLAIN
    leaves' projector entries are ``optax.MaskedNode``."""
    p = to_layout(params, layout)
    state = tx.init(p)
    update = jax.jit(tx.update)
    traj, upds, projs = [], [], []
    for g in grads:
        u, state = update(to_layout(g, layout), state, p)
        p = optax.apply_updates(p, u)
        traj.append(from_layout(p, layout))
        upds.append(from_layout(u, layout))
        states = lj.state_reader.find_states(state)
        assert len(states) == 1
        projs.append({path: entry(get(states[0].projector, path)) for path in PROJECTED})
        if plain_masked:
            for path in PLAIN:
                assert isinstance(get(states[0].projector, path), optax.MaskedNode)
    return traj, upds, projs


def assert_trajectory(name, w0, ref_params, jax_params, jax_updates, steps) -> float:
    """Per step, the update within ``UPDATE_RTOL`` of the largest reference entry and the
    parameters as the module docstring says; over the run, the relative update error
    (:func:`max_update_error`) below ``PARITY_RTOL``. Returns that error."""
    err = max_update_error(jax_updates[:steps], ref_params[:steps], w0)
    assert err < PARITY_RTOL, f"{name}: relative update error {err:.2e} over {steps} steps"
    prev = np.asarray(w0, np.float64)
    cum = 0.0
    wmax = max(np.abs(prev).max(), max(np.abs(w).max() for w in ref_params[:steps]))
    for t in range(steps):
        d_ref = ref_params[t] - prev
        size = np.abs(d_ref).max()
        cum += size
        np.testing.assert_allclose(
            jax_updates[t], d_ref, rtol=0, atol=UPDATE_RTOL * size,
            err_msg=f"{name}: update at step {t + 1}")
        np.testing.assert_allclose(
            jax_params[t], ref_params[t], rtol=0,
            atol=UPDATE_RTOL * cum + 2 * (t + 1) * np.finfo(np.float32).eps * wmax,
            err_msg=f"{name}: params after step {t + 1}")
        prev = ref_params[t]
    return err


def assert_params_close(name, w0, ref_params, jax_params, rtol: float = PARITY_RTOL):
    """Parameters after each step within ``rtol * sum_{s<=t} ||ref step_s||_max`` plus two
    float32 roundings of W per step (the per-step updates are checked by
    :func:`report_error`)."""
    prev = np.asarray(w0, np.float64)
    cum = 0.0
    wmax = max(np.abs(prev).max(), max(np.abs(w).max() for w in ref_params))
    for t, (w, ours) in enumerate(zip(ref_params, jax_params)):
        cum += np.abs(w - prev).max()
        prev = w
        np.testing.assert_allclose(
            ours, w, rtol=0, atol=rtol * cum + 2 * (t + 1) * np.finfo(np.float32).eps * wmax,
            err_msg=f"{name}: params after step {t + 1}")


def assert_leaf(name, path, params, ref_params, traj, upds, steps):
    """``assert_trajectory`` for leaf ``path`` of the flat per-step dicts ``traj``/``upds``."""
    return assert_trajectory(name, params[path], ref_params, [x[path] for x in traj],
                      [x[path] for x in upds], steps)


def check_plain_leaves(reference, params, grads, traj, upds, steps, **kwargs):
    """Non-projected leaves follow ``reference`` (a ``ref.*adamw_reference``); returns
    ``{path: relative update error}``."""
    errors = {}
    for path in PLAIN:
        r = reference(params[path], [g[path] for g in grads[:steps]], **kwargs)
        errors[path] = assert_leaf(path, path, params, r["params"], traj, upds, steps)
    return errors


def align_to(projs, path):
    """``align`` hook for the SVD references: at refresh step ``t`` adopt the signs of the
    implementation's projector (``ref.align_columns`` asserts agreement up to sign)."""
    return lambda t, q: ref.align_columns(q, projs[t - 1][path])


@dataclasses.dataclass(frozen=True, eq=False)
class FixedProjector:
    """A projector returning ``mats[d][(count + offset) // period]`` at a refresh.

    Random streams cannot be matched across frameworks, so parity tests inject
    the projection matrices (``offset=1`` for Flora, which resamples at 1-based steps
    ``kappa, 2 kappa, ...``, i.e. 0-based counts ``kappa - 1, ...``).
    """

    mats: dict
    period: int
    offset: int = 0
    name: str = "fixed"

    def init(self, d, rank, dtype):
        return jnp.zeros((d, rank), dtype)

    def compute(self, key, x, rank, previous, count):
        stack = jnp.asarray(self.mats[x.shape[-1]], jnp.float32)
        return stack[(count + self.offset) // self.period].astype(previous.dtype)

    def basis(self, state, d, dtype):
        return state.astype(dtype)

    def nbytes(self, d, rank, dtype):
        return d * rank * np.dtype(dtype).itemsize
