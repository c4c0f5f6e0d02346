"""FFN mixture forward + backward against a dense SwiGLU of the same active FLOPs.

    .venv/bin/python benchmarks/bench_ffn.py [--experts 4 8] [--top-k 1 2] [--dtypes fp32 bf16] [--device cuda]

Columns (time over the dense reference, lower is better):
- dense: the project's dense FFN (`MixtureOfFFN`, no experts) with hidden size d_ff * k, so it
  does the same matmul FLOPs as k routed experts; it runs the same kernels as the experts.
- bam: `MixtureOfFFN` with E experts, top-k, including routing, dispatch and combine.
- loop: a plain per-expert loop (mask the tokens of expert e, gather, SwiGLU, scatter-add).
- hf: transformers' `MixtralSparseMoeBlock` ("eager" experts), same weights; when importable.
- REV (`--against REV`): `MixtureOfFFN` as `bam_lightning/model/ffn.py` was at git revision REV,
  same weights, timed in the same rounds: the old code against the new, side by side, with the
  largest difference of their outputs on the same input.
- matmul share: from `PROFILED_CALLS` calls of each layer under `torch.profiler` after the timing,
  the part of its time spent in matrix products (the expert GEMMs; the router's, E columns wide,
  is in it too but is negligible) in the call with the least profiled time; the rest is routing,
  gathers, activation and gating. CPU time on the CPU, GPU kernel time on CUDA. One call alone is
  not enough on a 2-core CPU: there the profiler's own thread stalls the elementwise ops of about
  half the profiled calls (a 0.7 ms `mul` taking 9-24 ms), against 4 in 100 unprofiled ones, and
  one dense FFN read 39-91% call to call. Stalls only add time, so the quickest call is the
  undisturbed one. `--profile` prints that call's op table.
bf16 runs under `torch.autocast` (fp32 weights, bf16 matmuls): what `precision="bf16-mixed"` does.
Weights are initialised on the CPU and then moved, so every device times the same weights.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from harness import (  # benchmarks/harness.py, beside this script
    DTYPES,
    CoTenantLoad,
    base_parser,
    forward_backward,
    median_ms,
    native_bf16_matmul,
    paired_ratio,
    print_header,
    print_table,
    ratio_quartiles,
    time_interleaved,
)
from torch.profiler import ProfilerActivity, profile

from bam_lightning import ModelConfig
from bam_lightning.model.ffn import MixtureOfFFN, last_ffn_kernel, swiglu

try:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
except ImportError:
    MixtralSparseMoeBlock = None


def naive_loop(ffn: MixtureOfFFN, x: torch.Tensor) -> torch.Tensor:
    """The textbook per-expert loop over the same router and weights."""
    idx, weights, _ = ffn.route(x)
    out = torch.zeros_like(x)
    for e in range(ffn.w_gate.shape[0]):
        token, slot = (idx == e).nonzero(as_tuple=True)
        y = swiglu(x[token], ffn.w_gate[e], ffn.w_up[e], ffn.w_down[e])
        out = out.index_add(0, token, y * weights[token, slot, None])
    return out


MATMUL_OPS = {"aten::mm", "aten::_grouped_mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
PROFILED_CALLS = 7  # profiled calls per layer; the matmul share is the quickest call's


def profile_step(step, device: str):
    """One call under `torch.profiler`: its per-op averages."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages()


def own_time(device: str):
    """An op's own time: GPU kernel time on CUDA, CPU time elsewhere."""
    return (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)


def matmul_share(events, device: str) -> float:
    """The fraction of one call's profiled time spent in matrix products (self time of the
    matmul ops: on CPU the grouped kernel's per-group GEMMs are `aten::mm` children of it)."""
    own = own_time(device)
    total = sum(own(e) for e in events)
    return sum(own(e) for e in events if e.key in MATMUL_OPS) / total if total else float("nan")


