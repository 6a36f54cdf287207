"""``--mesh data=D,fsdp=F,tensor=T``: the argument read strictly, and what the sizes do not split.

:func:`parse_mesh_arg` accepts each axis of ``("data", "fsdp", "tensor")`` at most
once, as ``AXIS=SIZE`` with ``SIZE >= 1``, and refuses an empty argument (each
problem is one line naming ``--mesh``).

:func:`mesh_fit_warnings` is the policy of ``lowrank-memory`` for sizes that do
not divide the model: ``lowrank-train`` keeps a parameter dimension whole on
every device when the mesh axes its logical axis maps to do not divide it
(:func:`lowrank_jax.sharding.logical_to_spec`), so the per-device figures that
``lowrank-memory`` prints for such a mesh are right, but they can be as large as
the replicated ones. Each such mesh axis gets one warning line naming how many
parameter arrays it leaves whole, one example, and the sizes that would divide
them all.

>>> parse_mesh_arg("fsdp=8,tensor=2")
{'data': 1, 'fsdp': 8, 'tensor': 2}
>>> parse_mesh_arg("fsdp=2,fsdp=4")
Traceback (most recent call last):
...
train.user_errors.UserInputError: --mesh gives fsdp twice (fsdp=2, fsdp=4); give each axis once
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from train.user_errors import UserInputError

__all__ = ["MESH_AXES", "mesh_fit_warnings", "parse_mesh_arg", "undivided_dimensions"]

#: the mesh axes, as :data:`lowrank_jax.sharding.MESH_AXES` names them
MESH_AXES = ("data", "fsdp", "tensor")
_EXAMPLE = "write AXIS=SIZE[,AXIS=SIZE...] with AXIS one of data, fsdp, tensor, e.g. fsdp=64 " \
           "or data=2,fsdp=32"


def parse_mesh_arg(text: str, option: str = "--mesh") -> dict[str, int]:
    """``"fsdp=64"`` or ``"data=2,fsdp=4,tensor=8"`` -> ``{"data", "fsdp", "tensor"}`` sizes.

    Missing axes have size 1.

    Raises:
      UserInputError: an empty argument or entry, an unknown axis, a size that is
        not an integer >= 1, an axis given twice.
    """
    if not text.strip():
        raise UserInputError(f"{option} is empty; {_EXAMPLE}")
    sizes = dict.fromkeys(MESH_AXES, 1)
    given: dict[str, str] = {}
    for raw in text.split(","):
        part = raw.strip()
        name, sep, value = (s.strip() for s in part.partition("="))
        if not part:
            raise UserInputError(f"{option} {text!r} has an empty entry; {_EXAMPLE}")
        if not sep or name not in sizes:
            raise UserInputError(f"{option}: bad entry {part!r}; {_EXAMPLE}")
        if not value.isdigit() or int(value) < 1:
            raise UserInputError(f"{option}: the size in {part!r} must be an integer >= 1")
        if name in given:
            raise UserInputError(f"{option} gives {name} twice ({name}={given[name]}, {part}); "
                                 "give each axis once")
        given[name] = value
        sizes[name] = int(value)
    return sizes


def _is_variable(x: Any) -> bool:
    return hasattr(x, "get_metadata") and hasattr(x, "get_value")


def undivided_dimensions(model: str, mesh: Mapping[str, int],
                         rules: Any = None, **model_overrides: Any
                         ) -> dict[str, list[tuple[str, str, tuple[int, ...], int]]]:
    """Per mesh axis: the parameter dimensions it should split but does not divide.

    Args:
      model: a preset of :data:`lowrank_jax.models.PRESETS`.
      mesh: ``{axis: size}``.
      rules: logical-axis rules (default :data:`lowrank_jax.sharding.DEFAULT_RULES`).
      **model_overrides: preset overrides (``linear``, ``linear_rank``, ...).

    Returns:
      ``{mesh axis: [(parameter path, logical axis, shape, dimension size)]}`` for
      every dimension whose logical axis maps to that mesh axis (size > 1) when the
      product of the mapped axes' sizes does not divide it; empty when all divide.
    """
    import jax
    from flax import nnx

    from lowrank_jax.models import Llama, get_preset
    from lowrank_jax.sharding import DEFAULT_RULES
    from lowrank_jax.tree_util import path_string

    table = dict(DEFAULT_RULES if rules is None else rules)
    cfg = get_preset(model, **model_overrides)
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    _, params, frozen = nnx.split(abstract, nnx.Param, ...)
    out: dict[str, list[tuple[str, str, tuple[int, ...], int]]] = {}
    leaves = jax.tree_util.tree_flatten_with_path((params, frozen), is_leaf=_is_variable)[0]
    for path, var in leaves:
        if not _is_variable(var):
            continue
        shape = tuple(var.get_value().shape)
        logical = tuple(var.get_metadata().get("out_sharding") or ())
        if len(logical) != len(shape):
            continue
        for name, dim in zip(logical, shape):
            axes = table.get(name)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            axes = tuple(a for a in axes if mesh.get(a, 1) > 1)
            if axes and dim % math.prod(mesh[a] for a in axes):
                for a in axes:
                    out.setdefault(a, []).append((path_string(path[1:]), name, shape, dim))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_fit_warnings(model: str, mesh: Mapping[str, int], option: str = "--mesh",
                      **model_overrides: Any) -> list[str]:
    """One warning line per mesh axis whose size leaves parameter dimensions whole.

    >>> mesh_fit_warnings("llama_tiny", {"data": 1, "fsdp": 2, "tensor": 1})
    []
    >>> print(mesh_fit_warnings("llama_tiny", {"data": 1, "fsdp": 3, "tensor": 1})[0])
    ... # doctest: +ELLIPSIS
    --mesh fsdp=3 does not divide the 'embed' dimension (64) of ... parameter arrays (e.g. ...
    """
    lines = []
    for axis, dims in undivided_dimensions(model, mesh, **model_overrides).items():
        names = sorted({name for _, name, _, _ in dims})
        size_set = sorted({dim for _, _, _, dim in dims})
        path, _, shape, _ = dims[0]
        arrays = len({p for p, _, _, _ in dims})
        good = [d for d in _divisors(math.gcd(*size_set)) if d > 1][:8]
        hint = (f"sizes that divide them: {', '.join(map(str, good))}" if good
                else "no size > 1 divides them")
        lines.append(
            f"{option} {axis}={mesh[axis]} does not divide the {'/'.join(map(repr, names))} "
            f"dimension ({', '.join(map(str, size_set))}) of {arrays} parameter arrays (e.g. "
            f"{path} {shape}): lowrank-train keeps it whole on every device, and the "
            f"per-device figures count it so; {hint}")
    return lines
