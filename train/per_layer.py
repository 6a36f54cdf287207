"""Per-layer optimizer updates: each block is updated inside the backward pass.

GaLore trains LLaMA-7B on a 24 GB device by consuming each layer's gradient as
soon as the backward pass produces it (``torchrun_main.py``, per-layer weight
updates through ``register_post_accumulate_grad_hook``), so the whole gradient
tree never exists.  Here the step is written out by hand::

    forward    x0 = embed(tokens); for each block i: x_{i+1}, vjp_i = vjp(block_i, x_i)
    head       loss, (g_head, dx_n) = vjp(final_norm + lm_head + loss)(x_n)
               head params <- tx update with g_head              (group "head")
    backward   for each block i, last first:
                   g_i, dx_i = vjp_i(dx_{i+1})
                   u_i, s_i  = tx.update(g_i, s_i, p_i)          # this block's state
                   p_i      <- p_i + u_i                          # in place
    embedding  g_embed = vjp(embed)(dx_0); embedding <- tx update  (group "embed")

With ``scan_layers`` the two block loops are ``jax.lax.scan`` (one compiled block):
the parameters and optimizer state are carried through the backward scan and
updated with ``dynamic_update_slice``, and the forward residuals leave out the
block weights (the backward reads them from the carry), so weights are not
held twice.  With unrolled layers the loops are Python loops (one compiled
copy per block, each block's arrays updated in place through donation), and
each block's backward waits (an optimisation barrier) for the previous block's
update, so one block's gradient is alive at a time.  Peak memory is parameters
+ optimizer state + activations + ONE group's gradient and update temporaries.

Optimizer state (:class:`LayerwiseState`): ``tx.init`` of each group (the head,
every block, the embedding).  Any optax transformation whose state is per leaf
works this way (every alias of this library, ``optax.MultiSteps`` for
accumulation); PRNG keys in the block states are folded with the block index so
random projectors draw independent matrices per block.  What differs from the
standard step:

* clipping by global norm acts per group: each block's gradient, the head's and
  the embedding's are clipped by their own norm (GaLore's per-layer mode does
  not clip at all: ``optimizer.grad_clip: 0``); the logged ``grad_norm`` is
  still the global norm before clipping;
* leaves are numbered per group, so random projectors (GoLore, APOLLO, FRUGAL
  columns, Flora) and ``stagger`` see other leaf indices than in the standard
  step (SVD-based methods are unaffected).

:func:`layerwise_to_full` / :func:`full_to_layerwise` convert the state to and
from the standard layout (``tx.init`` of the unrolled parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from lowrank_jax import sharding as sh
from lowrank_jax.models import apply_block, token_loss
from lowrank_jax.models.llama import with_remat
from lowrank_jax.models.stacking import LAYERS

__all__ = ["LayerwiseState", "full_to_layerwise", "join_groups", "join_layers", "layerwise_init",
           "layerwise_overlaps", "layerwise_specs", "layerwise_to_full", "make_per_layer_step", "split_groups",
           "split_layers"]


class LayerwiseState(NamedTuple):
    """Optimizer state of the per-layer step: one ``tx`` state per group of parameters.

    Attributes:
      head: state of the final norm and the output head (updated first).
      layers: state of each block: one block's state with a leading
        ``(num_layers,)`` axis (scanned layers) or ``{i: state_i}`` (unrolled).
      embed: state of the token embedding (updated last).
    """

    head: Any
    layers: Any
    embed: Any


#: the parameter group updated last; every other non-block parameter is in ``head``.
EMBED = "embed"


def split_groups(tree: Any) -> tuple[Any, Any, Any]:
    """``(head, layers, embed)`` parts of a model-state-like mapping (see :class:`LayerwiseState`)."""
    outer, layers = split_layers(tree)
    items = _raw(outer)
    embed = {EMBED: items.pop(EMBED)} if EMBED in items else {}
    wrap = nnx.State if isinstance(tree, nnx.State) else dict
    return wrap(items), layers, wrap(embed)


def join_groups(head: Any, layers: Any, embed: Any) -> Any:
    """Inverse of :func:`split_groups`."""
    items = _raw(head)
    items.update(_raw(embed))
    return join_layers(nnx.State(items) if isinstance(head, nnx.State) else items, layers)


def _raw(tree: Any) -> dict:
    return dict(tree.raw_mapping) if isinstance(tree, nnx.State) else dict(tree)


def split_layers(tree: Any) -> tuple[Any, Any]:
    """``(everything but "layers", tree["layers"])`` of a model-state-like mapping.

    Both keep ``tree``'s container type; the second is ``None`` when there is no
    ``layers`` entry.
    """
    items = _raw(tree)
    layers = items.pop(LAYERS, None)
    if isinstance(tree, nnx.State):
        return nnx.State(items), None if layers is None else nnx.State(layers)
    return items, layers


def join_layers(outer: Any, layers: Any) -> Any:
    """Inverse of :func:`split_layers`."""
    items = _raw(outer)
    if layers is not None:
        items[LAYERS] = _raw(layers)
    return nnx.State(items) if isinstance(outer, nnx.State) else items


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and tuple(x.shape) == (2,)


def _fold_keys(state: Any, index: jax.Array) -> Any:
    """Fold ``index`` into every PRNG key leaf (typed, or raw ``uint32 (2,)`` key data)."""

    def fold(x: Any) -> Any:
        if not _is_key(x):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, index)
        return jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(x), index))

    return jax.tree.map(fold, state)


def _is_unrolled(layers: Any) -> bool:
    return all(isinstance(k, int) or str(k).isdigit() for k in layers)


def layerwise_init(tx: optax.GradientTransformation, params: Any) -> LayerwiseState:
    """:class:`LayerwiseState` of ``params`` (scanned: stacked block states; unrolled: a dict).

    ``layers`` is ``tx.init`` of each block (keys folded with the block index),
    stacked over a leading axis for stacked ``params`` or ``{i: state_i}`` for
    ``layers/<i>`` params.
    """
    head, layers, embed = split_groups(params)
    if _is_unrolled(layers):
        per_block = {k: _fold_keys(tx.init(layers[k]), int(k)) for k in layers}
    else:
        n = jax.tree.leaves(layers)[0].shape[0]

        def one(args: tuple[jax.Array, Any]) -> Any:
            i, block = args
            return _fold_keys(tx.init(block), i)

        per_block = jax.lax.map(one, (jnp.arange(n), layers))
    return LayerwiseState(tx.init(head), per_block, tx.init(embed))


def _block_abstract(layers: Any) -> Any:
    """One block's abstract params / specs from the stacked ones (the layer axis dropped)."""

    def drop(x: Any) -> Any:
        if isinstance(x, P):
            return P(*tuple(x)[1:])
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)

    return jax.tree.map(drop, layers, is_leaf=lambda x: isinstance(x, P))


