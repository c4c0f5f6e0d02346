"""SwiGLU FFN as a bank of E experts with a top-k router (E = 1, no router: the dense FFN).

Routing follows BAM_SPEC.md: softmax over *all* experts before top-k and no renormalisation (the
paper's choice; with k = 1 the LM loss still reaches the router through p_top), or renormalised
top-k (original BTX). Dropless: every token reaches its k experts.

Speed (benchmarks/bench_ffn.py): the (token, slot) pairs are gathered in expert order so that
each expert reads one contiguous block of rows, the whole bank runs as one grouped matrix product
per projection, and the outputs are gathered back. The dense FFN is the one-group case of the
same code, so dense and one-expert mixtures agree bit for bit.

Which grouped kernel runs depends on the torch build, the device and the dtype (`ffn_kernel`):
`torch.nn.functional.grouped_mm` where it takes that dtype on that device, `torch._grouped_mm`
for bf16 on CUDA where the public name is missing, otherwise one product per expert (float64,
fp32 on CUDA, older torch). `last_ffn_kernel()` says which one the latest forward used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bam_lightning.config import ModelConfig
from bam_lightning.model.layers import RouterStats, init_router, router_probs

LOOP = "per-expert loop"
# dtypes `F.grouped_mm` takes, by device type. CPU: its C++ loop takes these three (float64
# fails: "Expected mat_a to be Float32, BFloat16 or Float16"; the same in torch 2.11 and 2.13).
# CUDA: torch documents bf16 only (on SM >= 80), so other dtypes take our loop rather than rely
# on what a given build happens to accept.
GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}
_last_kernel: str | None = None


def ffn_kernel(device: torch.device | str, dtype: torch.dtype) -> str:
    """The grouped kernel the FFN bank uses for matmuls in `dtype` on `device`: "F.grouped_mm",
    "torch._grouped_mm" or LOOP. Read at call time, so tests can patch what torch has."""
    device_type = torch.device(device).type
    if hasattr(F, "grouped_mm") and dtype in GROUPED_MM_DTYPES.get(device_type, ()):
        return "F.grouped_mm"
    if device_type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm"
    return LOOP


def last_ffn_kernel() -> str | None:
    """The kernel of the latest FFN forward in this process (None before the first): what the
    benchmarks print after timing, so a silent fallback cannot pass for the grouped kernel."""
    return _last_kernel


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One expert: x [N, d], w_gate/w_up [d_ff, d], w_down [d, d_ff]."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def row_alignment(dtype: torch.dtype) -> int:
    """Rows per expert are padded to a multiple of this. bf16 matmuls on AMX CPUs (oneDNN) were
    measured to pay a large one-off cost for every new row count, and routed row counts change
    every step; multiples of 64 keep the set of shapes small. fp32 padding only costs time."""
    return 64 if dtype.itemsize < 4 else 1


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul would run in: autocast does not convert grouped_mm, so we do."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_swiglu(rows: torch.Tensor, group_end: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """Expert e's SwiGLU on rows[group_end[e-1]:group_end[e]]; rows [N, d], weights [E, ...].

    Rows after group_end[-1] are not computed (the caller never reads them). `group_end` stays on
    the device: with a grouped kernel nothing waits for the host.
    """
    global _last_kernel
    dtype = _matmul_dtype(rows)
    rows = rows.to(dtype)
    w_gate, w_up, w_down = w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
    _last_kernel = kernel = ffn_kernel(rows.device, dtype)
    if kernel == LOOP:
        return _looped_swiglu(rows, group_end, w_gate, w_up, w_down)
    grouped_mm = F.grouped_mm if kernel == "F.grouped_mm" else torch._grouped_mm
    offs = group_end.to(torch.int32)
    hidden = F.silu(grouped_mm(rows, w_gate.transpose(1, 2), offs=offs))
    hidden = hidden * grouped_mm(rows, w_up.transpose(1, 2), offs=offs)
    return _ContiguousGrad.apply(grouped_mm(hidden, w_down.transpose(1, 2), offs=offs))


def _looped_swiglu(rows: torch.Tensor, group_end: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """The same without a grouped kernel (dtype, device or torch version): one product per expert.

    `unbind` rather than `w[e]`: each `w[e]` would build a full [E, ...] zero gradient in backward.
    Empty experts still run (on zero rows), so every parameter joins the graph (DDP).
    """
    ends = group_end.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)] + [rows.shape[0] - ends[-1]]
    *blocks, padding = rows.split(sizes)
    outputs = [swiglu(block, g, u, d)
               for block, g, u, d in zip(blocks, w_gate.unbind(), w_up.unbind(), w_down.unbind(), strict=True)]
    return torch.cat(outputs + [padding.new_zeros(padding.shape[0], w_down.shape[1])])


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward rejects
    broadcast ones, such as the gradient of `out.sum()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _GatherRows(torch.autograd.Function):
    """`x[index]` where every row of x is copied `copies` times, with a backward that is a gather
    too: `inverse` lists, for each row of x, the output rows that copied it (consecutively).
    Autograd's own backward for a gather is a scatter-add, several times slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.copies > 1:
            grad = grad.view(-1, ctx.copies, grad.shape[-1]).sum(dim=1)
        return grad, None, None, None


