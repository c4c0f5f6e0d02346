"""SIGTERM (SLURM and Kubernetes preemption): checkpoint the step reached, then exit 143.

Lightning's own SIGTERM handling ends a fit with exit code 0 and no checkpoint, and it exchanges
a tensor from inside the signal handler, which can meet another rank's gradient all-reduce. Here
the handler only sets a flag; after every optimizer step all ranks agree on it with one small
all-reduce, so every rank stops after the same step, saves `last.ckpt` together (rank 0 writes,
through the trainer's checkpoint IO: atomically with AtomicCheckpointIO) and exits with
`PREEMPTED_EXIT_CODE`, the code a shell reports for a process ended by SIGTERM, so a scheduler
or `&&` sees an unfinished run. `bam fit --ckpt_path <that last.ckpt>` (or a re-run pipeline)
resumes from that step exactly."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM


class Preempted(SystemExit):
    """A fit stopped by SIGTERM after saving its state; exits the process with code 143."""

    def __init__(self, path: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.path = path


class PreemptionCheckpoint(L.Callback):
    """Installed by `bam fit` and every pipeline stage (not a recipe field)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning installed its handler (in `Trainer._run`), so this one replaces it
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._any_rank_requested(trainer):
            return
        path = last_checkpoint_path(trainer)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.format_checkpoint_name(
                    {}, callback.CHECKPOINT_NAME_LAST) == path:
                # stored in the checkpoint: the resumed fit then replaces this file, not `last-v1.ckpt`
                callback.last_model_path = path
        trainer.save_checkpoint(path)  # a collective: every rank is here, after the same step
        if trainer.is_global_zero:
            print(f"SIGTERM: saved step {trainer.global_step} to {path}; exiting with code {PREEMPTED_EXIT_CODE}. "
                  f"Resume with --ckpt_path {path}", file=sys.stderr, flush=True)
        raise Preempted(path)

    def _any_rank_requested(self, trainer: L.Trainer) -> bool:
        if trainer.world_size == 1:
            return self.requested
        flag = torch.tensor([int(self.requested)], device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max").item())


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where the fit's ModelCheckpoint keeps `last.ckpt` (the file a resume reads), else
    `<default_root_dir>/checkpoints/last.ckpt`."""
    callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
    if callback is None:
        return str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
    return callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