def layerwise_specs(tx: optax.GradientTransformation, params: Any, param_specs: Any,
                    mesh: sh.MeshLike) -> LayerwiseState:
    """``PartitionSpec`` tree of :func:`layerwise_init`'s state (a stacked layer axis replicated)."""
    head, layers, embed = split_groups(params)
    head_specs, layer_specs, embed_specs = split_groups(param_specs)
    groups = {g: sh.optimizer_state_specs(tx, p, s, mesh)
              for g, p, s in (("head", head, head_specs), ("embed", embed, embed_specs))}
    if _is_unrolled(layers):
        per_block = {k: sh.optimizer_state_specs(tx, layers[k], layer_specs[k], mesh)
                     for k in layers}
    else:
        one = sh.optimizer_state_specs(tx, _block_abstract(layers),
                                       _block_abstract(layer_specs), mesh)
        per_block = jax.tree.map(lambda s: P(None, *tuple(s)), one,
                                 is_leaf=lambda x: isinstance(x, P))
    return LayerwiseState(groups["head"], per_block, groups["embed"])


# --------------------------------------------------------------------------- layout conversion


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _paths(tree: Any) -> list[tuple[str, ...]]:
    return [tuple(_key(k) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _param_paths(params: Any) -> set[tuple[str, ...]]:
    return set(_paths(params))


def _split_at_param(path: tuple[str, ...], params: set[tuple[str, ...]]
                    ) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(prefix, param path + suffix)`` where a parameter path starts in ``path``."""
    longest = max((len(p) for p in params), default=0)
    for start in range(len(path)):
        for length in range(min(longest, len(path) - start), 0, -1):
            if path[start:start + length] in params:
                return path[:start], path[start:]
    return None


def _block_index(path: tuple[str, ...]) -> tuple[int, tuple[str, ...]] | None:
    """``(i, path without "layers/<i>")`` if ``path`` runs through ``layers/<i>``."""
    for j in range(len(path) - 1):
        if path[j] == LAYERS and path[j + 1].isdigit():
            return int(path[j + 1]), path[:j] + path[j + 2:]
    return None


def _templates(tx: optax.GradientTransformation, params: Any) -> tuple[Any, Any, Any, Any, int]:
    """Abstract ``tx`` states of the head, one block and the embedding; the block and its count."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    head, layers, embed = split_groups(abstract)
    if _is_unrolled(layers):
        block, n = layers[min(layers, key=int)], len(layers)
    else:
        block, n = _block_abstract(layers), jax.tree.leaves(layers)[0].shape[0]
    return (jax.eval_shape(tx.init, head), jax.eval_shape(tx.init, block),
            jax.eval_shape(tx.init, embed), block, n)


def _stacked_states(layers: Any) -> Any:
    """Per-block states ``{i: state}`` as one stacked state (stacked input unchanged)."""
    if not isinstance(layers, dict):
        return layers
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[k] for k in sorted(layers, key=int)])


