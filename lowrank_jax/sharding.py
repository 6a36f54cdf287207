"""Partition specs for parameters and for the state of any of our optimizers.

A device mesh has up to three named axes (``jax.sharding.Mesh``)::

    data    pure data parallelism: batches split, everything else replicated
    fsdp    batches split AND parameters / optimizer state split (ZeRO-3 style)
    tensor  tensor parallelism: attention heads, MLP hidden units, vocabulary

Parameters carry logical axis names (``("embed", "heads")`` for a query kernel,
see :mod:`lowrank_jax.models.llama`); a rule table (plain data, :data:`DEFAULT_RULES`)
maps each logical name to mesh axes. A dimension whose size is not divisible by
the product of its mesh axes' sizes is replicated instead, and one mesh axis is
used at most once per array.

Optimizer state: :func:`optimizer_state_specs` evaluates ``tx.init`` abstractly
and gives every state leaf a spec derived from its OWN shape and the parameter
it belongs to (found by its tree path, which contains the parameter's path):

* a leaf shaped like its parameter (Adam moments, ``MultiSteps`` accumulators)
  takes the parameter's spec;
* any other array of rank >= 2 (a projector ``(d, r)``, a projected moment
  ``(m, r)`` or ``(r, n)``) takes, per axis, the mesh axes of the parameter axis
  of the same length (the same position first), so a projector ``(m, r)`` is
  split along ``m`` where the weight is and its ``r`` axis is replicated; the
  weight's remaining mesh axes (those of its reduced axis) are added to the
  largest matched axis where they divide it, so the low-rank state is split over
  as many devices as the weight (with pure FSDP a moment ``(r, n)`` of a weight
  split on ``m`` is split on ``n``);
* a leaf of rank >= 2 that matches no sharded axis (8-bit blocks ``(blocks, 256)``,
  a moment ``(r, n)`` whose ``n`` axis is replicated in the weight) is split on
  its largest axis over the weight's mesh axes where they divide it;
* an array of at least :data:`UNOWNED_MIN_SIZE` entries that belongs to no single
  parameter (moments stacked over several matrices) is split over ``fsdp`` on its
  largest divisible axis;
* scalars, PRNG keys, index vectors (DCT/columns projectors), per-leaf flags and
  norms, and small arrays that belong to no parameter are replicated.

Works for every alias of :data:`lowrank_jax.OPTIMIZERS`, chains, ``optax.MultiSteps``
and ``optax.inject_hyperparams`` because it only reads the state's tree paths
and shapes.

>>> import jax, optax
>>> from jax.sharding import PartitionSpec as P
>>> mesh = {"data": 2, "fsdp": 4, "tensor": 2}
>>> params = {"w": jax.ShapeDtypeStruct((64, 128), "float32")}   # kernel (in, out)
>>> specs = {"w": P("fsdp", "tensor")}
>>> from lowrank_jax.transform import scale_by_lowrank
>>> from lowrank_jax.inner import scale_by_reference_adam
>>> tx = scale_by_lowrank(scale_by_reference_adam(), rank=8)   # reduces in (axis 0)
>>> st = optimizer_state_specs(tx, params, specs, mesh)
>>> st.projector["w"], st.inner_state.mu["w"]   # basis (64, 8), moment (8, 128)
(P(('fsdp', 'tensor'), None), P(None, ('tensor', 'fsdp')))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lowrank_jax.tree_util import path_string

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "batch_spec",
    "logical_to_spec",
    "make_mesh",
    "mesh_sizes",
    "named_shardings",
    "optimizer_state_specs",
    "param_specs",
    "per_device_nbytes",
    "resolve_mesh_shape",
]

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

#: logical axis name -> mesh axes. FSDP splits the model width ``embed``; tensor
#: parallelism splits heads, MLP hidden units and the vocabulary; batches are split
#: over ``data`` and ``fsdp`` together.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)

MeshLike = jax.sharding.Mesh | Mapping[str, int]


def mesh_sizes(mesh: MeshLike) -> dict[str, int]:
    """``{axis name: size}`` of a ``Mesh`` or of a plain mapping."""
    if isinstance(mesh, jax.sharding.Mesh):
        return dict(mesh.shape)
    return {str(k): int(v) for k, v in mesh.items()}


def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fill the one ``-1`` entry of ``shape`` with the devices left over.

    >>> resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8)
    {'data': 4, 'fsdp': 2, 'tensor': 1}
    """
    unknown = [k for k in shape if k not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; use the axes {list(MESH_AXES)}.")
    sizes = {k: int(shape.get(k, 1)) for k in MESH_AXES}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh: sizes must be positive with at most one -1, got {dict(shape)}.")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh: {n_devices} devices are not divisible by the fixed axes "
                             f"{ {k: v for k, v in sizes.items() if v != -1} }.")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(f"mesh {sizes} needs {fixed} devices but {n_devices} are used; set one "
                         "axis to -1 (e.g. mesh.data=-1) to take the rest.")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[Any] | None = None
              ) -> jax.sharding.Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh of ``shape`` (one size may be ``-1``).

    Args:
      shape: ``{"data": d, "fsdp": f, "tensor": t}``; missing axes have size 1.
      devices: the devices to use (default all of ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"mesh {sizes} needs {n} devices but only {len(devices)} are visible.")
    dims = tuple(sizes[k] for k in MESH_AXES)
    # Auto axes: the model relies on jit's sharding propagation.
    return jax.make_mesh(dims, MESH_AXES, devices=devices[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: MeshLike,
                    rules: Rules = DEFAULT_RULES) -> P:
    """``PartitionSpec`` of one array with logical axis names ``logical``.

    A mesh axis of size 1, absent from the mesh or already used is dropped; a
    dimension not divisible by the product of its mesh axes is replicated.

    >>> logical_to_spec(("embed", "mlp"), (64, 176), {"data": 1, "fsdp": 4, "tensor": 2})
    P('fsdp', 'tensor')
    >>> logical_to_spec(("embed",), (6,), {"fsdp": 4})
    P(None,)
    """
    sizes = mesh_sizes(mesh)
    table = dict(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name, dim in zip(logical, shape):
        axes = [a for a in _as_tuple(table.get(name)) if sizes.get(a, 1) > 1 and a not in used]
        if axes and dim % math.prod(sizes[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes[0] if len(axes) == 1 else tuple(axes))
        else:
            out.append(None)
    return P(*out)


def batch_spec(mesh: MeshLike, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> P:
    """Spec of a ``(B, ...)`` batch array: axis 0 over the ``batch`` rule's mesh axes."""
    sizes = mesh_sizes(mesh)
    axes = tuple(a for a in _as_tuple(dict(rules).get("batch")) if sizes.get(a, 1) > 1)
    first: MeshAxes = None if not axes else axes[0] if len(axes) == 1 else axes
    return P(first, *([None] * (ndim - 1)))


def _is_variable(x: Any) -> bool:
    # an nnx.Variable (Param) holds its logical axes in ``out_sharding`` metadata
    return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def param_specs(params: Any, mesh: MeshLike, rules: Rules = DEFAULT_RULES,
                logical_axes: Any = None) -> Any:
    """``PartitionSpec`` tree shaped like ``params``.

    Args:
      params: a pytree of arrays or ``ShapeDtypeStruct`` (e.g. ``nnx.split(model,
        nnx.Param)[1]``); ``nnx.Param`` leaves carry their logical axes.
      mesh: a ``Mesh`` or ``{axis: size}``.
      rules: logical axis -> mesh axes.
      logical_axes: optional tree like ``params`` of tuples of logical names
        (overrides the ``nnx.Param`` metadata); leaves without names are replicated.
    """
    if logical_axes is not None:
        flat_axes = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, tuple))
        leaves, treedef = jax.tree.flatten(params)
        if len(flat_axes) != len(leaves):
            raise ValueError(f"logical_axes has {len(flat_axes)} entries for {len(leaves)} "
                             "parameters; give one tuple per parameter array.")
        return treedef.unflatten([logical_to_spec(ax, x.shape, mesh, rules)
                                  for ax, x in zip(flat_axes, leaves)])

    def spec_of_var(var: Any) -> Any:
        axes = var.get_metadata().get("out_sharding") or ()
        value = var.get_value()
        return var.replace(logical_to_spec(tuple(axes), value.shape, mesh, rules)
                           if len(axes) == value.ndim else P())

    return jax.tree.map(lambda x: spec_of_var(x) if _is_variable(x) else P(), params,
                        is_leaf=_is_variable)


def _spec_axes(spec: P, ndim: int) -> list[MeshAxes]:
    axes = list(spec)
    return axes + [None] * (ndim - len(axes))


def _derived_spec(shape: tuple[int, ...], pshape: tuple[int, ...], pspec: P,
                  sizes: Mapping[str, int]) -> P:
    """Spec of a state leaf of ``shape`` that belongs to a parameter ``pshape``/``pspec``.

    Axes of the leaf with the length of a sharded parameter axis take that axis's
    mesh axes (same position first). The parameter's other mesh axes (those of a
    reduced axis, now of length ``r``) move onto the largest matched axis where
    they divide it, so a projected moment ``(r, n)`` of an FSDP-sharded weight is
    split as finely as the weight. A leaf of rank >= 2 that matches no axis (a
    quantised ``(blocks, block_size)`` moment, a ``(r, r)`` core) is split on its
    largest axis over all the parameter's mesh axes where they divide it.
    """
    if tuple(shape) == tuple(pshape):
        return pspec
    if len(shape) < 2:
        return P()
    paxes = _spec_axes(pspec, len(pshape))
    all_axes = [a for ax in paxes for a in _as_tuple(ax)]
    used: set[int] = set()
    out: list[tuple[str, ...]] = []
    for k, dim in enumerate(shape):
        cands = [j for j, pd in enumerate(pshape)
                 if pd == dim and paxes[j] is not None and j not in used]
        if not cands:
            out.append(())
            continue
        j = k if k in cands else cands[0]
        used.add(j)
        out.append(_as_tuple(paxes[j]))
    free = [a for a in all_axes if not any(a in o for o in out)]
    matched = [k for k, o in enumerate(out) if o]
    target = max(matched or range(len(shape)), key=lambda k: shape[k])
    for a in free:
        grown = out[target] + (a,)
        if shape[target] % math.prod(sizes.get(b, 1) for b in grown) == 0:
            out[target] = grown
    return P(*[None if not o else o[0] if len(o) == 1 else o for o in out])


def optimizer_state_specs(tx: optax.GradientTransformation, params: Any, specs: Any,
                          mesh: MeshLike) -> Any:
    """``PartitionSpec`` tree shaped like ``tx.init(params)``.

    Args:
      tx: any optax transformation (ours, chains, ``MultiSteps``, ``inject_hyperparams``).
      params: arrays or ``ShapeDtypeStruct`` (only shapes are used; ``tx.init`` is
        evaluated with :func:`jax.eval_shape`).
      specs: ``PartitionSpec`` tree like ``params`` (e.g. from :func:`param_specs`).
      mesh: a ``Mesh`` or ``{axis: size}``; every dimension is checked for
        divisibility and replicated where its mesh axes do not divide it.

    Returns:
      The state's spec tree (same structure as the state; ``optax.MaskedNode``
      and other empty nodes stay as they are).
    """
    state = jax.eval_shape(tx.init, params)
    is_spec = lambda x: isinstance(x, P)
    p_flat, _ = jax.tree_util.tree_flatten_with_path(params)
    s_flat = jax.tree.leaves(specs, is_leaf=is_spec)
    if len(p_flat) != len(s_flat):
        raise ValueError(f"specs has {len(s_flat)} leaves for {len(p_flat)} parameters; pass the "
                         "tree returned by param_specs(params, mesh).")
    by_path = {tuple(path_string((k,)) for k in path): (tuple(x.shape), s)
               for (path, x), s in zip(p_flat, s_flat)}
    max_len = max((len(k) for k in by_path), default=0)
    sizes = mesh_sizes(mesh)

    def owner(path: tuple[str, ...]) -> tuple[tuple[int, ...], P] | None:
        # the longest contiguous run of the state path that is a parameter path
        for length in range(min(max_len, len(path)), 0, -1):
            for start in range(len(path) - length, -1, -1):
                hit = by_path.get(path[start:start + length])
                if hit is not None:
                    return hit
        return None

    def leaf_spec(path: Any, leaf: Any) -> P:
        shape = tuple(getattr(leaf, "shape", ()))
        found = owner(tuple(path_string((k,)) for k in path))
        if not shape:
            return P()
        if found is None:
            return _unowned_spec(shape, sizes)
        return _fit(_derived_spec(shape, *found, sizes), shape, sizes)

    return jax.tree_util.tree_map_with_path(leaf_spec, state)


#: a state array that belongs to no single parameter (e.g. moments stacked over
#: several matrices) is split over ``fsdp`` when it has at least this many entries.
UNOWNED_MIN_SIZE = 1 << 14


def _unowned_spec(shape: tuple[int, ...], sizes: Mapping[str, int]) -> P:
    """Split the largest ``fsdp``-divisible axis of a big unowned array over ``fsdp``."""
    n = sizes.get("fsdp", 1)
    if n == 1 or math.prod(shape) < UNOWNED_MIN_SIZE:
        return P()
    axes = [k for k in range(len(shape)) if shape[k] % n == 0]
    if not axes:
        return P()
    k = max(axes, key=lambda i: shape[i])
    return P(*[("fsdp" if i == k else None) for i in range(len(shape))])


def _fit(spec: P, shape: tuple[int, ...], sizes: Mapping[str, int]) -> P:
    """Replicate the dimensions of ``spec`` that their mesh axes do not divide."""
    out = []
    for dim, axes in zip(shape, _spec_axes(spec, len(shape))):
        n = math.prod(sizes.get(a, 1) for a in _as_tuple(axes))
        out.append(axes if dim % n == 0 else None)
    return P(*out) if any(a is not None for a in out) else P()


def named_shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
    """``NamedSharding(mesh, spec)`` for every ``PartitionSpec`` of ``specs``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def per_device_nbytes(tree: Any, specs: Any, mesh: MeshLike,
                      itemsize: Callable[[Any], int] | None = None) -> int:
    """Bytes of ``tree`` (arrays or ``ShapeDtypeStruct``) held by ONE device under ``specs``.

    A dimension split over mesh axes of total size ``n`` holds ``ceil(dim / n)``
    entries per device; replicated dimensions are held whole.
    """
    sizes = mesh_sizes(mesh)
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"specs has {len(spec_leaves)} leaves for {len(leaves)} arrays.")
    total = 0
    for x, spec in zip(leaves, spec_leaves):
        dtype = x.dtype
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            size = 8
        else:
            size = itemsize(dtype) if itemsize else np.dtype(dtype).itemsize
        local = [-(-d // math.prod(sizes.get(a, 1) for a in _as_tuple(ax)))
                 for d, ax in zip(x.shape, _spec_axes(spec, len(x.shape)))]
        total += int(np.prod(local, dtype=np.int64)) * size
    return total
