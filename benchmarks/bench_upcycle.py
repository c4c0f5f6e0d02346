"""Time and peak memory of upcycling four paper-scale dense checkpoints into one BAM mixture.

    .venv/bin/python benchmarks/bench_upcycle.py [--method bam] [--dtype fp32] [--format ckpt] [--keep DIR]

Four dense checkpoints of the paper's small seed (vocab 256000, 6 layers, d_model 1024, 8 heads,
d_ff 2048, untied: about 590M parameters each) are generated as safetensors (or Lightning
`.ckpt`, `--format ckpt`) in a temporary directory, then `upcycle_from_checkpoints` runs in a
fresh child process, so that its peak resident memory (VmHWM) is its own and not the
generator's. The sources are memory-mapped and streamed chunk by chunk, so the peak should be
about the mixture's size, not four sources plus the mixture; the table prints the peak over the
child's memory before upcycling (torch itself) and that increase over the mixture's size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from harness import base_parser, print_header, print_table  # benchmarks/harness.py

from bam_lightning import ModelConfig
from bam_lightning.checkpoint import MODEL_PREFIX, save_safetensors
from bam_lightning.model import GPT

PAPER_590M = ModelConfig(vocab_size=256000, n_layer=6, d_model=1024, n_head=8, d_ff=2048, max_seq_len=1024,
                         tie_embeddings=False)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_sources(directory: Path, n: int, dtype: torch.dtype, file_format: str) -> list[Path]:
    """n distinct random dense checkpoints with the seed's exact keys and shapes (one in memory at a time)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(PAPER_590M).state_dict().items()}
    paths = []
    for j in range(n):
        generator = torch.Generator().manual_seed(j)
        path = directory / f"dense_{j}.{file_format}"
        if not path.exists():  # --keep DIR reuses what an earlier run wrote there
            state = {k: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for k, shape in shapes.items()}
            if file_format == "safetensors":
                save_safetensors(state, PAPER_590M, path)
            else:  # the layout a DenseLM fit saves (hyper-parameters and the module's weights)
                torch.save({"state_dict": {MODEL_PREFIX + k: v for k, v in state.items()},
                            "hyper_parameters": {"config": PAPER_590M.to_dict()}}, path)
            del state
        paths.append(path)
    return paths


def memory(field: str) -> int:
    """Bytes of a /proc/self/status field: VmRSS now, VmHWM the peak of this process image (unlike
    ru_maxrss, it does not inherit the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(paths: list[str], method: str) -> None:
    """Runs in a fresh interpreter: upcycle, then report seconds, peak RSS and the result's size."""
    from bam_lightning.upcycle import upcycle_from_checkpoints

    moe = ModelConfig.from_dict(PAPER_590M.to_dict() | dict(n_experts=len(paths), attn_experts=len(paths),
                                                            attn_shared_kv=method == "bam_shared_kv"))
    baseline = memory("VmRSS")
    start = time.perf_counter()
    state, _ = upcycle_from_checkpoints(paths, moe, method)
    seconds = time.perf_counter() - start
    peak = memory("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline,
                      "result_bytes": sum(t.numel() * t.element_size() for t in state.values()),
                      "largest_tensor": max(t.numel() * t.element_size() for t in state.values())}))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], interleaved=False)
    parser.add_argument("--method", default="bam", choices=["bam", "bam_shared_kv"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "ckpt"])
    parser.add_argument("--keep", type=Path, default=None, help="write the sources here and keep them")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        child(args.child, args.method)
        return
    print_header(f"Upcycling paper_590m dense checkpoints into a BAM mixture ({args.format}, child process)", args)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.keep or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        paths = write_sources(directory, args.sources, DTYPES[args.dtype], args.format)
        print(f"# {args.sources} sources of {paths[0].stat().st_size / 2**30:.2f} GiB each in {directory} "
              f"(written or reused in {time.perf_counter() - start:.0f} s)")
        command = [sys.executable, __file__, "--child", *map(str, paths), "--method", args.method,
                   "--threads", str(args.threads)]
        report = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    gib = 2**30
    increase = report["peak_rss"] - report["baseline_rss"]
    print_table(["method", "format", "dtype", "sources", "upcycle s", "peak RSS GiB", "RSS before GiB",
                 "mixture GiB", "peak / mixture", "(peak - before) / mixture"],
                [[args.method, args.format, args.dtype, args.sources, f"{report['seconds']:.1f}",
                  f"{report['peak_rss'] / gib:.2f}", f"{report['baseline_rss'] / gib:.2f}",
                  f"{report['result_bytes'] / gib:.2f}", f"{report['peak_rss'] / report['result_bytes']:.2f}",
                  f"{increase / report['result_bytes']:.2f}"]])


if __name__ == "__main__":
    main()