def layerwise_to_full(state: LayerwiseState, tx: optax.GradientTransformation, params: Any,
                      full_template: Any) -> Any:
    """The standard-layout state (``tx.init`` of the unrolled params) of a :class:`LayerwiseState`.

    Args:
      state: the per-layer state.
      tx: the transformation it belongs to.
      params: the model's parameters, stacked or unrolled (arrays or ``ShapeDtypeStruct``).
      full_template: ``jax.eval_shape(tx.init, unstack_layers(params))``.

    Leaves that belong to no parameter (step counts, PRNG keys) are taken from
    ``state.head``.
    """
    _, _, _, block, _ = _templates(tx, params)
    block_paths = _param_paths(block)
    layers = _stacked_states(state.layers)
    outer_leaves = dict(zip(_paths(state.embed), jax.tree.leaves(state.embed)))
    outer_leaves.update(zip(_paths(state.head), jax.tree.leaves(state.head)))
    layer_leaves = dict(zip(_paths(layers), jax.tree.leaves(layers)))
    out = []
    for path in _paths(full_template):
        hit = _block_index(path)
        if hit is not None and _split_at_param(hit[1], block_paths) is not None:
            out.append(layer_leaves[hit[1]][hit[0]])
        else:
            out.append(outer_leaves[path])
    return jax.tree.unflatten(jax.tree.structure(full_template), out)


def full_to_layerwise(full: Any, tx: optax.GradientTransformation, params: Any
                      ) -> LayerwiseState:
    """Inverse of :func:`layerwise_to_full`: a standard-layout state into a :class:`LayerwiseState`.

    Leaves of a block state that belong to no parameter (counts) repeat the
    standard state's value for every block; PRNG keys are folded with the block
    index as :func:`layerwise_init` does.
    """
    head_t, block_t, embed_t, block, n = _templates(tx, params)
    block_paths = _param_paths(block)
    full_leaves = dict(zip(_paths(full), jax.tree.leaves(full)))

    def group(template: Any) -> Any:
        return jax.tree.unflatten(jax.tree.structure(template),
                                  [full_leaves[p] for p in _paths(template)])

    layers = []
    for path in _paths(block_t):
        split = _split_at_param(path, block_paths)
        if split is None:
            layers.append(jnp.stack([jnp.asarray(full_leaves[path])] * n))
            continue
        prefix, rest = split
        layers.append(jnp.stack([full_leaves[prefix + (LAYERS, str(i)) + rest]
                                 for i in range(n)]))
    stacked = jax.tree.unflatten(jax.tree.structure(block_t), layers)
    stacked = jax.vmap(_fold_keys)(stacked, jnp.arange(n))
    if _is_unrolled(split_layers(params)[1]):
        stacked = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return LayerwiseState(group(head_t), stacked, group(embed_t))


