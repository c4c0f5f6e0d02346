"""Causal multi-head attention as a bank of E experts (E = 1 is the dense attention).

Weights are stacked with a leading expert dimension, so dense model j's tensors are expert
slice j. Every expert attends with its own queries (and, for Expert-KV, its own keys and values)
at the same RoPE positions; keys are never mixed across experts inside one softmax. The soft gate
g_e(token) weights each expert's output after its own output projection:

    Attn_moa(h) = sum_e g_e(h) * W_o,e MHA_e(h)

which equals one matrix product over the concatenated expert outputs, [g_1 o_1 ... g_E o_E] @
[W_o,1 ... W_o,E]^T, so the whole bank runs as a few large GEMMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bam_lightning.config import ModelConfig
from bam_lightning.model.layers import RouterStats, apply_rope, init_router, router_probs


class MixtureOfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e_q, e_kv = config.n_attn_banks, config.n_kv_banks
        d, hd = config.d_model, config.head_dim
        self.wq = nn.Parameter(torch.empty(e_q, config.n_head * hd, d))
        self.wk = nn.Parameter(torch.empty(e_kv, config.n_kv_head * hd, d))
        self.wv = nn.Parameter(torch.empty(e_kv, config.n_kv_head * hd, d))
        self.wo = nn.Parameter(torch.empty(e_q, d, config.n_head * hd))
        self.router = nn.Linear(d, config.attn_experts, bias=False) if config.attn_experts else None

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.wo, std=std / math.sqrt(2 * self.config.n_layer))
        if self.router is not None:
            init_router(self.router, self.config)

    def gates(self, h: torch.Tensor) -> torch.Tensor | None:
        """[B, T, E] gates from the query token only; None for a dense attention."""
        if self.router is None:
            return None
        _, probs = router_probs(self.router, h)
        if self.config.attn_routing == "top_k":  # the paper's ablation: keep k, renormalise
            top, idx = probs.topk(self.config.attn_top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return probs

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        cfg = self.config
        B, T, d = h.shape
        E, E_kv, H, H_kv, hd = self.wq.shape[0], self.wk.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
        shared_kv = E_kv < E
        # The bank is one wide multi-head attention with E * H query heads, laid out exactly like
        # a dense one: every projection is one GEMM and [B, T, heads, hd] -> [B, heads, T, hd] is
        # a free transpose. Expert-KV orders the heads (expert, head), so expert e's query heads
        # meet its own K/V heads. Shared-KV orders them (head, expert), so that grouped-query
        # attention maps every expert's head h onto the shared K/V head of h; reordering the
        # (small) weights costs less than reordering the activations.
        wq, wo = self.wq, self.wo.view(E, d, H, hd)
        if shared_kv:
            wq, wo = wq.view(E, H, hd, d).transpose(0, 1), wo.permute(1, 2, 0, 3)  # (head, expert)
        else:
            wo = wo.permute(1, 0, 2, 3)  # (expert, head)
        q = (h @ wq.reshape(E * H * hd, d).T).view(B, T, E * H, hd).transpose(1, 2)
        k = (h @ self.wk.reshape(E_kv * H_kv * hd, d).T).view(B, T, E_kv * H_kv, hd).transpose(1, 2)
        v = (h @ self.wv.reshape(E_kv * H_kv * hd, d).T).view(B, T, E_kv * H_kv, hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=E * H != E_kv * H_kv)
        gates = self.gates(h)
        stats = RouterStats()
        if gates is None:
            o = o.transpose(1, 2).reshape(B, T, E * H * hd)
        else:
            o = _GatedHeads.apply(o, gates.to(o.dtype), E, not shared_kv)
            stats.attn_gate_mean = gates.detach().mean(dim=(0, 1))
        # sum_e W_o,e (g_e o_e) as one GEMM over the concatenated expert outputs.
        return o @ wo.reshape(d, E * H * hd).T, stats


class _GatedHeads(torch.autograd.Function):
    """SDPA's output [B, heads, T, hd] -> [B, T, heads * hd] with each expert's heads scaled by its
    gate [B, T, E], in one pass. Written as transpose, reshape and multiply, autograd copies the
    output once to reshape it, again to scale it, and keeps the copy for the backward; here the
    scaling writes the [B, T, ...] layout directly and the backward reuses the SDPA output that
    attention keeps anyway. A throwaway A/B measured 0.97-0.98x the three-op version's
    attention-bank fwd+bwd (E 4; issue 5's note).
    Heads are ordered (expert, head) when `expert_major`, else (head, expert) (Shared-KV)."""

    @staticmethod
    def _views(o: torch.Tensor, g: torch.Tensor, experts: int, expert_major: bool):
        B, heads, T, hd = o.shape
        o = o.transpose(1, 2)  # [B, T, heads, hd], a view
        if expert_major:
            return o.view(B, T, experts, heads // experts, hd), g.view(B, T, experts, 1, 1), (3, 4)
        return o.view(B, T, heads // experts, experts, hd), g.view(B, T, 1, experts, 1), (2, 4)

    @staticmethod
    def forward(ctx, o: torch.Tensor, g: torch.Tensor, experts: int, expert_major: bool) -> torch.Tensor:
        o5, g5, _ = _GatedHeads._views(o, g, experts, expert_major)
        out = torch.empty(o5.shape, dtype=torch.result_type(o, g), device=o.device)
        torch.mul(o5, g5, out=out)
        ctx.save_for_backward(o, g)
        ctx.experts, ctx.expert_major = experts, expert_major
        return out.flatten(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        o, g = ctx.saved_tensors
        o5, g5, head_dims = _GatedHeads._views(o, g, ctx.experts, ctx.expert_major)
        grad5 = grad.view(o5.shape)
        B, heads, T, hd = o.shape
        grad_o = (grad5 * g5).view(B, T, heads, hd).transpose(1, 2)
        grad_g = (grad5 * o5).sum(head_dims) if ctx.needs_input_grad[1] else None
        return grad_o, grad_g, None, None
