"""LLaMA-style decoder-only transformer in Flax NNX.

Architecture (as in the GaLore LLaMA configs / HF ``LlamaForCausalLM``):
token embedding -> ``num_layers`` x [RMSNorm -> causal MHA with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> untied ``lm_head``.
No biases; every matrix is initialised N(0, ``init_std``^2), norm scales with 1.

Parameter paths (``nnx.state(model, nnx.Param)``), kernels ``(in, out)``::

    embed/embedding                    (vocab, hidden)     ("vocab", "embed")
    layers/<i>/attn_norm/scale         (hidden,)           ("embed",)
    layers/<i>/attn/{q,k,v}_proj/kernel (hidden, hidden)   ("embed", "heads")
    layers/<i>/attn/o_proj/kernel      (hidden, hidden)    ("heads", "embed")
    layers/<i>/mlp_norm/scale          (hidden,)           ("embed",)
    layers/<i>/mlp/{gate,up}_proj/kernel (hidden, ffn)     ("embed", "mlp")
    layers/<i>/mlp/down_proj/kernel    (ffn, hidden)       ("mlp", "embed")
    final_norm/scale                   (hidden,)           ("embed",)
    lm_head/kernel                     (hidden, vocab)     ("embed", "vocab")

With ``scan_layers=True`` the blocks are one ``Block`` whose parameters carry a
leading ``(num_layers,)`` axis (logical name ``"layers"``), applied with
``jax.lax.scan`` so a deep model compiles as one block (as MaxText does); the
paths lose the layer index (``layers/attn/q_proj/kernel`` ``(n, hidden, hidden)``).
:func:`lowrank_jax.models.unstack_layers` turns such a tree back into the
``layers/<i>/...`` names and :func:`lowrank_jax.models.stack_layers` converts
the other way.

``remat`` rematerialises each block in the backward pass: ``"none"``,
``"block"`` (keep only the block input) or the name of a ``jax.checkpoint_policies``
policy (e.g. ``"dots_saveable"``: keep the matmul outputs, recompute the rest).

A dense model holds nothing but ``nnx.Param`` variables (no RNG state, no
buffers), so ``graphdef, params = nnx.split(model, nnx.Param)`` is exhaustive
and :func:`loss_from_state` is a pure function of ``params``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.models.layers import (
    ATTENTION_IMPLS,
    DTYPES,
    DenseLinear,
    DenseSpec,
    Embed,
    LinearDims,
    LinearSpec,
    RMSNorm,
    apply_rope,
    causal_attention,
    constrain,
    param_logical_axes,
    rope_cos_sin,
    to_dtype,
)
from lowrank_jax.models.linears import linear_spec
from lowrank_jax.models.lora import LoRASpec

Batch = dict[str, jax.Array]

#: ``LlamaConfig.remat`` values besides ``"none"`` and ``"block"``: policies of
#: ``jax.checkpoint_policies`` that take no arguments.
REMAT_POLICIES = ("checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable", "nothing_saveable")
REMAT_CHOICES = ("none", "block") + REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Plain-data model configuration (hashable; use ``dataclasses.replace`` or ``replace``).

    ``param_dtype``/``dtype`` are dtype names (``"float32"`` or ``"bfloat16"``) for
    the stored parameters and the activations.  ``linear`` is the attention/MLP
    projection: a :class:`~lowrank_jax.models.layers.LinearSpec` (``DenseSpec()``,
    ``CoLASpec(rank)``, ``SLTrainSpec(...)``, ``LoRASpec(...)``) or a method name,
    which becomes that method's default spec.  ``scan_layers`` stacks the blocks
    under ``jax.lax.scan``; ``remat`` is one of :data:`REMAT_CHOICES`;
    ``attention`` picks the ``jax.nn.dot_product_attention`` implementation
    (``"auto"``, ``"xla"``, ``"cudnn"``); ``axis_rules`` maps the logical names of
    activation sharding constraints to mesh axes (``None``: the parameters' default
    rules, :data:`lowrank_jax.sharding.DEFAULT_RULES`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    max_seq_len: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    linear: LinearSpec = DenseSpec()  # noqa: RUF009 - frozen, hence shared safely
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "auto"
    axis_rules: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads",
                     "num_layers", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}; valid: {sorted(DTYPES)}"
                )
        if not isinstance(self.linear, LinearSpec):
            object.__setattr__(self, "linear", linear_spec(self.linear))
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"unknown remat {self.remat!r}; valid: {', '.join(REMAT_CHOICES)}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {self.attention!r}; valid: "
                             f"{', '.join(ATTENTION_IMPLS)}")
        if self.axis_rules is not None:
            object.__setattr__(self, "axis_rules", tuple(
                (str(name), tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in self.axis_rules))
        if (self.scan_layers and isinstance(self.linear, LoRASpec)
                and float(self.linear.dropout) > 0):
            raise ValueError("scan_layers=True does not support LoRA dropout (its RNG stream is "
                             "per block); set the dropout to 0 or scan_layers=False")

    @property
    def head_dim(self) -> int:
        """Per-head width ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    def replace(self, **overrides: Any) -> LlamaConfig:
        """Copy with some fields changed (same as ``dataclasses.replace``)."""
        return dataclasses.replace(self, **overrides)

    def dims(self, in_features: int, out_features: int, axes: tuple[str, str]) -> LinearDims:
        """The :class:`LinearDims` of one ``(in, out)`` projection of this model."""
        return LinearDims(in_features, out_features, tuple(axes), self.init_std,
                          to_dtype(self.param_dtype), to_dtype(self.dtype))


