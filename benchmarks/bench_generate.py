"""Generation with the KV cache: prefill and decode tokens/s, cache bytes, and transformers' generate().

    .venv/bin/python benchmarks/bench_generate.py [--shapes tiny d512] [--experts 4] [--device cuda]

Tables (fp32, greedy, random weights: speed does not depend on what the weights say):
1. Per model kind (dense, BTX, BAM Expert-KV, BAM Shared-KV) and batch (1, 8): prefill tokens/s
   (a `--prompt`-token prompt through the cached forward), decode tokens/s (`--new-tokens` steps of
   one token per row through the cache, the loop `generate()` runs) and KV-cache bytes per token.
2. Long context (`--long-context` cached tokens, d512 shape): decode tokens/s of Expert-KV and
   Shared-KV, whose cache is 1/E the bytes, so every decode step reads E times less K/V.
3. Against Hugging Face transformers' `generate()` on the same dense weights (a sequential-block
   dense model, exported to a LlamaForCausalLM with `bam_lightning.interop.export_hf`), batch 1:
   both end to end, prompt + new tokens, greedy; ratio > 1 means ours is faster.
Candidates of one table are timed interleaved (benchmarks/harness.py), one call of each per round.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from harness import (  # benchmarks/harness.py, beside this script
    CoTenantLoad,
    base_parser,
    paired_ratio,
    print_header,
    print_table,
    ratio_quartiles,
    time_interleaved,
)

from bam_lightning import ModelConfig
from bam_lightning.checkpoint import save_safetensors
from bam_lightning.generate import generate
from bam_lightning.model import GPT

SHAPES = {  # the tiny study's shape; a 512-wide one (BPE-sized vocabulary, long context)
    "tiny": dict(vocab_size=257, n_layer=4, d_model=128, n_head=4, d_ff=384, max_seq_len=2048),
    "d512": dict(vocab_size=8192, n_layer=8, d_model=512, n_head=8, d_ff=1536, max_seq_len=2048),
}


def kinds(E: int) -> dict[str, dict]:
    return {"dense": {}, "btx": dict(n_experts=E), "bam_expert_kv": dict(n_experts=E, attn_experts=E),
            "bam_shared_kv": dict(n_experts=E, attn_experts=E, attn_shared_kv=True)}


def build(shape: str, mixture: dict, device: str, layout: str = "parallel") -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(**SHAPES[shape], **mixture, block_layout=layout, router_init_std=0.5)
    return GPT(config).to(device).eval()


def prompt_tokens(model: GPT, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    return idx.to(model.tok_emb.weight.device)


def prefill_call(model: GPT, idx: torch.Tensor):
    @torch.inference_mode()
    def run() -> None:
        model(idx, cache=model.new_cache(idx.shape[0], idx.shape[1]), last_only=True)
    return run


def decode_call(model: GPT, idx: torch.Tensor, new_tokens: int):
    """`new_tokens` greedy steps from a cache prefilled once with `idx`; each call rewinds the
    cache to the prompt (an unpadded cache is its length and positions; the K/V beyond are
    simply overwritten), so rounds time decoding alone, at the same context length."""
    B, P = idx.shape
    cache = model.new_cache(B, P + new_tokens)
    with torch.inference_mode():
        first = model(idx, cache=cache, last_only=True)[0][:, -1].argmax(-1)

    @torch.inference_mode()
    def run() -> None:
        cache.length = P
        cache.next_position.fill_(P)
        token = first
        for _ in range(new_tokens):
            token = model(token[:, None], cache=cache, last_only=True)[0][:, -1].argmax(-1)
    return run, cache


def kinds_table(args) -> None:
    for shape in args.shapes:
        models = {name: build(shape, mixture, args.device) for name, mixture in kinds(args.experts).items()}
        rows = []
        with CoTenantLoad() as load:
            for batch in args.batches:
                idx = {name: prompt_tokens(m, batch, args.prompt) for name, m in models.items()}
                cases, caches = {}, {}
                for name, model in models.items():
                    cases[f"{name} prefill"] = prefill_call(model, idx[name])
                    cases[f"{name} decode"], caches[name] = decode_call(model, idx[name], args.new_tokens)
                times = time_interleaved(cases, args.rounds, args.warmup)
                for name in models:
                    prefill = sorted(times[f"{name} prefill"])[len(times[f"{name} prefill"]) // 2]
                    decode = sorted(times[f"{name} decode"])[len(times[f"{name} decode"]) // 2]
                    rows.append([shape, name, batch, f"{batch * args.prompt / prefill:,.0f}",
                                 f"{batch * args.new_tokens / decode:,.0f}",
                                 f"{caches[name].bytes_per_token():,}",
                                 paired_ratio(times[f"{name} decode"], times["dense decode"])])
                print(f"#   {shape} batch {batch} done", file=sys.stderr)
        print(f"\n## {shape}: prompt {args.prompt} tokens, {args.new_tokens} decode steps, E={args.experts}")
        print_table(["shape", "model", "batch", "prefill tok/s", "decode tok/s", "KV bytes/token",
                     "decode time / dense"], rows)
        print(f"# {load.summary()}")


def long_context_table(args) -> None:
    shape, E, L = args.long_shape, args.experts, args.long_context
    names = ["dense", "bam_expert_kv", "bam_shared_kv"]
    models = {name: build(shape, kinds(E)[name], args.device) for name in names}
    rows = []
    with CoTenantLoad() as load:
        for batch in args.batches:
            cases, caches = {}, {}
            for name, model in models.items():
                cases[name], caches[name] = decode_call(model, prompt_tokens(model, batch, L), args.new_tokens)
            times = time_interleaved(cases, args.rounds, args.warmup)
            for name in names:
                decode = sorted(times[name])[len(times[name]) // 2]
                rows.append([name, batch, f"{caches[name].bytes() / 2**20:,.0f}",
                             f"{batch * args.new_tokens / decode:,.1f}",
                             paired_ratio(times[name], times["bam_expert_kv"])])
            print(f"#   long context batch {batch} done", file=sys.stderr)
            spread = ratio_quartiles(times["bam_shared_kv"], times["bam_expert_kv"])
            rows[-1][-1] = f"{rows[-1][-1]:.3f} ({spread})"
    print(f"\n## Long context, {shape}: {L} cached tokens, {args.new_tokens} decode steps, E={E}")
    print_table(["model", "batch", "KV cache MiB", "decode tok/s", "decode time / Expert-KV (quartiles)"], rows)
    print(f"# {load.summary()}")


def transformers_table(args) -> None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("\n## transformers: not installed (pip install -e '.[bench]'); column skipped")
        return
    try:
        from bam_lightning.interop import export_hf
    except ImportError:
        print("\n## transformers: needs bam_lightning.interop (export_hf, not merged yet); column skipped")
        return
    rows = []
    with CoTenantLoad() as load, tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            ours = build(shape, {}, "cpu", layout="sequential")  # a Llama is our sequential dense GPT
            src = Path(tmp) / f"{shape}.safetensors"
            save_safetensors(ours.state_dict(), ours.config, src, tokenizer="byte")
            out = export_hf(src, Path(tmp) / f"{shape}_hf", progress=False)
            hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(args.device).eval()
            ours = ours.to(args.device)
            idx = prompt_tokens(ours, 1, args.prompt)
            n = args.new_tokens
            hf_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            @torch.inference_mode()
            def run_hf(hf=hf, idx=idx, kwargs=hf_kwargs):
                return hf.generate(idx, attention_mask=torch.ones_like(idx), **kwargs)[0, idx.shape[1]:].tolist()

            def run_ours(ours=ours, idx=idx, n=n):
                return generate(ours, idx.tolist(), n)[0]

            same = run_hf() == run_ours()
            times = time_interleaved({"ours": run_ours, "hf": run_hf}, args.rounds, args.warmup)
            median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            rows.append([shape, f"{n / median['ours']:,.1f}", f"{n / median['hf']:,.1f}",
                         f"{paired_ratio(times['hf'], times['ours']):.3f} ({ratio_quartiles(times['hf'], times['ours'])})",
                         "yes" if same else "NO"])
            print(f"#   transformers {shape} done", file=sys.stderr)
    print(f"\n## Against transformers generate(), dense sequential (LlamaForCausalLM), fp32, batch 1, "
          f"prompt {args.prompt} + {args.new_tokens} new tokens, end to end")
    print_table(["shape", "ours tok/s", "transformers tok/s", "ours/transformers speed (quartiles)",
                 "same tokens"], rows)
    print(f"# {load.summary()}")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--experts", type=int, default=4, help="E for the mixtures (default 4)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per timed call (default 32)")
    parser.add_argument("--long-shape", choices=list(SHAPES), default="d512")
    parser.add_argument("--long-context", type=int, default=1536,
                        help="cached tokens for the long-context table; 0 skips it (default 1536)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.set_defaults(rounds=5, warmup=1)
    args = parser.parse_args()
    print_header("Generation with the KV cache (fp32, greedy)", args)
    kinds_table(args)
    if args.long_context:
        long_context_table(args)
    if not args.skip_transformers:
        transformers_table(args)


if __name__ == "__main__":
    main()
