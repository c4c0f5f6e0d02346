"""SwiGLU FFN as a bank of E experts with a top-k router (E = 1, no router: the dense FFN).

Routing follows BAM_SPEC.md: softmax over *all* experts before top-k and no renormalisation (the
paper's choice; with k = 1 the LM loss still reaches the router through p_top), or renormalised
top-k (original BTX). Dropless: every token reaches its k experts.

Speed (benchmarks/bench_ffn.py): the (token, slot) pairs are sorted by expert once and gathered
in that order (one gather) so that each expert reads one contiguous block of rows, the whole bank
runs as one grouped matrix product per projection, each row's gate multiplies its hidden
activation before the down projection, and the gated rows are gathered back and summed over the
k slots (one gather). Padding rows only where the kernel gains from it (`row_alignment`), and no
host reads on the grouped path (CUDA never waits). The dense FFN is the one-group case of the
same code, so dense and one-expert mixtures agree bit for bit.

Which grouped kernel runs depends on the torch build, the device and the dtype (`ffn_kernel`):
`torch.nn.functional.grouped_mm` where it takes that dtype on that device, `torch._grouped_mm`
for bf16 on CUDA where the public name is missing, otherwise one product per expert (float64,
fp32 on CUDA, older torch). `last_ffn_kernel()` says which one the latest forward used.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


def row_alignment(device: torch.device | str, dtype: torch.dtype) -> int:
    """Rows per expert are padded to a multiple of this where the kernel gains from it. bf16/fp16
    matmuls on AMX CPUs (oneDNN) were measured to pay a large one-off cost for every new row count,
    and routed row counts change every step; multiples of 64 keep the set of shapes small. On an
    AVX-512-bf16 CPU without AMX padding cost 6% (benchmarks/README.md); CUDA's grouped kernel
    takes any row count; fp32 padding only costs time: no padding there."""
    half = dtype.itemsize < 4
    return 64 if torch.device(device).type == "cpu" and half and _cpu_has_amx() else 1


@functools.cache
def _cpu_has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul would run in: autocast does not convert grouped_mm, so we do."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(device)
    return x.dtype


def grouped_swiglu(rows: torch.Tensor, group_end: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Expert e's SwiGLU on rows[group_end[e-1]:group_end[e]]; rows [N, d], weights [E, ...].

    `row_scale` [N] (the router's gates) multiplies each row's hidden activation before the down
    projection: the output is then already gated, and the combine is a plain gather.
    Rows after group_end[-1] are not computed (the caller never reads them). `group_end` stays on
    the device: with a grouped kernel nothing waits for the host.
    """
    global _last_kernel
    dtype = _matmul_dtype(rows)
    rows = rows.to(dtype)
    w_gate, w_up, w_down = w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)
    _last_kernel = kernel = ffn_kernel(rows.device, dtype)
    if kernel == LOOP:
        return _looped_swiglu(rows, group_end, w_gate, w_up, w_down, row_scale)
    grouped_mm = F.grouped_mm if kernel == "F.grouped_mm" else torch._grouped_mm
    offs = group_end.to(torch.int32)
    hidden = F.silu(grouped_mm(rows, w_gate.transpose(1, 2), offs=offs))
    hidden = hidden * grouped_mm(rows, w_up.transpose(1, 2), offs=offs)
    if row_scale is not None:
        hidden = hidden * row_scale.to(dtype)[:, None]
    return _ContiguousGrad.apply(grouped_mm(hidden, w_down.transpose(1, 2), offs=offs))