def make_linear(cfg: LlamaConfig, in_features: int, out_features: int,
                logical_axes: tuple[str, str], rngs: nnx.Rngs) -> nnx.Module:
    """One attention/MLP projection ``(..., in) -> (..., out)`` built by ``cfg.linear``."""
    return cfg.linear.build(cfg.dims(in_features, out_features, logical_axes), rngs)


class Attention(nnx.Module):
    """Causal multi-head self-attention with RoPE; ``(B, L, d) -> (B, L, d)``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.rope_base = cfg.rope_base
        self.impl = cfg.attention
        self.rules = cfg.axis_rules
        self.q_proj = make_linear(cfg, d, d, ("embed", "heads"), rngs)
        self.k_proj = make_linear(cfg, d, d, ("embed", "heads"), rngs)
        self.v_proj = make_linear(cfg, d, d, ("embed", "heads"), rngs)
        self.o_proj = make_linear(cfg, d, d, ("heads", "embed"), rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        """``(B, L, d) -> (B, L, H, D)``, heads sharded like the ``heads`` kernel axis."""
        x = x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)
        return constrain(x, ("batch", None, "heads", None), self.rules)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, L, d)`` -> ``(B, L, d)``; positions are ``0..L-1``."""
        cos, sin = rope_cos_sin(jnp.arange(x.shape[1]), self.head_dim, self.rope_base)
        q = apply_rope(self._heads(self.q_proj(x)), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        out = causal_attention(q, k, v, self.impl)  # (B, L, H, D)
        return self.o_proj(out.reshape(x.shape[:-1] + (-1,)))


class MLP(nnx.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``; ``(B, L, d) -> (B, L, d)``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.rules = cfg.axis_rules
        self.gate_proj = make_linear(cfg, d, f, ("embed", "mlp"), rngs)
        self.up_proj = make_linear(cfg, d, f, ("embed", "mlp"), rngs)
        self.down_proj = make_linear(cfg, f, d, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, L, d)`` -> ``(B, L, d)``."""
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("batch", None, "mlp"), self.rules))


def _norm(cfg: LlamaConfig) -> RMSNorm:
    return RMSNorm(
        cfg.hidden_size,
        eps=cfg.norm_eps,
        param_dtype=to_dtype(cfg.param_dtype),
        dtype=to_dtype(cfg.dtype),
    )


class Block(nnx.Module):
    """Pre-norm decoder block; ``(B, L, d) -> (B, L, d)``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.rules = cfg.axis_rules
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``(B, L, d)`` -> ``(B, L, d)``."""
        x = constrain(x, ("batch", None, "embed"), self.rules)
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def remat_policy(remat: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy of a ``LlamaConfig.remat`` value (``None``: save nothing)."""
    if remat in ("none", "block"):
        return None
    return getattr(jax.checkpoint_policies, remat)


def with_remat(fn: Callable, remat: str, in_scan: bool = False) -> Callable:
    """``fn`` under ``jax.checkpoint`` as ``remat`` asks (unchanged for ``"none"``).

    ``in_scan``: ``fn`` is a ``jax.lax.scan`` body, where XLA cannot merge the
    recomputation with the forward pass; elsewhere ``prevent_cse`` stays on (without
    it XLA's common-subexpression elimination undoes the rematerialisation).
    """
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(remat), prevent_cse=not in_scan)


def apply_block(graphdef: nnx.GraphDef, state: Any, x: jax.Array) -> jax.Array:
    """Pure form of one block: ``nnx.merge(graphdef, *state)(x)``, ``x``: ``(B, L, d)``.

    ``state`` is a tuple of the block's states (``(params,)`` or ``(params,
    other variables)``), each holding ONE block's arrays (no layer axis).
    """
    return nnx.merge(graphdef, *state)(x)


def scan_blocks(graphdef: nnx.GraphDef, stacked: tuple, x: jax.Array, remat: str) -> jax.Array:
    """Apply the ``n`` stacked blocks in order with ``jax.lax.scan``; ``x``: ``(B, L, d)``.

    ``stacked`` is a tuple of block states whose arrays have a leading ``(n,)`` axis.
    """
    step = with_remat(lambda h, s: apply_block(graphdef, s, h), remat, in_scan=True)
    x, _ = jax.lax.scan(lambda h, s: (step(h, s), None), x, stacked)
    return x


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> Block:
    """One ``Block`` whose variables have a leading ``(num_layers,)`` axis named ``layers``."""

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r: nnx.Rngs) -> Block:
        return Block(cfg, rngs=r)

    return make(rngs)


