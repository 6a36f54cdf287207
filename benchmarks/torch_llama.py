"""The LLaMA decoder of :mod:`lowrank_jax.models` in PyTorch, for speed comparisons.

Same architecture and parameter count as ``Llama(cfg)``: token embedding, ``n``
pre-norm blocks (RMSNorm, causal multi-head attention with rotate-half RoPE
through ``scaled_dot_product_attention``, SwiGLU MLP), final RMSNorm, untied
head; no biases. Weights are ``nn.Linear`` ``(out, in)``, i.e. the transposes of
ours. Needs the optional extra ``torch`` (``pip install -e '.[torch]'``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x * scale / sqrt(mean(x^2) + eps)``, statistics in float32."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    """Pre-norm block: attention then SwiGLU, each with a residual."""

    def __init__(self, cfg: Any):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, n, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TorchLlama(nn.Module):
    """``tokens (B, L) -> logits (B, L, vocab)`` float32, the architecture of ``Llama(cfg)``."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, half = tokens.shape[1], self.cfg.head_dim // 2
        inv = 1.0 / self.cfg.rope_base ** (torch.arange(0, half, dtype=torch.float32) / half)
        ang = torch.arange(n, dtype=torch.float32)[:, None] * inv
        ang = torch.cat((ang, ang), dim=-1)
        cos, sin = ang.cos(), ang.sin()
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.final_norm(x)).float()


def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``tokens`` ``(B, L+1)``."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def make_optimizer(model: nn.Module, name: str, lr: float, rank: int, gap: int,
                   scale: float) -> torch.optim.Optimizer:
    """``"adamw"`` (``torch.optim.AdamW``) or ``"galore_adamw"`` (galore-torch's ``GaLoreAdamW``).

    GaLore projects the 2-D weights of attention and MLP (every ``nn.Linear``
    inside a block), as GaLore's ``torchrun_main.py`` selects them.
    """
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, eps=1e-8)
    if name != "galore_adamw":
        raise ValueError(f"unknown torch optimizer {name!r}; valid: adamw, galore_adamw")
    from galore_torch import GaLoreAdamW

    lowrank = [p for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2]
    ids = {id(p) for p in lowrank}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest},
              {"params": lowrank, "rank": rank, "update_proj_gap": gap, "scale": scale,
               "proj_type": "std"}]
    return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, clip: float = 1.0):
    """One compiled-forward/backward train step ``tokens -> loss`` (clip, then the optimizer)."""
    compiled = torch.compile(model)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(compiled, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step
