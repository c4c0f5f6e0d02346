"""The fused RoPE (`apply_rope`) against the plain formula, inside the attention bank's fwd+bwd.

    .venv/bin/python benchmarks/bench_rope.py [--experts 4] [--malloc default]

The plain formula (chunk, four products, cat) leaves autograd many memory passes and
allocations; the fused one makes four passes each way. Both run in the same bank, dense and
E experts, interleaved; the last line also gives Expert-KV over E x dense with each RoPE.
"""

from __future__ import annotations

import torch
from harness import (
    base_parser,
    forward_backward,
    median_ms,
    paired_ratio,
    print_header,
    print_table,
    time_interleaved,
)

import bam_lightning.model.attention as attention_module
from bam_lightning import ModelConfig
from bam_lightning.model.layers import apply_rope, rope_tables


def plain_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print_header(f"Attention bank fwd+bwd with fused vs plain RoPE (d_model {args.d_model}, {args.heads} heads, "
                 f"seq {args.seq}, batch {args.batch})", args)
    torch.manual_seed(0)
    shape = dict(d_model=args.d_model, n_head=args.heads, max_seq_len=args.seq)
    banks = {"dense": ModelConfig(**shape),
             f"expert_kv E={args.experts}": ModelConfig(**shape, n_experts=args.experts, attn_experts=args.experts)}
    h = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True, device=args.device)
    grad = torch.randn_like(h)
    cos, sin = rope_tables(args.seq, args.d_model // args.heads, 10000.0, h.device, h.dtype)

    def layer(bank, rope):
        def run(t):
            attention_module.apply_rope = rope  # the name the bank calls
            return bank(t, cos, sin)[0]
        return run

    cases = {}
    for name, config in banks.items():
        bank = attention_module.MixtureOfAttention(config)
        bank.reset_parameters()
        bank.to(args.device)
        for rope_name, rope in (("fused", apply_rope), ("plain", plain_rope)):
            cases[(name, rope_name)] = forward_backward(layer(bank, rope), h, grad, [h, *bank.parameters()])
    times = time_interleaved(cases, args.rounds, args.warmup)
    attention_module.apply_rope = apply_rope
    print_table(["bank", "plain ms", "fused ms", "fused/plain"],
                [[name, f"{median_ms(times[(name, 'plain')]):.0f}", f"{median_ms(times[(name, 'fused')]):.0f}",
                  paired_ratio(times[(name, "fused")], times[(name, "plain")])] for name in banks])
    mixture = f"expert_kv E={args.experts}"
    for rope_name in ("fused", "plain"):
        e_dense = [args.experts * t for t in times[("dense", rope_name)]]
        print(f"# expert_kv/(E x dense) with {rope_name} RoPE: {paired_ratio(times[(mixture, rope_name)], e_dense):.3f}")


if __name__ == "__main__":
    main()
