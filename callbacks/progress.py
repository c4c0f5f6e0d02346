"""One progress line per validation, for logs that are not a terminal.

Lightning's progress bar needs a terminal: with `bam pipeline ... > log` nothing would be printed
while a stage trains. This prints, flushed, after every validation:

    [bam] step 50/100  val/avg/loss 2.4312  1,830 tokens/s  1m 12s left

Tokens/s and the time left count this process's fit since it started (a resumed stage counts from
its resume), validation time included, so the estimate is what the stage will still take.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from bam_lightning.flops import trainer_tokens_per_step


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class ProgressLog(L.Callback):
    """Prints `[name] step S/MAX  val/avg/loss L  T tokens/s  D left` after each validation (rank 0)."""

    def __init__(self, name: str = "fit"):
        self.name = name
        self._start = time.perf_counter()
        self._start_step = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after a resume's checkpoint is loaded (global_step is the resumed one) and the sanity check
        self._start, self._start_step = time.perf_counter(), trainer.global_step

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            metrics = dict(getattr(pl_module, "initial_val_metrics", {}) or {})
        else:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        step, max_steps = trainer.global_step, trainer.max_steps
        parts = [f"[{self.name}] step {step}/{max_steps}" if max_steps and max_steps > 0 else f"[{self.name}] step {step}"]
        if "val/avg/loss" in metrics:
            parts.append(f"val/avg/loss {metrics['val/avg/loss']:.4f}")
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start
        datamodule = trainer.datamodule
        if done > 0 and elapsed > 0 and not trainer.sanity_checking:
            if datamodule is not None and hasattr(datamodule, "seq_len"):
                tokens = done * trainer_tokens_per_step(trainer, datamodule.batch_size, datamodule.seq_len)
                parts.append(f"{tokens / elapsed:,.0f} tokens/s")
            if max_steps and max_steps > 0:
                parts.append(f"{_duration(elapsed / done * max(0, max_steps - step))} left")
        print("  ".join(parts), flush=True)
