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
        # One GEMM per projection for the whole bank: [B, T, E*H*hd] -> [B, E, H, T, hd].
        q = (h @ self.wq.flatten(0, 1).T).view(B, T, E, H, hd).permute(0, 2, 3, 1, 4)
        k = (h @ self.wk.flatten(0, 1).T).view(B, T, E_kv, H_kv, hd).permute(0, 2, 3, 1, 4)
        v = (h @ self.wv.flatten(0, 1).T).view(B, T, E_kv, H_kv, hd).permute(0, 2, 3, 1, 4)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if E_kv == E:
            # Expert-KV (and dense): experts are extra batch entries, each with its own K/V.
            o = F.scaled_dot_product_attention(
                q.reshape(B * E, H, T, hd), k.reshape(B * E, H_kv, T, hd), v.reshape(B * E, H_kv, T, hd),
                is_causal=True, enable_gqa=H != H_kv)
            o = o.view(B, E, H, T, hd)
        else:
            # Shared-KV: fold the experts into the query heads, ordered (head, expert), so that
            # grouped-query attention maps every expert's head h onto the shared KV head of h.
            q = q.transpose(1, 2).reshape(B, H * E, T, hd)
            o = F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], is_causal=True, enable_gqa=True)
            o = o.view(B, H, E, T, hd).transpose(1, 2)
        o = o.permute(0, 3, 1, 2, 4)  # [B, T, E, H, hd]
        gates = self.gates(h)
        stats = RouterStats()
        if gates is not None:
            o = o * gates.to(o.dtype)[..., None, None]
            stats.attn_gate_mean = gates.detach().mean(dim=(0, 1))
        # sum_e W_o,e (g_e o_e) as one GEMM over the concatenated expert outputs.
        w_out = self.wo.permute(1, 0, 2).reshape(d, E * H * hd)
        return o.reshape(B, T, E * H * hd) @ w_out.T, stats