# --------------------------------------------------------------------------- the step


def layerwise_overlaps(state: LayerwiseState) -> dict[str, jax.Array]:
    """``lowrank_jax.projector_overlaps`` of a :class:`LayerwiseState`, by parameter path.

    The names are those of the standard step's state (``layers/<i>/attn/q_proj/kernel``,
    ``lm_head/kernel``), scalars per leaf, without converting the state.
    """
    import lowrank_jax as lj

    out = dict(lj.projector_overlaps(state.head))
    if _is_unrolled(state.layers):
        for k, block in state.layers.items():
            out.update({f"{LAYERS}/{k}/{name}": v
                        for name, v in lj.projector_overlaps(block).items()})
    else:
        for name, v in lj.projector_overlaps(state.layers).items():
            # blocks on the last axis (a group of vmapped seeds stacks seeds in front)
            out.update({f"{LAYERS}/{i}/{name}": v[..., i] for i in range(v.shape[-1])})
    out.update(lj.projector_overlaps(state.embed))
    return out


def _sq_norm(tree: Any) -> jax.Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
               jnp.zeros((), jnp.float32))


def _update_norm_sq(grads: Any, state: Any, accumulate: int) -> jax.Array:
    """Squared norm of the gradient the update acts on (the running mean when accumulating)."""
    if accumulate <= 1:
        return _sq_norm(grads)
    n = state.mini_step.astype(jnp.float32)  # optax.MultiStepsState
    return _sq_norm(jax.tree.map(lambda g, a: a + (g.astype(a.dtype) - a) / (n + 1.0),
                                 grads, state.acc_grads))


def _take(tree: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _put(tree: Any, value: Any, i: jax.Array) -> Any:
    return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, i, 0), tree, value)