def quickest_profile(step, device: str, calls: int = PROFILED_CALLS) -> list:
    """The per-op averages of the quickest of `calls` profiled calls of `step`: the least
    disturbed (see the module docstring)."""
    own = own_time(device)
    return min((profile_step(step, device) for _ in range(calls)), key=lambda events: sum(own(e) for e in events))


def print_profile(name: str, events, device: str, rows: int = 12) -> None:
    """Where one forward+backward's time goes, op by op (own time, largest first)."""
    own = own_time(device)
    total = sum(own(e) for e in events)
    print(f"# profile of {name}, one forward+backward: {total / 1e3:.1f} ms "
          f"{'of GPU kernels' if device == 'cuda' else 'of CPU time'}")
    for e in sorted(events, key=own, reverse=True)[:rows]:
        if own(e) > 0:
            print(f"#   {e.key[:60]:60s} {own(e) / 1e3:9.2f} ms {own(e) / total:6.1%}  x{e.count}")


def ffn_at_revision(revision: str):
    """`bam_lightning/model/ffn.py` as it was at a git revision, imported as its own module."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:bam_lightning/model/ffn.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"ffn_at_{revision.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_block(ffn: MixtureOfFFN, config: ModelConfig) -> torch.nn.Module:
    hf_config = MixtralConfig(hidden_size=config.d_model, intermediate_size=config.d_ff,
                              num_local_experts=config.n_experts, num_experts_per_tok=config.ffn_top_k)
    hf_config._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(hf_config)
    with torch.no_grad():
        block.gate.weight.copy_(ffn.router.weight)
        block.experts.gate_up_proj.copy_(torch.cat((ffn.w_gate, ffn.w_up), dim=1))
        block.experts.down_proj.copy_(ffn.w_down)
    return block


def bench_one(E: int, k: int, tokens: int, args, autocast: bool, use_hf: bool) -> list[object]:
    torch.manual_seed(0)
    config = ModelConfig(d_model=args.d_model, n_head=8, d_ff=args.d_ff, n_experts=E, ffn_top_k=k)
    bam = MixtureOfFFN(config)
    dense = MixtureOfFFN(ModelConfig(d_model=args.d_model, n_head=8, d_ff=args.d_ff * k))
    bam.reset_parameters()
    dense.reset_parameters()
    bam, dense = bam.to(args.device), dense.to(args.device)
    layers = {"dense": lambda t: dense(t[None])[0][0], "bam": lambda t: bam(t[None])[0][0],
              "loop": lambda t: naive_loop(bam, t)}
    extra = []
    if use_hf:
        hf = hf_block(bam, config).to(args.device)
        layers["hf"] = lambda t: hf(t[None])[0]
        extra += list(hf.parameters())
    if args.old_ffn is not None:
        old = args.old_ffn.MixtureOfFFN(config).to(args.device)
        old.load_state_dict(bam.state_dict())
        layers["old"] = lambda t: old(t[None])[0][0]
        extra += list(old.parameters())
    x = torch.randn(tokens, args.d_model, requires_grad=True, device=args.device)
    grad = torch.randn(tokens, args.d_model, device=args.device)
    params = [x, *bam.parameters(), *dense.parameters(), *extra]

    with torch.no_grad():
        mismatch = (layers["bam"](x) - layers["loop"](x)).abs().max().item()
        moved = (layers["bam"](x) - layers["old"](x)).abs().max().item() if "old" in layers else None
    rounds, warmup = (args.bf16_rounds, args.bf16_warmup) if autocast else (args.rounds, args.warmup)
    if args.no_loop:
        del layers["loop"]  # checked above, not timed
    steps = {name: forward_backward(layer, x, grad, params, args.device if autocast else None)
             for name, layer in layers.items()}
    times = time_interleaved(steps, rounds, warmup)
    profiles = {name: quickest_profile(steps[name], args.device) for name in ("dense", "bam", "old")
                if name in steps}
    shares = {name: matmul_share(events, args.device) for name, events in profiles.items()}
    if args.profile:
        for name, events in profiles.items():
            print_profile(f"{name} (E {E}, k {k}, T {tokens})", events, args.device)
    ref = times["dense"]
    print(f"#   E={E} k={k} done", file=sys.stderr)
    return [E, k, f"{median_ms(ref):.0f}", f"{median_ms(times['bam']):.0f}",
            *(paired_ratio(times[name], ref) for name in layers if name != "dense"),
            *([paired_ratio(times["bam"], times["old"])] if "old" in layers else []),
            ratio_quartiles(times["bam"], ref), *(f"{share:.0%}" for share in shares.values()),
            f"{mismatch:.1e}", *([f"{moved:.1e}"] if moved is not None else [])]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1408, help="SwiGLU hidden size of one expert")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--bf16-tokens", type=int, default=None,
                        help="tokens for bf16 (default: --tokens; 1024 on CPUs without native bf16, "
                             "never reduced on cuda)")
    parser.add_argument("--bf16-rounds", type=int, default=None,
                        help="timed rounds for bf16 (default: --rounds; 3 on CPUs without native bf16)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers Mixtral column")
    parser.add_argument("--no-loop", action="store_true", help="do not time the per-expert loop (still "
                        "compared for max|bam-loop|)")
    parser.add_argument("--profile", action="store_true",
                        help="print each layer's profile (top ops by own time) before its table")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time MixtureOfFFN as it was at this git revision (old vs new, same rounds)")
    parser.set_defaults(rounds=11)  # per-round ratios spread by +-10% on a shared 2-vCPU machine
    args = parser.parse_args()
    slow_bf16 = args.device == "cpu" and not native_bf16_matmul()  # GPUs all have bf16 matmuls
    args.bf16_tokens = args.bf16_tokens or (1024 if slow_bf16 else args.tokens)
    args.bf16_rounds = args.bf16_rounds or (3 if slow_bf16 else args.rounds)
    args.bf16_warmup = 1 if slow_bf16 else args.warmup
    print_header(f"FFN mixture fwd+bwd vs dense SwiGLU of equal active FLOPs (d_model {args.d_model}, "
                 f"d_ff {args.d_ff} per expert)", args)
    use_hf = MixtralSparseMoeBlock is not None and not args.no_hf
    args.old_ffn = ffn_at_revision(args.against) if args.against else None
    if args.against:
        print(f"# old: bam_lightning/model/ffn.py at {args.against}; bam/old = median of per-round ratios")
    if not use_hf:
        print("# hf column skipped: " + ("--no-hf" if args.no_hf else "transformers is not importable"))

    for dtype_name in args.dtypes:
        autocast = dtype_name == "bf16"
        tokens = args.bf16_tokens if autocast else args.tokens
        print(f"\n## {dtype_name}{' (autocast: fp32 weights, bf16 matmuls)' if autocast else ''}, T = {tokens} tokens"
              + (f", {args.bf16_warmup} warm-up + {args.bf16_rounds} rounds" if autocast else "")
              + (" [reduced: no native bf16 on this CPU]" if autocast and slow_bf16 else ""))
        with CoTenantLoad() as load:
            rows = [bench_one(E, k, tokens, args, autocast, use_hf) for E in args.experts for k in args.top_k]
        old = [args.against] if args.against else []
        print_table(["E", "k", "dense ms", "bam ms", "bam/dense", *([] if args.no_loop else ["loop/dense"]),
                     *(["hf/dense"] if use_hf else []),
                     *(f"{rev}/dense" for rev in old), *("bam/old" for _ in old), "bam/dense per-round quartiles",
                     "matmul share dense", "bam", *(f"{rev}" for rev in old), "max|bam-loop|",
                     *(f"max|bam-{rev}|" for rev in old)], rows)
        print(f"# {load.summary()}; FFN kernel that ran: {last_ffn_kernel()}")


if __name__ == "__main__":
    main()
