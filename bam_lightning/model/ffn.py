"""SwiGLU FFN as a bank of E experts with a top-k router (E = 1, no router: the dense FFN).

Routing follows BAM_SPEC.md: softmax over *all* experts before top-k and no renormalisation (the
paper's choice; with k = 1 the LM loss still reaches the router through p_top), or renormalised
top-k (original BTX). Dropless: every token reaches its k experts. Tokens are sorted by expert so
each expert runs one contiguous matrix product; there is no Python loop over tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bam_lightning.config import ModelConfig
from bam_lightning.model.layers import RouterStats, init_router, router_probs


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: x [N, d], w_gate/w_up [d_ff, d], w_down [d, d_ff]."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


class MixtureOfFFN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E, d, f = config.n_ffn_banks, config.d_model, config.d_ff
        self.w_gate = nn.Parameter(torch.empty(E, f, d))
        self.w_up = nn.Parameter(torch.empty(E, f, d))
        self.w_down = nn.Parameter(torch.empty(E, d, f))
        self.router = nn.Linear(d, config.n_experts, bias=False) if config.n_experts else None

    def reset_parameters(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=std / math.sqrt(2 * self.config.n_layer))
        if self.router is not None:
            init_router(self.router, self.config)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """Top-k expert indices [N, k], their weights [N, k] and the router's losses/stats."""
        cfg = self.config
        logits, probs = router_probs(self.router, x)
        weights, idx = probs.topk(cfg.ffn_top_k, dim=-1)
        if cfg.ffn_renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        E = probs.shape[-1]
        top1_fraction = torch.bincount(idx[:, 0], minlength=E).to(probs.dtype) / idx.shape[0]
        stats = RouterStats(
            lb_loss=E * (top1_fraction * probs.mean(dim=0)).sum(),
            z_loss=torch.logsumexp(logits, dim=-1).square().mean(),
            expert_fraction=top1_fraction,
        )
        return idx, weights, stats

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        B, T, d = h.shape
        x = h.reshape(B * T, d)
        if self.router is None:
            out = swiglu(x, self.w_gate[0], self.w_up[0], self.w_down[0])
            return out.view(B, T, d), RouterStats()
        idx, weights, stats = self.route(x)
        out = self.experts(x, idx, weights.to(x.dtype))
        return (self.config.ffn_gate_scale * out).view(B, T, d), stats

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Dispatch each (token, slot) pair to its expert in expert-sorted order, combine back."""
        k = idx.shape[1]
        flat_expert = idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // k  # which token each sorted row came from
        counts = torch.bincount(flat_expert, minlength=self.w_gate.shape[0]).tolist()
        rows = x.index_select(0, token_of)
        outputs = [
            swiglu(chunk, self.w_gate[e], self.w_up[e], self.w_down[e])
            for e, chunk in enumerate(rows.split(counts))  # empty experts still join the graph (DDP)
        ]
        expert_out = torch.cat(outputs) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x, dtype=expert_out.dtype).index_add_(0, token_of, expert_out)