def make_per_layer_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    remat: str,
    accumulate: int,
    opt_view: Callable[[Any], Any] = lambda t: t,
    skip_nonfinite: bool = False,
) -> Callable[[Any, Any, Any, dict[str, jax.Array]], tuple[Any, Any, Any, dict[str, jax.Array]]]:
    """The pure per-layer train step of a model (scanned or unrolled blocks).

    Args:
      model: the model, abstract is enough (``nnx.eval_shape``); only its structure
        is read.  With ``scan_layers`` the blocks run in two ``jax.lax.scan`` loops
        (one compiled block); otherwise in Python loops (one compiled copy per block,
        each block's arrays updated in place through donation).
      tx: the optimizer, applied to each group (head, each block, embedding).
      remat: the model's ``remat`` (each block's forward under that checkpoint policy).
      accumulate: ``optax.MultiSteps`` micro-steps (for the logged norm).
      opt_view: maps parameters / gradients to what the optimizer sees (e.g. a
        float32 cast); updates are cast back by ``optax.apply_updates``.
      skip_nonfinite: a group (the head, a block, the embedding) whose gradient norm
        is not finite keeps its parameters and optimizer state (the non-finite
        policy per group: other groups of the same step are still updated).

    Returns:
      ``(params, model_state, opt_state, batch) -> (params, model_state,
      opt_state, {"loss", "grad_norm"})``; ``opt_state`` is a :class:`LayerwiseState`.
    """
    scanned = bool(model.cfg.scan_layers)
    embed_gd = nnx.graphdef(model.embed)
    norm_gd = nnx.graphdef(model.final_norm)
    head_gd = nnx.graphdef(model.lm_head)
    first_block = model.layers if scanned else model.layers[0]
    block_gd = nnx.split(first_block, nnx.Param, ...)[0]

    def block_fn(p: Any, ms: Any, x: jax.Array) -> jax.Array:
        return apply_block(block_gd, (p, ms), x)

    block_fn = with_remat(block_fn, remat, in_scan=scanned)

    def update_block(g: Any, s: Any, p: Any) -> tuple[Any, Any, jax.Array]:
        """One group's optimizer update: ``(new params, new state, squared grad norm)``."""
        sq = _update_norm_sq(opt_view(g), s, accumulate)

        def update(g: Any, s: Any, p: Any) -> tuple[Any, Any]:
            updates, new_s = tx.update(opt_view(g), s, opt_view(p))
            return optax.apply_updates(p, updates), new_s

        if not skip_nonfinite:
            return *update(g, s, p), sq
        # decided from the gradient before the update: a conditional, not a select
        # after it (which would keep every group's old state next to its new one)
        return *jax.lax.cond(jnp.isfinite(sq), update, lambda g, s, p: (p, s), g, s, p), sq

    blocks = _scanned_blocks if scanned else _unrolled_blocks

    def step(params: Any, model_state: Any, opt_state: LayerwiseState, batch: dict[str, Any]):
        tokens = batch["tokens"]
        inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], batch.get("mask")
        head_p, layer_p, embed_p = split_groups(params)
        outer_ms, layer_ms = split_layers(model_state)
        if jax.tree.leaves(outer_ms):
            raise ValueError("per_layer_update: only blocks may hold non-Param variables")
        if layer_ms is None:
            layer_ms = nnx.State({}) if scanned else {k: nnx.State({}) for k in layer_p}

        def embed_fn(ep: Any) -> jax.Array:
            return nnx.merge(embed_gd, ep[EMBED])(inputs)

        def head_fn(hp: Any, x: jax.Array) -> tuple[jax.Array, Any]:
            h = nnx.merge(norm_gd, hp["final_norm"])(x)
            logits = nnx.merge(head_gd, hp["lm_head"])(h).astype(jnp.float32)
            return token_loss(logits, targets, mask)

        def head(x_n: jax.Array) -> tuple[jax.Array, Any, Any, jax.Array, jax.Array]:
            """Loss, the head's update (before any block's), and the cotangent of ``x_n``."""
            loss, head_vjp, _ = jax.vjp(head_fn, head_p, x_n, has_aux=True)
            g_head, dx = head_vjp(jnp.ones((), loss.dtype))
            new_p, new_s, sq = update_block(g_head, opt_state.head, head_p)
            dx, new_p, new_s = jax.lax.optimization_barrier((dx, new_p, new_s))
            return loss, new_p, new_s, sq, dx

        x0, embed_vjp = jax.vjp(embed_fn, embed_p)
        (loss, head_p, head_s, sq), dx0, layer_p, layer_s, block_sq = blocks(
            block_fn, update_block, x0, layer_p, layer_ms, opt_state.layers, head)
        (g_embed,) = embed_vjp(dx0)
        embed_p, embed_s, embed_sq = update_block(g_embed, opt_state.embed, embed_p)
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(sq + block_sq + embed_sq)}
        return (join_groups(head_p, layer_p, embed_p), model_state,
                LayerwiseState(head_s, layer_s, embed_s), metrics)

    return step


def _split_vjp(vjp: Any, weights: Any) -> tuple[Any, list[int], list[jax.Array]]:
    """``(treedef, where, kept)``: the VJP's residuals without the leaves of ``weights``.

    ``where[j]`` is the index of residual ``j`` in ``jax.tree.leaves(weights)`` or
    ``-1`` when it is kept (an activation).  Weights are recognised by identity.
    """
    leaves, treedef = jax.tree.flatten(vjp)
    index = {id(w): k for k, w in enumerate(jax.tree.leaves(weights))}
    where = [index.get(id(leaf), -1) for leaf in leaves]
    return treedef, where, [leaf for leaf in leaves if id(leaf) not in index]


