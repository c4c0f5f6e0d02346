"""Soft mixture of attention forward + backward against E times one dense attention.

    .venv/bin/python benchmarks/bench_attention.py [--experts 4] [--dtypes fp32 bf16] [--device cuda]

Every token goes through every attention expert (BAM's soft routing), so the natural yardstick
is E dense attentions. Columns (time over E x dense, lower is better):
- expert_kv: `MixtureOfAttention`, each expert with its own Q, K, V, O.
- shared_kv: one K/V shared by all experts (BAM Shared-KV); also shown over expert_kv.
- loop: the plain way, each expert's attention (SDPA) run one after the other, outputs gated.
bf16 runs under `torch.autocast` (fp32 weights, bf16 matmuls). Weights are initialised on the
CPU and then moved, so every device times the same weights.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from harness import (  # benchmarks/harness.py, beside this script
    DTYPES,
    CoTenantLoad,
    base_parser,
    forward_backward,
    median_ms,
    paired_ratio,
    print_header,
    print_table,
    ratio_quartiles,
    time_interleaved,
)

from bam_lightning import ModelConfig
from bam_lightning.model.attention import MixtureOfAttention
from bam_lightning.model.layers import apply_rope, rope_tables


def expert_loop(attn: MixtureOfAttention, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One dense attention per expert, one after the other, each output scaled by its gate."""
    B, T, d = h.shape
    H, hd = attn.config.n_head, attn.config.head_dim
    gates = attn.gates(h)
    out = torch.zeros_like(h)
    for e in range(attn.wq.shape[0]):
        kv = 0 if attn.wk.shape[0] == 1 else e
        q, k, v = ((h @ w.T).view(B, T, H, hd).transpose(1, 2) for w in (attn.wq[e], attn.wk[kv], attn.wv[kv]))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        out = out + gates[..., e, None].to(o.dtype) * (o @ attn.wo[e].T)
    return out


def bench_one(E: int, args, autocast: bool, spreads: list[str]) -> list[object]:
    torch.manual_seed(0)
    shape = dict(d_model=args.d_model, n_head=args.heads, max_seq_len=args.seq)
    modules = {
        "dense": MixtureOfAttention(ModelConfig(**shape)),
        "expert_kv": MixtureOfAttention(ModelConfig(**shape, n_experts=E, attn_experts=E)),
        "shared_kv": MixtureOfAttention(ModelConfig(**shape, n_experts=E, attn_experts=E, attn_shared_kv=True)),
    }
    for module in modules.values():
        module.reset_parameters()
    modules = {name: module.to(args.device) for name, module in modules.items()}
    h = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True, device=args.device)
    grad = torch.randn_like(h)
    cos, sin = rope_tables(args.seq, args.d_model // args.heads, 10000.0, h.device, h.dtype)
    layers = {name: lambda t, m=m: m(t, cos, sin)[0] for name, m in modules.items()}
    layers["loop"] = lambda t: expert_loop(modules["expert_kv"], t, cos, sin)
    params = [h, *(p for m in modules.values() for p in m.parameters())]

    with torch.no_grad():
        mismatch = (layers["expert_kv"](h) - layers["loop"](h)).abs().max().item()
    times = time_interleaved({name: forward_backward(layer, h, grad, params, args.device if autocast else None)
                              for name, layer in layers.items()}, args.rounds, args.warmup)
    e_dense = [E * t for t in times["dense"]]
    print(f"#   E={E} done", file=sys.stderr)
    spreads.append(f"# E={E}, quartiles of the {len(e_dense)} per-round ratios: expert_kv/(E x dense) "
                   f"{ratio_quartiles(times['expert_kv'], e_dense)}; shared_kv/expert_kv "
                   f"{ratio_quartiles(times['shared_kv'], times['expert_kv'])}")
    return [E, f"{median_ms(times['dense']):.0f}", f"{median_ms(e_dense):.0f}",
            f"{median_ms(times['expert_kv']):.0f}", paired_ratio(times["expert_kv"], e_dense),
            f"{median_ms(times['shared_kv']):.0f}", paired_ratio(times["shared_kv"], e_dense),
            paired_ratio(times["shared_kv"], times["expert_kv"]), paired_ratio(times["loop"], e_dense),
            f"{mismatch:.1e}"]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32"])
    # Per-round ratios spread by +-10% on a shared 2-vCPU machine; 15 rounds keep the median's
    # error near the 2% that the Expert-KV target leaves.
    parser.set_defaults(rounds=15)
    args = parser.parse_args()
    print_header(f"Mixture of attention fwd+bwd vs E x dense (d_model {args.d_model}, {args.heads} heads, "
                 f"seq {args.seq}, batch {args.batch}, soft routing)", args)
    for dtype_name in args.dtypes:
        autocast = dtype_name == "bf16"
        print(f"\n## {dtype_name}{' (autocast: fp32 weights, bf16 matmuls)' if autocast else ''}")
        with CoTenantLoad() as load:
            spreads: list[str] = []
            rows = [bench_one(E, args, autocast, spreads) for E in args.experts]
        print_table(["E", "dense ms", "E x dense ms", "expert_kv ms", "expert_kv/(E x dense)", "shared_kv ms",
                     "shared_kv/(E x dense)", "shared_kv/expert_kv", "loop/(E x dense)", "max|expert_kv-loop|"], rows)
        print("\n".join(spreads))
        print(f"# {load.summary()}")


if __name__ == "__main__":
    main()
