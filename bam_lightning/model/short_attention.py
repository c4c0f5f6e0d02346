"""Causal attention for short sequences on CPU, as chunked batched matrix products.

torch's CPU flash-attention kernel tiles the queries in blocks of 32 rows and recomputes the
scores in its backward. At short sequences and small heads that kernel gains little from a second
thread (the tiny study's shapes, T 128, head size 32, 16 heads: 53 ms at one thread, 46 ms at
two), and a BAM layer sends four times the dense layer's heads through it (every attention expert,
soft-routed). Here the whole score matrix of a few heads at a time is one `baddbmm` (scores plus
the causal mask), one softmax and one `bmm`, in chunks of heads whose scores fill about 2 MiB,
and the probabilities are kept for the backward instead of recomputed. Batched products use both
threads: at 2 threads this kernel's forward+backward takes 0.63-0.80x SDPA's time at T 64-128,
head size 32, over two days' runs (0.89x at head size 64); at one thread the two are level
(0.97-1.05x), so one thread keeps SDPA (`benchmarks/bench_attention_kernel.py`,
benchmarks/README.md).

The kept probabilities cost T * 4 bytes per token and head (512 bytes at T 128, four times a
query of head size 32), which is why the kernel stops at `MAX_SEQ_LEN`: at T 256 it was
faster at head size 32 in one run (0.82-0.85x; level in the next) and level at head size 64
(0.97-0.99x), for twice the memory.

`causal_attention` picks the kernel (`attention_kernel`); `last_attention_kernel()` says which
ran last, for the benchmarks. Grouped-query attention (Shared-KV, or a GQA seed) folds the query
heads that share a K/V head into one taller product, the layout SDPA's `enable_gqa` assumes
(query head i reads K/V head i // (query heads / K/V heads)).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

SDPA = "sdpa"
CHUNKED = "chunked bmm"
MAX_SEQ_LEN = 128  # longest sequence the chunked kernel runs (see above)
CHUNK_BYTES = 2 ** 21  # scores per chunk: 1-2 MiB measured best at 2 threads, 0.25-0.5 MiB slower
_DTYPES = (torch.float32, torch.float64)  # bf16 keeps SDPA: its softmax would round the scores
_last_kernel: str | None = None
_sdpa_only = False


def attention_kernel(q: torch.Tensor, k: torch.Tensor) -> str:
    """CHUNKED for a training forward on CPU in fp32/fp64 (no autocast) at two or more threads with
    at most MAX_SEQ_LEN queries and keys each; SDPA otherwise (GPU, bf16, one thread, long
    sequences, and without autograd, where SDPA's forward keeps no scores)."""
    if (_chunked_on(q.device.type, q.dtype) and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and q.shape[-2] <= MAX_SEQ_LEN and k.shape[-2] == q.shape[-2]):
        return CHUNKED
    return SDPA


def training_attention_kernel(device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernels a training forward on `device` in `dtype` (the autocast dtype under mixed
    precision) uses at this process's thread count, in words: what a fit logs."""
    if _chunked_on(torch.device(device).type, dtype):
        return f"{CHUNKED} for sequences up to {MAX_SEQ_LEN} tokens, {SDPA} beyond and in validation"
    return SDPA


def _chunked_on(device_type: str, dtype: torch.dtype) -> bool:
    return not _sdpa_only and device_type == "cpu" and dtype in _DTYPES and torch.get_num_threads() > 1


@contextlib.contextmanager
def sdpa_only():
    """Every causal attention inside runs SDPA: the benchmarks' side-by-side rows and the tests'
    reference."""
    global _sdpa_only
    saved, _sdpa_only = _sdpa_only, True
    try:
        yield
    finally:
        _sdpa_only = saved


def last_attention_kernel() -> str | None:
    """The kernel of the latest causal attention in this process (None before the first)."""
    return _last_kernel


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v for q [B, Hq, T, hd], k and v [B, Hkv, T, hd],
    Hq a multiple of Hkv; the result is [B, Hq, T, hd], as SDPA's."""
    global _last_kernel
    _last_kernel = kernel = attention_kernel(q, k)
    if kernel == SDPA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return chunked_causal_attention(q, k, v)


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The chunked kernel whatever the sequence length (benchmarks/bench_attention_kernel.py times it
    beyond MAX_SEQ_LEN); shapes as `causal_attention`'s."""
    B, Hq, T, hd = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    # [B * Hkv, group * T, hd]: the query heads of one K/V head stacked along the rows
    out = _ChunkedCausal.apply(q.reshape(B * Hkv, group * T, hd), k.reshape(B * Hkv, T, hd),
                               v.reshape(B * Hkv, T, hd), group)
    return out.view(B, Hq, T, hd)


def _causal_bias(T: int, group: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[group * T, T]: 0 where row t % T may see column s (s <= t % T), -inf elsewhere."""
    bias = torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)
    return bias.repeat(group, 1) if group > 1 else bias


class _ChunkedCausal(torch.autograd.Function):
    """q [N, R, hd] (R = group * T rows), k, v [N, T, hd]; chunks over N."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
        N, R, hd = q.shape
        T = k.shape[1]
        scale = 1 / math.sqrt(hd)
        step = max(1, CHUNK_BYTES // (R * T * q.element_size()))
        bias = _causal_bias(T, group, q.dtype, q.device)
        probs = torch.empty(N, R, T, dtype=q.dtype, device=q.device)
        out = torch.empty(N, R, hd, dtype=q.dtype, device=q.device)
        for s in range(0, N, step):
            e = min(N, s + step)
            scores = torch.baddbmm(bias, q[s:e], k[s:e].transpose(1, 2), alpha=scale)
            torch.softmax(scores, dim=-1, out=probs[s:e])
            torch.bmm(probs[s:e], v[s:e], out=out[s:e])
        ctx.save_for_backward(q, k, v, probs, out)
        ctx.scale, ctx.step = scale, step
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, probs, out = ctx.saved_tensors
        grad = grad.contiguous()
        N = q.shape[0]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for s in range(0, N, ctx.step):
            e = min(N, s + ctx.step)
            p, g = probs[s:e], grad[s:e]
            torch.bmm(p.transpose(1, 2), g, out=dv[s:e])
            # d scores = P * (dP - rowsum(dO * O)), with dP = dO V^T (softmax's backward)
            d_scores = torch.bmm(g, v[s:e].transpose(1, 2)).sub_((g * out[s:e]).sum(-1, keepdim=True)).mul_(p)
            torch.bmm(d_scores, k[s:e], out=dq[s:e]).mul_(ctx.scale)
            torch.bmm(d_scores.transpose(1, 2), q[s:e], out=dk[s:e]).mul_(ctx.scale)
        return dq, dk, dv, None
