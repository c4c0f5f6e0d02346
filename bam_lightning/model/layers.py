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
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.norm_bias)


def rope_tables(seq_len: int, head_dim: int, base: float, device, dtype,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, head_dim/2]; cheap enough to build per forward, so no buffers to
    re-materialise after meta-device init or sharding. `head_dim` is the rotated width
    (`config.rotary_dim`); `scaling` is `config.rope_scaling`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scale_inv_freq(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def config_rope_tables(config: ModelConfig, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_tables(seq_len, config.rotary_dim, config.rope_base, device, dtype, config.rope_scaling)


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Context extension by frequency: `factors` divides frequency i by factors[i] (llama.cpp's
    rope_freqs tensor); `linear` divides every frequency by `factor` (positions
    / factor); `llama3` divides only the low frequencies (wavelengths longer than
    original_context / low_freq_factor), keeps the high ones (shorter than original_context /
    high_freq_factor) and interpolates smoothly between the two bands."""
    if scaling["type"] == "factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=inv_freq.dtype, device=inv_freq.device)
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    context = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelength = 2 * torch.pi / inv_freq
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    # smooth = 0: long wavelengths (scaled); 1: short ones (kept)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim; x is [..., T, head_dim].

    out = (x1 cos - x2 sin, x2 cos + x1 sin). Written as chunk, four products and cat, autograd
    makes about nine memory passes and seven allocations forward, more backward; `_Rotary` makes
    four fused passes into one tensor each way (its backward is the inverse rotation). Measured
    on the attention bank's fwd+bwd (E 4, `benchmarks/bench_rope.py`): 0.95-1.00x the
    plain formula's time with `bam`'s heap malloc, 0.93x with glibc's default. Without autograd
    (decoding, validation) the rotation runs directly: a Function's bookkeeping costs more than
    the rotation of one token."""
    if torch.is_grad_enabled():
        return _Rotary.apply(x, cos, sin)
    _check_rope_shapes(x, cos)
    return _rotate(x, cos, sin, 1.0)


def _check_rope_shapes(x: torch.Tensor, cos: torch.Tensor) -> None:
    if x.shape[-1] % 2 or cos.shape[-1] * 2 != x.shape[-1]:
        raise ValueError(f"RoPE: head_dim {x.shape[-1]} must be even and twice the tables' last dim {cos.shape[-1]}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """Rotate by +angle (sign 1) or -angle (sign -1) into a new contiguous tensor (measured a
    little faster in attention than keeping x's transposed layout)."""
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
    x1, x2, out1, out2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        _check_rope_shapes(x, cos)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors  # a rotation's transpose is the rotation by -angle
        return _rotate(grad, cos, sin, -1.0), None, None


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
