"""Shared timing harness for the benchmark scripts (not tests).

Shared CPUs drift by tens of percent within seconds, so the candidates are timed *interleaved*:
each round runs every candidate once, in turn, and a ratio is the median over rounds of the
per-round ratio to the reference. Neighbouring runs see the same machine state, which cancels
most of the drift that separately timed medians would carry.

On `--device cuda` kernels run asynchronously, so every timed call is bracketed by
`torch.cuda.synchronize()`: the clock then reads the GPU's work, not the time to queue it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from bam_lightning.malloc import keep_large_blocks_on_heap
from bam_lightning.model.ffn import ffn_kernel

CLOCK = time.perf_counter  # --clock cpu: time.process_time
SYNCHRONIZE: Callable[[], None] | None = None  # --device cuda: torch.cuda.synchronize
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def base_parser(description: str, interleaved: bool = True, device: bool = True) -> argparse.ArgumentParser:
    """The options every script shares; `device=False` where a script names its device otherwise
    (bench_train_step.py: Lightning's --accelerator)."""
    parser = argparse.ArgumentParser(description=description)
    if device:
        parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                            help="where modules and tensors live (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--malloc", choices=["heap", "default"], default="heap",
                        help="heap (default): keep large blocks on glibc's heap, as `bam` does for "
                             "training (bam_lightning/malloc.py); default: glibc's own mmap per block")
    if interleaved:
        parser.add_argument("--rounds", type=int, default=7, help="timed rounds after the warm-up")
        parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
        parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                            help="cpu: this process's CPU time; with --threads 1 it counts the work "
                                 "itself, not the time slices lost to co-tenants")
    return parser


def native_bf16_matmul() -> bool:
    """Whether oneDNN runs bf16 matmuls in hardware (AVX512-BF16 / AMX); without it torch falls
    back to a generic kernel that is far slower than fp32, and bf16 timings say little."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_summary(device: torch.device) -> str:
    """What GPU timings depend on: the chip, its memory, the CUDA build, and whether fp32 matmuls
    may run as TF32 (torch's default, 'highest', keeps them true fp32)."""
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}, "
            f"{props.multi_processor_count} SMs | CUDA {torch.version.cuda} | fp32 matmul precision "
            f"{torch.get_float32_matmul_precision()}")


def print_header(title: str, args: argparse.Namespace) -> None:
    """Print what the numbers depend on; also applies --threads, --malloc, --clock and --device."""
    global CLOCK, SYNCHRONIZE
    device = getattr(args, "device", "cpu")
    if device == "cuda":
        if getattr(args, "clock", "wall") == "cpu":
            raise SystemExit("error: --clock cpu counts this process's CPU time, not the GPU's work: "
                             "use --clock wall (the default) with --device cuda")
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device cuda, but torch {torch.__version__} sees no CUDA GPU "
                             f"(torch.version.cuda = {torch.version.cuda})")
        SYNCHRONIZE = torch.cuda.synchronize
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    malloc = args.malloc
    if malloc == "heap" and not keep_large_blocks_on_heap():
        malloc = "default (mallopt unavailable)"
    print(f"# {title}")
    print(f"# {datetime.datetime.now():%Y-%m-%d %H:%M} | torch {torch.__version__} | Python "
          f"{platform.python_version()} | {cpu_model()} ({os.cpu_count()} logical CPUs, "
          f"{torch.backends.cpu.get_cpu_capability()}) | {torch.get_num_threads()} threads | {malloc} malloc")
    compute = (f"GPU: {gpu_summary(torch.device('cuda'))}" if device == "cuda" else
               f"native bf16 matmul: {'yes' if native_bf16_matmul() else 'NO (bf16 runs on a slow generic fallback)'}")
    kernels = ", ".join(f"{name} {ffn_kernel(device, DTYPES[name])}" for name in getattr(args, "dtypes", DTYPES))
    print(f"# {compute}"
          f" | FFN kernel on {device}: {kernels}"
          + (f" | {args.warmup} warm-up + {args.rounds} timed rounds, interleaved, {args.clock} clock; "
             "ratio = median of per-round ratios" if hasattr(args, "rounds") else ""))


def forward_backward(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                     params: list[torch.Tensor], autocast_device: str | None = None) -> Callable[[], None]:
    """One timed call: clear the gradients, run `layer(x)` (under bf16 autocast on
    `autocast_device` when given) and back-propagate `grad`."""
    def step() -> None:
        for p in params:
            p.grad = None
        with torch.autocast(autocast_device, dtype=torch.bfloat16) if autocast_device else nullcontext():
            out = layer(x)
        out.backward(grad)
    return step


def time_interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each case, one call of every case per round."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + rounds):
        for name, fn in cases.items():
            if SYNCHRONIZE is not None:
                SYNCHRONIZE()  # nothing queued earlier may land in this call's time
            start = CLOCK()
            fn()
            if SYNCHRONIZE is not None:
                SYNCHRONIZE()  # the call's kernels, not only their launches
            elapsed = CLOCK() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


class CoTenantLoad:
    """How many CPUs other processes kept busy while we timed (Linux /proc/stat): on a shared
    2-CPU machine a co-tenant on one CPU makes 2-thread GEMMs wait at every barrier, and small
    GEMMs (routed experts) suffer more than large ones (the dense reference)."""

    def __enter__(self) -> CoTenantLoad:
        self.start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        self.end = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        ticks = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            busy = (sum(values[:8]) - values[3] - values[4]) / ticks  # all but idle and iowait
        except OSError:
            busy = float("nan")
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def summary(self) -> str:
        wall = self.end[0] - self.start[0]
        others = (self.end[1] - self.start[1]) - (self.end[2] - self.start[2])
        return f"other processes kept {max(others, 0.0) / wall:.2f} CPUs busy on average during these timings"


def paired_ratio(times: list[float], reference: list[float]) -> float:
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def ratio_quartiles(times: list[float], reference: list[float]) -> str:
    """The per-round ratios' spread, so a reader sees how much one median can be trusted."""
    q1, q2, q3 = statistics.quantiles([t / r for t, r in zip(times, reference, strict=True)], n=4)
    return f"{q1:.3f} / {q2:.3f} / {q3:.3f}"


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def print_table(header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
