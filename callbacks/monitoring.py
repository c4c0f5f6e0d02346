"""Monitoring callbacks: token throughput with MFU, and a stop on non-finite losses."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def _tokens_of(batch: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["tokens"] if isinstance(batch, dict) else batch  # validation: tokens + documents


def _samples_in(batch: torch.Tensor | dict[str, torch.Tensor]) -> int:
    return _tokens_of(batch).shape[0]


def _tokens_in(batch: torch.Tensor | dict[str, torch.Tensor]) -> int:
    tokens = _tokens_of(batch)
    return tokens.shape[0] * (tokens.shape[1] - 1)  # [B, T+1] blocks predict T tokens each


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 8,
                         device: str | torch.device = "cpu") -> float:
    """A measured matmul ceiling (FLOP/s) for MFU where no datasheet number exists (CPUs, GPUs
    missing from Lightning's table).

    `size` defaults to 1024 on CPUs and 8192 on GPUs: a GPU needs a large product to reach its
    peak. GPU kernels run asynchronously, so the clock is read only after a synchronize.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    size = size or (8192 if on_cuda else 1024)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    # Warm-up: the first product of a shape pays for kernel selection, and an idle GPU stays at a
    # low clock until it has been busy for a while (80 products of 8192^3: about 0.1 s on an H200).
    for _ in range(10 * repeats if on_cuda else 1):
        a @ b
    if on_cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if on_cuda:
        torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class TokenThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for [B, T+1] token blocks: logs tokens/s (`items_per_sec`),
    FLOP/s and MFU, using the module's `flops_per_batch` (training FLOPs while training, forward
    FLOPs while validating, so validation MFU is not read 3x too high).

    Lightning's datasheet table gives the peak FLOP/s where it names the device. It names no CPU
    and not every GPU (a plain "NVIDIA H200" is missing), so there MFU is taken against a matmul
    ceiling measured on the trainer's device in its compute dtype (or `peak_flops` when given).
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 20):
        super().__init__(batch_size_fn=_samples_in, length_fn=_tokens_in, window_size=window_size)
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.available_flops is None:
            peak = self.peak_flops
            device = trainer.strategy.root_device
            if peak is None and device.type in ("cpu", "cuda"):
                dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
                peak = measure_matmul_flops(dtype, device=device)
            if peak is not None:
                self.available_flops = int(peak)
                for throughput in self._throughputs.values():
                    throughput.available_flops = self.available_flops


class NonFiniteLossGuard(L.Callback):
    """Stop a run on the first NaN/Inf loss instead of training on garbage.

    The error names the step and the last checkpoint saved, so the user knows where to resume.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(trainer, f"non-finite loss ({float(loss)})")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        norms = [p.grad.norm() for p in pl_module.parameters() if p.grad is not None]
        if norms and not torch.isfinite(torch.stack(norms)).all():
            self._stop(trainer, "non-finite gradient")

    @staticmethod
    def _stop(trainer: L.Trainer, what: str) -> None:
        last = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else ""
        where = f"last good checkpoint: {last}" if last else "no checkpoint has been saved yet"
        raise FloatingPointError(f"{what} at global step {trainer.global_step}; {where}")