def _looped_swiglu(rows: torch.Tensor, group_end: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The same without a grouped kernel (dtype, device or torch version): one product per expert.

    `unbind` rather than `w[e]`: each `w[e]` would build a full [E, ...] zero gradient in backward.
    Empty experts still run (on zero rows), so every parameter joins the graph (DDP). The one
    host read (`tolist`, the block sizes) is what a loop over experts needs.
    """
    ends = group_end.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)] + [rows.shape[0] - ends[-1]]
    *blocks, padding = rows.split(sizes)
    scales = row_scale.to(rows.dtype).split(sizes)[:-1] if row_scale is not None else [None] * len(blocks)
    outputs = [_scaled_swiglu(block, g, u, d, scale) for block, g, u, d, scale
               in zip(blocks, w_gate.unbind(), w_up.unbind(), w_down.unbind(), scales, strict=True)]
    return torch.cat(outputs + [padding.new_zeros(padding.shape[0], w_down.shape[1])])


def _scaled_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   scale: torch.Tensor | None) -> torch.Tensor:
    """`swiglu` with each row's hidden activation multiplied by `scale` [N] before the down projection."""
    hidden = F.silu(x @ w_gate.T) * (x @ w_up.T)
    if scale is not None:
        hidden = hidden * scale[:, None]
    return hidden @ w_down.T


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward rejects
    broadcast ones, such as the gradient of `out.sum()`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class Dispatch(NamedTuple):
    """Where each (token, slot) pair goes in the expert-ordered row buffer; pair p = token * k + slot.

    A buffer row either holds one pair or is padding (its expert's block rounded up to
    `row_alignment`): padding rows read token 0 and get gate 0, so they add nothing forward or
    backward. Everything stays on the device; only the padded path (CPUs) reads its size.
    """

    position: torch.Tensor  # [P] the buffer row of each pair
    row_token: torch.Tensor  # [R] the token each buffer row reads (0 for padding)
    row_pair: torch.Tensor  # [R] the pair each buffer row holds (P for padding)
    group_end: torch.Tensor  # [E] int32: the end of each expert's block of rows


def dispatch(idx: torch.Tensor, n_experts: int, align: int) -> Dispatch:
    """Sort the pairs by expert (one stable sort) and place each expert's block, rounded up to a
    multiple of `align` rows. No bincount: on CUDA it reads its maximum back to the host."""
    n_tokens, k = idx.shape
    flat = idx.reshape(-1)
    n_pairs = flat.numel()
    expert, order = flat.sort(stable=True)  # sorted row i holds pair order[i]
    group_end = torch.searchsorted(expert, torch.arange(1, n_experts + 1, device=idx.device))
    sorted_rows = torch.arange(n_pairs, device=idx.device)
    if align == 1:
        position = torch.empty_like(order).scatter_(0, order, sorted_rows)
        return Dispatch(position, order // k, order, group_end.to(torch.int32))
    counts = torch.diff(group_end, prepend=group_end.new_zeros(1))
    padded_end = ((counts + align - 1) // align * align).cumsum(0)
    shift = padded_end - group_end  # how far padding before and within e's block moves its rows ...
    shift = torch.cat((shift.new_zeros(1), shift[:-1]))  # ... counted before the block starts
    sorted_position = sorted_rows + shift[expert]
    # The buffer ends where the last block does: one host read, on the CPU (the only device that
    # pads), where it costs no wait; rows past the last block would be left uncomputed garbage.
    n_rows = int(padded_end[-1])
    row_pair = torch.full((n_rows,), n_pairs, dtype=order.dtype, device=idx.device).index_copy_(
        0, sorted_position, order)
    position = torch.empty_like(order).scatter_(0, order, sorted_position)
    row_token = torch.where(row_pair < n_pairs, row_pair // k, 0)
    return Dispatch(position, row_token, row_pair, padded_end.to(torch.int32))


class _GatherRows(torch.autograd.Function):
    """rows = x[plan.row_token]: each token copied to its k buffer rows (padding reads token 0).
    Its backward is `_SumPairs`'s forward, a gather and a sum over k: autograd's own backward for
    a gather is a scatter-add, several times slower on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: Dispatch, k: int) -> torch.Tensor:
        ctx.plan, ctx.k = plan, k
        return x.index_select(0, plan.row_token)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _sum_pairs(grad, ctx.plan.position, ctx.k, grad.dtype), None, None


class _SumPairs(torch.autograd.Function):
    """out[t] = sum over slots of rows[plan.position[t * k + slot]] (the rows come gated), summed
    in `dtype`. Its backward is `_GatherRows`'s forward: every buffer row, padding included,
    reads its token's gradient (padding's meets a zero gate)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, plan: Dispatch, k: int, dtype: torch.dtype) -> torch.Tensor:
        ctx.plan, ctx.rows_dtype = plan, rows.dtype
        return _sum_pairs(rows, plan.position, k, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.rows_dtype).index_select(0, ctx.plan.row_token), None, None, None


def _sum_pairs(rows: torch.Tensor, position: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    pairs = rows.index_select(0, position)
    if k == 1:
        return pairs.to(dtype)
    return pairs.view(-1, k, rows.shape[-1]).sum(dim=1, dtype=dtype)


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

    def bank(self, rows: torch.Tensor, group_end: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e's MLP on rows[group_end[e-1]:group_end[e]], each row's output scaled by
        `row_scale` (see `grouped_swiglu`)."""
        if self.w_gate is not None and self.b_up is None:  # the default SwiGLU without biases
            return grouped_swiglu(rows, group_end, self.w_gate, self.w_up, self.w_down, row_scale=row_scale)
        return looped_expert_mlp(rows, group_end, self, row_scale)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, RouterStats]:
        """Top-k expert indices [N, k], their weights [N, k] and the router's losses/stats."""
        cfg = self.config
        logits, probs = router_probs(self.router, x)
        weights, idx = probs.topk(cfg.ffn_top_k, dim=-1)
        if cfg.ffn_renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        E = probs.shape[-1]
        # Not bincount, which reads its maximum back to the host on CUDA.
        top1_fraction = (idx[:, :1] == torch.arange(E, device=idx.device)).sum(dim=0).to(probs.dtype) / idx.shape[0]
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
            group_end = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
            out = self.bank(x, group_end)
            return out.view(B, T, d), RouterStats()
        idx, weights, stats = self.route(x)
        if self.config.ffn_gate_scale != 1.0:
            weights = self.config.ffn_gate_scale * weights  # on [N, k], not on the [N, d] output
        return self.experts(x, idx, weights).view(B, T, d), stats

    def experts(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Gather the (token, slot) pairs in expert order (one gather), run the bank with each
        row's gate applied to its hidden activation, and gather the gated rows back (one gather,
        summed over the k slots in x's dtype)."""
        n_tokens, k = idx.shape
        dtype = _matmul_dtype(x)
        plan = dispatch(idx, self.w_up.shape[0], row_alignment(x.device, dtype))
        rows = _GatherRows.apply(x.to(dtype), plan, k)  # cast first: bf16 rows move half the bytes
        gates = torch.cat((weights.reshape(-1), weights.new_zeros(1))).index_select(0, plan.row_pair)
        out_rows = self.bank(rows, plan.group_end, row_scale=gates)
        return _SumPairs.apply(out_rows, plan, k, x.dtype)


# ----- the expert MLP of other families (GPT-NeoX's 2-layer GELU MLP, biases) -----
def looped_expert_mlp(rows: torch.Tensor, group_end: torch.Tensor, ffn: MixtureOfFFN,
                      row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`MixtureOfFFN.bank` for the non-default MLP forms: one product per expert (imported
    families are fine-tuned, not benchmarked; the SwiGLU bank keeps the grouped kernel).
    `row_scale` (the gates) multiplies each row's whole output, the down projection's bias
    included, so the gate scales the expert's output as in the SwiGLU bank."""
    dtype = _matmul_dtype(rows)
    rows = rows.to(dtype)
    ends = group_end.tolist()
    sizes = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)] + [rows.shape[0] - ends[-1]]
    *blocks, padding = rows.split(sizes)
    outputs = [expert_mlp(block, ffn, e) for e, block in enumerate(blocks)]
    if row_scale is not None:
        scales = row_scale.to(dtype).split(sizes)[:-1]
        outputs = [out * scale[:, None] for out, scale in zip(outputs, scales, strict=True)]
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
