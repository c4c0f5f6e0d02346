"""AdamW's fused step against the foreach step (torch's default) on a model's parameters.

    .venv/bin/python benchmarks/bench_optimizer.py [--model smollm2|tiny] [--device cuda]

`BaseLM` takes the fused step wherever torch has the kernel (`fused_adamw: null`); this measures
what that buys on the real-seed study's model (SmolLM2-135M's shape, 135M parameters, or its BAM
mixture) and says how far the two updates drift apart after the timed steps (float rounding only).
"""

from __future__ import annotations

import torch
from harness import (
    base_parser,
    median_ms,
    paired_ratio,
    print_header,
    print_table,
    time_interleaved,
)

from bam_lightning import GPT, ModelConfig

SHAPES = {
    "smollm2": dict(vocab_size=49152, n_layer=30, d_model=576, n_head=9, n_kv_head=3, d_ff=1536,
                    max_seq_len=256, tie_embeddings=True, norm="rmsnorm", block_layout="sequential"),
    "tiny": dict(vocab_size=257, n_layer=4, d_model=128, n_head=4, d_ff=384, max_seq_len=128),
}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--experts", type=int, default=1, help="1: the dense model; 4: its BAM mixture")
    args = parser.parse_args()
    shape = dict(SHAPES[args.model])
    if args.experts > 1:
        shape.update(n_experts=args.experts, attn_experts=args.experts)
    torch.manual_seed(0)
    params = {}
    for kind in ("foreach", "fused"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**shape)).to(args.device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        params[kind] = list(model.parameters())
    n = sum(p.numel() for p in params["fused"])
    print_header(f"AdamW step on {args.model} x{args.experts} experts ({n / 1e6:.0f}M parameters)", args)
    optimizers = {kind: torch.optim.AdamW(params[kind], lr=1e-4, weight_decay=0.1, fused=(kind == "fused"),
                                          foreach=(kind == "foreach") or None)
                  for kind in params}
    times = time_interleaved({kind: opt.step for kind, opt in optimizers.items()}, args.rounds, args.warmup)
    drift = max((a - b).abs().max().item() for a, b in zip(params["fused"], params["foreach"], strict=True))
    print_table(["parameters", "foreach ms", "fused ms", "foreach/fused", "max |fused - foreach|"],
                [[f"{n / 1e6:.0f}M", f"{median_ms(times['foreach']):.0f}", f"{median_ms(times['fused']):.0f}",
                  paired_ratio(times["foreach"], times["fused"]), f"{drift:.1e}"]])


if __name__ == "__main__":
    main()
