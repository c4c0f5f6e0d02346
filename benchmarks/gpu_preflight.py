"""The GPU check's first step: everything the later steps import, and the FFN kernel they will time.

    python benchmarks/gpu_preflight.py --device cuda|cpu

Prints each package's version and where it was imported from (the image or the wheel bundle),
checks that Lightning's CLI finds jsonargparse's `signatures` extra and that the paper_590m recipe
reads, then runs a small mixture FFN forward and backward in bf16 and fp32 on the device against a
per-expert loop in float64, naming the kernel each dtype took. On cuda a bf16 mixture that falls
back to the per-expert loop fails the step: the FFN benchmark would time the wrong path.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

PACKAGES = ["torch", "numpy", "lightning", "torchmetrics", "tensorboard", "safetensors", "tokenizers",
            "matplotlib", "litdata", "omegaconf", "jsonargparse", "yaml"]
PROJECT_MODULES = ["bam_lightning.cli", "bam_lightning.lightning_cli", "bam_lightning.callbacks",
                   "bam_lightning.data", "bam_lightning.pipeline"]


def check_imports() -> None:
    for name in PACKAGES + PROJECT_MODULES:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", "")
        print(f"  {name:28s} {version:14s} {Path(module.__file__).parent}")
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE

    if not _JSONARGPARSE_SIGNATURES_AVAILABLE:
        raise SystemExit("gpu_preflight: Lightning's CLI does not find jsonargparse[signatures] "
                         "(docstring-parser, typeshed-client): add them to the wheel bundle")


def check_recipe() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train_step import PAPER_590M_RECIPE, recipe_model_config

    from bam_lightning.flops import parameter_counts

    config = recipe_model_config(PAPER_590M_RECIPE)
    total, active = parameter_counts(config)
    print(f"  paper_590m BAM: {total / 1e6:.0f}M parameters, {active / 1e6:.0f}M active per token")


def loop_reference(ffn, x):
    """The mixture's output for x [N, d] from the module's own routing, expert by expert, in
    float64 on the CPU (the routing is the module's, so bf16 ties cannot pick other experts)."""
    import torch

    idx, weights, _ = ffn.route(x)
    idx, weights, x = idx.cpu(), weights.double().cpu(), x.double().cpu()
    w_gate, w_up, w_down = (w.detach().double().cpu() for w in (ffn.w_gate, ffn.w_up, ffn.w_down))
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        token, slot = (idx == e).nonzero(as_tuple=True)
        h = torch.nn.functional.silu(x[token] @ w_gate[e].T) * (x[token] @ w_up[e].T)
        out.index_add_(0, token, weights[token, slot, None] * (h @ w_down[e].T))
    return ffn.config.ffn_gate_scale * out


def check_kernels(device: str) -> None:
    import torch

    from bam_lightning import ModelConfig
    from bam_lightning.model.ffn import LOOP, MixtureOfFFN, ffn_kernel, last_ffn_kernel

    torch.manual_seed(0)
    config = ModelConfig(d_model=64, n_head=2, d_ff=128, n_experts=4, ffn_top_k=2)
    x = torch.randn(48, 64)
    for dtype, tolerance in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
        torch.manual_seed(1)
        module = MixtureOfFFN(config)
        module.reset_parameters()
        module = module.to(device=device, dtype=dtype)
        inputs = x.to(device=device, dtype=dtype).requires_grad_()
        out, _ = module(inputs[None])
        out.float().square().sum().backward()
        ran = last_ffn_kernel()
        with torch.no_grad():
            reference = loop_reference(module, inputs.detach())
        error = ((out[0].detach().double().cpu() - reference).norm() / reference.norm()).item()
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in module.parameters())
        print(f"  FFN mixture {str(dtype):15s} on {device}: kernel {ran} (chosen: {ffn_kernel(device, dtype)}), "
              f"relative error vs float64 loop {error:.1e}, gradients finite: {grads_finite}")
        if error > tolerance or not grads_finite:
            raise SystemExit(f"gpu_preflight: the {dtype} mixture on {device} is wrong (error {error:.1e})")
        if device == "cuda" and dtype == torch.bfloat16 and ran == LOOP:
            raise SystemExit("gpu_preflight: bf16 on cuda takes the per-expert loop: the FFN benchmark "
                             "would time the fallback, not the grouped kernel")


def check_no_host_sync(device: str) -> None:
    """The bf16 mixture's forward and backward on CUDA under `set_sync_debug_mode("error")`: any
    read of a tensor value by the host (a bincount, an `.item()`, offsets copied back) raises."""
    import torch

    from bam_lightning import ModelConfig
    from bam_lightning.model.ffn import MixtureOfFFN

    if device != "cuda":
        print("  host-sync check: cuda only (tests/test_fast_paths.py counts host reads on the CPU)")
        return
    torch.manual_seed(2)
    for top_k in (1, 2):
        module = MixtureOfFFN(ModelConfig(d_model=64, n_head=2, d_ff=128, n_experts=4, ffn_top_k=top_k))
        module.reset_parameters()
        module = module.to(device)
        x = torch.randn(1, 96, 64, device=device, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out, stats = module(x)
            (out.float().square().sum() + stats.lb_loss).backward()
        except RuntimeError as error:
            raise SystemExit(f"gpu_preflight: the bf16 FFN mixture (top-{top_k}) syncs with the host: {error}") from error
        finally:
            torch.cuda.set_sync_debug_mode("default")
        print(f"  FFN mixture bf16 top-{top_k} forward+backward on cuda: no host sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    import torch

    print(f"# Python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, device {args.device}"
          + (f": {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print("imports:")
    check_imports()
    print("recipe:")
    check_recipe()
    print("kernels:")
    check_kernels(args.device)
    check_no_host_sync(args.device)
    print("gpu_preflight: ok")


if __name__ == "__main__":
    main()
