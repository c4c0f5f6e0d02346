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
        o = o.transpose(1, 2)  # [B, T, heads, hd]
        gates = self.gates(h)
        stats = RouterStats()
        if gates is not None:
            g = gates.to(o.dtype)
            if shared_kv:
                o = o.reshape(B, T, H, E, hd) * g[:, :, None, :, None]
            else:
                o = o.reshape(B, T, E, H * hd) * g[..., None]
            stats.attn_gate_mean = gates.detach().mean(dim=(0, 1))
        # sum_e W_o,e (g_e o_e) as one GEMM over the concatenated expert outputs.
        return o.reshape(B, T, E * H * hd) @ wo.reshape(d, E * H * hd).T, stats
