"""The chunked CPU attention (bam_lightning/model/short_attention.py) against SDPA, fwd+bwd.

    .venv/bin/python benchmarks/bench_attention_kernel.py [--seqs 64 128 256 512] [--heads 4 16] [--head-dim 32]

Causal attention on [batch, heads, T, head_dim] tensors laid out as the attention bank makes them
(a transposed view of one [batch, T, heads * head_dim] projection), with the batch chosen so
that every setting holds --tokens tokens. Both kernels run interleaved, one call each per round;
the ratio is the median of the per-round ratios (below 1: the chunked kernel is faster). This is
what `MAX_SEQ_LEN` was chosen from: the chunked kernel runs in training up to that length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from harness import (
    base_parser,
    forward_backward,
    median_ms,
    paired_ratio,
    print_header,
    print_table,
    ratio_quartiles,
    time_interleaved,
)

from bam_lightning.model import short_attention


def attention_case(kernel, batch: int, heads: int, seq: int, head_dim: int, device: str):
    """One fwd+bwd of `kernel` from the projections' layout, as the bank calls it."""
    projections = [torch.randn(batch, seq, heads * head_dim, device=device, requires_grad=True) for _ in range(3)]
    grad = torch.randn(batch, heads, seq, head_dim, device=device)

    def layer(q_projection: torch.Tensor) -> torch.Tensor:
        q, k, v = (p.view(batch, seq, heads, head_dim).transpose(1, 2)
                   for p in (q_projection, *projections[1:]))
        return kernel(q, k, v)
    return forward_backward(layer, projections[0], grad, projections)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 16],
                        help="query heads per layer: 4 is the tiny seed, 16 its BAM mixture (4 experts)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call (batch x seq)")
    parser.add_argument("--chunk-bytes", type=int, nargs="+", default=[short_attention.CHUNK_BYTES],
                        help="the chunked kernel's score bytes per chunk; several: one chunked column each")
    args = parser.parse_args()
    print_header(f"Causal attention fwd+bwd, chunked bmm vs SDPA (head_dim {args.head_dim}, "
                 f"{args.tokens} tokens per call; training runs chunked up to T {short_attention.MAX_SEQ_LEN})", args)
    torch.manual_seed(0)
    settings = [(seq, heads) for seq in args.seqs for heads in args.heads]
    cases = {}
    for seq, heads in settings:
        batch = max(1, args.tokens // seq)
        cases[(seq, heads, "sdpa")] = attention_case(sdpa, batch, heads, seq, args.head_dim, args.device)
        for chunk_bytes in args.chunk_bytes:
            cases[(seq, heads, chunk_bytes)] = attention_case(with_chunk_bytes(chunk_bytes), batch, heads, seq,
                                                              args.head_dim, args.device)
    times = time_interleaved(cases, args.rounds, args.warmup)
    rows = []
    for seq, heads in settings:
        sdpa_times = times[(seq, heads, "sdpa")]
        for chunk_bytes in args.chunk_bytes:
            chunked = times[(seq, heads, chunk_bytes)]
            rows.append([seq, heads, f"{chunk_bytes / 2**20:g}", f"{median_ms(sdpa_times):.1f}",
                         f"{median_ms(chunked):.1f}", paired_ratio(chunked, sdpa_times),
                         ratio_quartiles(chunked, sdpa_times)])
    print_table(["T", "heads", "chunk MiB", "SDPA ms", "chunked ms", "chunked/SDPA", "quartiles"], rows)


def with_chunk_bytes(chunk_bytes: int):
    def kernel(q, k, v):
        saved, short_attention.CHUNK_BYTES = short_attention.CHUNK_BYTES, chunk_bytes
        try:  # the backward reads the chunk size the forward saved
            return short_attention.chunked_causal_attention(q, k, v)
        finally:
            short_attention.CHUNK_BYTES = saved
    return kernel


if __name__ == "__main__":
    main()
