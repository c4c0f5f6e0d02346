"""Small building blocks: norms, rotary embeddings, routers.

The attention and FFN modules live in their own files; each handles the dense model as the
one-expert case of its mixture, so no layer code is duplicated between dense and MoE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bam_lightning.config import ModelConfig


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)


def rope_tables(seq_len: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2]; cheap enough to build per forward, so no buffers to
    re-materialise after meta-device init or sharding."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim; x is [..., T, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def init_router(router: nn.Linear, config: ModelConfig) -> None:
    """BAM_SPEC says only "random": small-std normal keeps the first gates near uniform."""
    if config.router_init == "zeros":
        nn.init.zeros_(router.weight)
    else:
        nn.init.normal_(router.weight, std=config.router_init_std)


@dataclass
class RouterStats:
    """What one mixture layer reports; the LightningModule sums losses and logs the rest.

    Tensors keep their graph for the losses (so they train) and are detached for statistics.
    """

    lb_loss: torch.Tensor | None = None  # Switch load balancing, FFN router only
    z_loss: torch.Tensor | None = None  # router z-loss, FFN router only
    expert_fraction: torch.Tensor | None = None  # [E] share of tokens whose top-1 is e
    attn_gate_mean: torch.Tensor | None = None  # [E] mean soft attention gate per expert


def router_probs(router: nn.Linear, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and softmax over all experts, in float32 (or wider) whatever the autocast dtype."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = F.linear(h.to(dtype), router.weight.to(dtype))
    return logits, logits.softmax(dim=-1)