def _join_vjp(treedef: Any, where: list[int], kept: list[jax.Array], weights: Any) -> Callable:
    """Inverse of :func:`_split_vjp` with (possibly new) ``weights``."""
    flat, rest = jax.tree.leaves(weights), iter(kept)
    return jax.tree.unflatten(treedef, [flat[w] if w >= 0 else next(rest) for w in where])


def _scanned_blocks(block_fn: Callable, update_block: Callable, x0: jax.Array, layer_p: Any,
                    layer_ms: Any, layer_s: Any, head: Callable) -> tuple:
    """Forward and per-layer backward over stacked blocks with two ``jax.lax.scan`` loops.

    The forward saves each block's VJP residuals except the block's own weights;
    the backward reads the weights from the carried stack, rebuilds the VJP and
    writes the updated block back with ``dynamic_update_slice``.
    """
    layout: dict[str, Any] = {}

    def forward(x: jax.Array, xs: tuple[Any, Any]) -> tuple[jax.Array, list[jax.Array]]:
        p_i, ms_i = xs
        y, vjp = jax.vjp(lambda p, h: block_fn(p, ms_i, h), p_i, x)
        layout["treedef"], layout["where"], kept = _split_vjp(vjp, (p_i, ms_i))
        return y, kept

    x_n, saved = jax.lax.scan(forward, x0, (layer_p, layer_ms))
    *head_out, dx = head(x_n)

    def backward(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        dx, lp, ls, sq = carry
        i, kept = xs
        p_i, ms_i = _take(lp, i), _take(layer_ms, i)
        vjp = _join_vjp(layout["treedef"], layout["where"], kept, (p_i, ms_i))
        g_i, dx = vjp(dx)
        p_i, s_i, sq_i = update_block(g_i, _take(ls, i), p_i)
        return (dx, _put(lp, p_i, i), _put(ls, s_i, i), sq + sq_i), None

    n = jax.tree.leaves(layer_p)[0].shape[0]
    init = (dx, layer_p, layer_s, jnp.zeros((), jnp.float32))
    (dx0, layer_p, layer_s, sq), _ = jax.lax.scan(backward, init, (jnp.arange(n), saved),
                                                   reverse=True)
    return tuple(head_out), dx0, layer_p, layer_s, sq


def _unrolled_blocks(block_fn: Callable, update_block: Callable, x0: jax.Array, layer_p: Any,
                     layer_ms: Any, layer_s: Any, head: Callable) -> tuple:
    """Forward and per-layer backward over ``layers/<i>`` blocks with Python loops.

    Block ``k``'s backward starts from an optimisation barrier on ``(dx, weights_k,
    state_k)`` whose ``dx`` is produced after block ``k+1``'s update: XLA then works
    on one block at a time instead of scheduling everything that depends only on
    the inputs (dequantised moments, dtype conversions of weights) up front.
    """
    keys = sorted(layer_p.keys(), key=int)
    saved, x = {}, x0
    for k in keys:
        x, vjp = jax.vjp(lambda p, h, k=k: block_fn(p, layer_ms[k], h), layer_p[k], x)
        saved[k] = _split_vjp(vjp, (layer_p[k], layer_ms[k]))
    *head_out, dx = head(x)
    new_p, new_s, sq = {}, {}, jnp.zeros((), jnp.float32)
    for k in reversed(keys):
        dx, weights, state_k = jax.lax.optimization_barrier(
            (dx, (layer_p[k], layer_ms[k]), layer_s[k]))
        g_k, dx = _join_vjp(*saved.pop(k), weights)(dx)
        new_p[k], new_s[k], sq_k = update_block(g_k, state_k, weights[0])
        dx, new_p[k], new_s[k] = jax.lax.optimization_barrier((dx, new_p[k], new_s[k]))
        sq = sq + sq_k
    layer_p = nnx.State({k: _raw(new_p[k]) for k in keys})
    layer_s = {k: new_s[k] for k in keys}
    return tuple(head_out), dx, layer_p, layer_s, sq