class MixtureOfFFN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E, d, f = config.n_ffn_banks, config.d_model, config.d_ff
        gated = config.ffn_activation == "swiglu"
        self.w_gate = nn.Parameter(torch.empty(E, f, d)) if gated else None
        self.w_up = nn.Parameter(torch.empty(E, f, d))
        self.w_down = nn.Parameter(torch.empty(E, d, f))
        self.router = nn.Linear(d, config.n_experts, bias=False) if config.n_experts else None
        # --- expert MLP form of other families (see `expert_mlp`); absent by default ---
        self.b_gate = nn.Parameter(torch.empty(E, f)) if gated and config.ffn_bias else None
        self.b_up = nn.Parameter(torch.empty(E, f)) if config.ffn_bias else None
        self.b_down = nn.Parameter(torch.empty(E, d)) if config.ffn_bias else None

    def reset_parameters(self) -> None:
        std = self.config.init_std
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=std / math.sqrt(2 * self.config.n_layer))
        if self.router is not None:
            init_router(self.router, self.config)
        for bias in (self.b_gate, self.b_up, self.b_down):
            if bias is not None:
                nn.init.zeros_(bias)

    def bank(self, rows: torch.Tensor, group_end: torch.Tensor) -> torch.Tensor:
        """Expert e's MLP on rows[group_end[e-1]:group_end[e]] (see `grouped_swiglu`)."""
        if self.w_gate is not None and self.b_up is None:  # the default SwiGLU without biases
            return grouped_swiglu(rows, group_end, self.w_gate, self.w_up, self.w_down)
        return looped_expert_mlp(rows, group_end, self)

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
            group_end = torch.full((1,), x.shape[0], device=x.device)
            out = self.bank(x, group_end)
            return out.view(B, T, d), RouterStats()
        idx, weights, stats = self.route(x)
        out = self.experts(x, idx, weights)
        return (self.config.ffn_gate_scale * out).view(B, T, d), stats

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Gather the (token, slot) pairs in expert order, run the bank, gather them back and sum
        each token's k outputs with their gate weights."""
        n_tokens, k = idx.shape
        E = self.w_up.shape[0]
        flat_expert = idx.reshape(-1)
        order = flat_expert.argsort(stable=True)  # sorted row i holds pair order[i] = token * k + slot
        rank = order.argsort()  # the sorted row of each pair
        counts = torch.bincount(flat_expert, minlength=E)
        rows = _GatherRows.apply(x, order // k, rank, k)
        align = row_alignment(_matmul_dtype(x))
        if align == 1:
            out_rows = self.bank(rows, counts.cumsum(0))
        else:
            # Each expert's block starts on a multiple of `align`; the buffer has a fixed size
            # (no host sync). The gaps are zero rows: their outputs are dropped and their zero
            # gradients must meet finite values in the weight gradient.
            padded = (counts + align - 1) // align * align
            shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)
            slot = shift[flat_expert[order]] + torch.arange(order.numel(), device=x.device)
            buffer = rows.new_zeros(order.numel() + E * (align - 1), x.shape[1]).index_copy(0, slot, rows)
            out_rows = self.bank(buffer, padded.cumsum(0))
            out_rows = out_rows.index_select(0, slot)
        pairs = _GatherRows.apply(out_rows, rank, order, 1).view(n_tokens, k, -1)
        return (pairs * weights.to(x.dtype)[..., None]).sum(dim=1)


# ----- the expert MLP of other families (GPT-NeoX's 2-layer GELU MLP, biases) -----
def looped_expert_mlp(rows: torch.Tensor, group_end: torch.Tensor, ffn: MixtureOfFFN) -> torch.Tensor:
    """`MixtureOfFFN.bank` for the non-default MLP forms: one product per expert (imported
    families are fine-tuned, not benchmarked; the SwiGLU bank keeps the grouped kernel)."""
    dtype = _matmul_dtype(rows)
    rows = rows.to(dtype)
    ends = group_end.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)] + [rows.shape[0] - ends[-1]]
    *blocks, padding = rows.split(sizes)
    outputs = [expert_mlp(block, ffn, e) for e, block in enumerate(blocks)]
    return torch.cat(outputs + [padding.new_zeros(padding.shape[0], ffn.w_down.shape[1])])


def expert_mlp(x: torch.Tensor, ffn: MixtureOfFFN, e: int) -> torch.Tensor:
    """Expert e: SwiGLU, or act(x W_up^T + b_up) W_down^T + b_down with act = GELU (exact or tanh)."""
    dtype = x.dtype

    def linear(weight, bias):
        return F.linear(x, weight[e].to(dtype), None if bias is None else bias[e].to(dtype))

    if ffn.w_gate is not None:
        hidden = F.silu(linear(ffn.w_gate, ffn.b_gate)) * linear(ffn.w_up, ffn.b_up)
    else:
        approximate = "tanh" if ffn.config.ffn_activation == "gelu_tanh" else "none"
        hidden = F.gelu(linear(ffn.w_up, ffn.b_up), approximate=approximate)
    bias = None if ffn.b_down is None else ffn.b_down[e].to(dtype)
    return F.linear(hidden, ffn.w_down[e].to(dtype), bias)
