"""Validation metrics as JSON lines beside the run, for reports and scripts.

TensorBoard holds the same numbers; this file is the one a report reads without parsing event
files. The training wall time travels in the checkpoint, so a resumed run keeps counting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from bam_lightning.flops import trainer_tokens_per_step


class MetricsFile(L.Callback):
    """Appends `{"step", "wall_time_s", "tokens", <val metrics>}` after every validation."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._previous_wall_time = 0.0  # from earlier attempts of a resumed run
        self._start = time.perf_counter()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def wall_time(self) -> float:
        return self._previous_wall_time + time.perf_counter() - self._start

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            metrics = dict(getattr(pl_module, "initial_val_metrics", {}))
        else:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not metrics:
            return
        datamodule = trainer.datamodule
        tokens_per_step = (trainer_tokens_per_step(trainer, datamodule.batch_size, datamodule.seq_len)
                           if datamodule is not None and hasattr(datamodule, "seq_len") else None)
        record = {"step": trainer.global_step, "wall_time_s": round(self.wall_time(), 3),
                  "tokens": None if tokens_per_step is None else trainer.global_step * tokens_per_step,
                  "stage": trainer.state.fn.value, **metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"wall_time_s": self.wall_time()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._previous_wall_time = float(state_dict.get("wall_time_s", 0.0))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file, skipping a torn last line from a killed process."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