class Llama(nnx.Module):
    """Decoder-only LLaMA; ``model(tokens)``: ``(B, L)`` int -> logits ``(B, L, vocab)`` f32."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype, dtype = to_dtype(cfg.param_dtype), to_dtype(cfg.dtype)
        self.embed = Embed(
            cfg.vocab_size, cfg.hidden_size,
            init_std=cfg.init_std, param_dtype=param_dtype, dtype=dtype, rngs=rngs,
        )
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg)
        # The output head is always dense: it is not an attention/MLP projection.
        self.lm_head = DenseLinear(cfg.dims(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab")),
                                   rngs=rngs)

    def check_tokens(self, tokens: jax.Array) -> None:
        """Raise ``ValueError`` unless ``tokens`` is ``(B, L)`` with ``L <= max_seq_len``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {tokens.shape[1]} > max_seq_len {self.cfg.max_seq_len}"
            )

    def apply_layers(self, x: jax.Array) -> jax.Array:
        """All blocks in order; ``x``: ``(B, L, d)`` -> ``(B, L, d)``."""
        if self.cfg.scan_layers:
            graphdef, *state = nnx.split(self.layers, nnx.Param, ...)
            return scan_blocks(graphdef, tuple(state), x, self.cfg.remat)
        for block in self.layers:
            if self.cfg.remat == "none":
                x = block(x)
            else:
                x = nnx.remat(lambda b, h: b(h), policy=remat_policy(self.cfg.remat),
                              prevent_cse=False)(block, x)
        return x

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and output head; ``x``: ``(B, L, d)`` -> logits ``(B, L, vocab)`` f32."""
        return self.lm_head(self.final_norm(x)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``tokens``: ``(B, L)`` int32, ``L <= max_seq_len`` -> ``(B, L, vocab)`` float32."""
        self.check_tokens(tokens)
        return self.head(self.apply_layers(self.embed(tokens)))


def token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked mean cross entropy of ``logits`` ``(B, L, V)`` against ``targets`` ``(B, L)``.

    Returns ``loss`` and ``{"sum_loss", "num_tokens"}`` as :func:`next_token_loss`.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    mask = jnp.ones_like(ce) if mask is None else mask.astype(jnp.float32)
    sum_loss = jnp.sum(ce * mask)
    num_tokens = jnp.sum(mask)
    loss = jnp.where(num_tokens > 0, sum_loss / jnp.where(num_tokens > 0, num_tokens, 1.0), 0.0)
    return loss, {"sum_loss": sum_loss, "num_tokens": num_tokens}


def next_token_loss(model: Llama, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked mean next-token cross entropy (float32).

    Args:
      model: the decoder.
      batch: ``{"tokens": (B, L+1) int32, "mask": (B, L) float32}``; position ``t``
        predicts ``tokens[:, t+1]`` from ``tokens[:, :t+1]`` and is weighted by
        ``mask[:, t]`` (a missing ``mask`` means all ones).

    Returns:
      ``loss = sum(mask * ce) / sum(mask)`` (0 when the mask sums to 0) and
      ``aux = {"sum_loss": sum(mask * ce), "num_tokens": sum(mask)}`` (f32 scalars),
      so that token-weighted means over many batches are ``sum(sum_loss)/sum(num_tokens)``.
    """
    tokens = batch["tokens"]
    return token_loss(model(tokens[:, :-1]), tokens[:, 1:], batch.get("mask"))


def loss_from_state(
    graphdef: nnx.GraphDef, params: Any, batch: Batch, model_state: Any = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Pure form of :func:`next_token_loss` for ``jax.grad``/``jax.jit``.

    Use with ``graphdef, params = nnx.split(model, nnx.Param)`` for a dense model,
    or ``graphdef, params, model_state = nnx.split(model, nnx.Param, ...)`` for a
    model with non-``Param`` variables (LoRA's frozen ``kernel``, SLTrain's
    support, dropout RNG streams), passing ``model_state`` too.  ``params`` is
    that ``nnx.State`` or its ``nnx.to_pure_dict`` nested dict; gradients with
    respect to it have the same structure.  Example::

        grads, aux = jax.grad(loss_from_state, argnums=1, has_aux=True)(graphdef, params, batch)
    """
    states = (params,) if model_state is None else (params, model_state)
    return next_token_loss(nnx.merge(graphdef, *states), batch)


def param_count_formula(cfg: LlamaConfig) -> int:
    """Analytic parameter count ``V*d + n*(4*d*d + 3*d*f + 2*d) + d + d*V``."""
    v, d, f, n = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    return v * d + n * (4 * d * d + 3 * d * f + 2 * d) + d + d * v


def count_params(tree: Any) -> int:
    """Number of scalars in a model, a state, or a pytree of arrays/``ShapeDtypeStruct``s."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def logical_axes(model_or_state: nnx.Module | nnx.State) -> nnx.State:
    """Logical axis names of every parameter, as a ``State`` shaped like the params.

    Each ``Param`` of ``nnx.state(model, nnx.Param)`` keeps its place but holds a
    tuple such as ``("embed", "heads")`` instead of an array.  Because the tuples
    sit where the arrays sit, ``jax.tree.map(fn, params, logical_axes(model))``
    hands ``fn`` each array with its whole tuple.  For ``PartitionSpec``s use
    ``nnx.get_partition_spec(params)`` inside ``nnx.logical_axis_rules(rules)``.
    """
    state = model_or_state
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    return jax.tree.map(
        lambda var: var.replace(tuple(param_logical_axes(var) or ())),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def _projection_shapes(cfg: LlamaConfig) -> dict[tuple[str, str], tuple[int, int]]:
    """``(block part, projection name) -> (in, out)`` of the seven projections of a block."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {("attn", name): (d, d) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes.update({("mlp", "gate_proj"): (d, f), ("mlp", "up_proj"): (d, f),
                   ("mlp", "down_proj"): (f, d)})
    return shapes


def trainable_param_count_formula(cfg: LlamaConfig) -> int:
    """Analytic count of the ``nnx.Param`` scalars for ``cfg.linear``.

    Embedding, head and norms as in :func:`param_count_formula`; each projection
    ``(in, out)`` contributes ``in*out`` (dense), ``r*(in+out)`` (CoLA, LoRA: the
    frozen ``W`` is not a ``Param``) or ``r*(in+out) + int(density*in*out)`` (SLTrain).
    An AdamW state holds twice this many scalars (``mu`` and ``nu``) plus its step count.
    """
    v, d, n = cfg.vocab_size, cfg.hidden_size, cfg.num_layers
    block = sum(cfg.linear.param_count(i, o) for i, o in _projection_shapes(cfg).values()) + 2 * d
    return v * d + n * block + d + d * v


def effective_weights(state: Any, cfg: LlamaConfig) -> dict[str, Any]:
    """Dense-equivalent parameters: the pure dict a ``linear="dense"`` model would hold.

    Args:
      state: the full model state as a pure nested dict (``nnx.to_pure_dict(nnx.state(model))``)
        or an ``nnx.State``; it must include non-``Param`` variables (LoRA's frozen
        ``kernel``, SLTrain's ``sparse_index``).
      cfg: the config the model was built with (reads ``linear`` and the method's scale).
        A state of a ``scan_layers`` model is unstacked first (the result has
        ``layers/<i>`` entries either way).

    Returns:
      a nested dict like ``nnx.to_pure_dict(nnx.state(dense_model, nnx.Param))`` where
      every projection holds ``{"kernel": W_eff (in, out) float32}``: ``W + A B alpha/r``
      for LoRA, ``A B alpha/r + S`` for SLTrain, the kernel itself for dense.  Load it
      with ``nnx.replace_by_pure_dict(nnx.state(dense_model, nnx.Param), result)``.

    Raises:
      ValueError: for CoLA (``silu`` between the factors: no dense ``W_eff``).
    """
    from lowrank_jax.models.stacking import unstack_layers

    if isinstance(state, nnx.State):
        state = nnx.to_pure_dict(state)
    if cfg.scan_layers:
        state = unstack_layers(state, cfg.num_layers)
    dense_kernel = cfg.linear.dense_kernel
    projections = {name for _, name in _projection_shapes(cfg)}
    parts = {part for part, _ in _projection_shapes(cfg)}

    def convert(node: Any, part: str | None) -> Any:
        out = {}
        for key, value in node.items():
            if part is not None and key in projections:
                out[key] = {"kernel": dense_kernel(value)}
            elif isinstance(value, dict):
                out[key] = convert(value, key if key in parts else None)
            else:
                out[key] = value
        return out

    layers = state["layers"]
    result = {k: v for k, v in state.items() if k != "layers"}
    result["layers"] = {i: convert(block, None) for i, block in layers.items()}
    return result
