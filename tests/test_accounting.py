"""Token and FLOP accounting (issue 11, items 5, 6, 10): one tokens-per-optimizer-step count for
the metrics file, the pipeline, the report and compute matching; validation FLOPs are forward
FLOPs; compute-matched stages keep the warm-up's share of the run."""

import json
import math

import lightning as L
import pytest
import torch
import yaml
from bam_lightning.callbacks import MetricsFile, TokenThroughput
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from bam_lightning import ModelConfig
from bam_lightning.flops import (
    forward_flops_per_token,
    tokens_per_optimizer_step,
    training_flops_per_token,
)
from bam_lightning.lit import DenseLM
from bam_lightning.pipeline import Stage, compose_stage, compute_matched_steps, recipe_model_config

CONFIG = ModelConfig(vocab_size=40, n_layer=1, d_model=16, n_head=2, d_ff=32, max_seq_len=16)
SEQ_LEN, BATCH = 16, 4


class Blocks(L.LightningDataModule):
    """Random [B, T+1] blocks with the two fields BAMDataModule exposes for accounting."""

    seq_len, batch_size = SEQ_LEN, BATCH

    def train_dataloader(self):
        return DataLoader(torch.randint(0, 40, (64, SEQ_LEN + 1)), batch_size=BATCH)

    def val_dataloader(self):
        return DataLoader(torch.randint(0, 40, (16, SEQ_LEN + 1)), batch_size=BATCH)


class Recorder(Logger):
    """Keeps every logged metric."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict[str, float]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_tokens_per_step_counts_every_micro_batch_and_process():
    assert tokens_per_optimizer_step(4, 16) == 64
    assert tokens_per_optimizer_step(4, 16, accumulate_grad_batches=2, devices=8, num_nodes=2) == 4 * 16 * 2 * 8 * 2
    with pytest.raises(ValueError, match="accumulate_grad_batches must be a positive integer, got 0"):
        tokens_per_optimizer_step(4, 16, accumulate_grad_batches=0)


def test_metrics_file_counts_the_tokens_of_accumulated_micro_batches(tmp_path):
    path = tmp_path / "metrics.jsonl"
    trainer = L.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=2, val_check_interval=4,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[MetricsFile(str(path))])
    trainer.fit(DenseLM(CONFIG, warmup_steps=1), datamodule=Blocks())
    record = json.loads(path.read_text().splitlines()[-1])
    # 4 optimizer steps of 2 micro-batches of 4 sequences of 16 tokens, counted by hand
    assert record["step"] == 4 and record["tokens"] == 4 * 2 * 4 * 16


def test_validation_flops_are_forward_flops_and_training_flops_three_times_that():
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=8, val_check_interval=8, logger=recorder,
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[TokenThroughput(peak_flops=1e12, window_size=2)])
    trainer.fit(DenseLM(CONFIG, warmup_steps=1), datamodule=Blocks())

    def flops_per_token(prefix: str) -> float:
        rows = [m for m in recorder.metrics if f"{prefix}device/flops_per_sec" in m]
        assert rows, f"no {prefix} throughput logged: {[sorted(m) for m in recorder.metrics][:3]}"
        last = rows[-1]
        return last[f"{prefix}device/flops_per_sec"] / last[f"{prefix}device/items_per_sec"]

    # per token: the model's forward FLOPs (hand-counted in test_flops.py), times 3 with the backward
    forward = forward_flops_per_token(CONFIG, SEQ_LEN)
    assert math.isclose(flops_per_token("validate/"), forward, rel_tol=1e-6)
    assert math.isclose(flops_per_token("train/"), 3 * forward, rel_tol=1e-6)


def write_recipe(path, max_steps, warmup=10, config=None, **trainer):
    path.write_text(yaml.safe_dump({
        "trainer": {"max_steps": max_steps, "devices": 1, **trainer},
        "model": {"class_path": "bam_lightning.lit.MoELM",
                  "init_args": {"warmup_steps": warmup, "config": config or CONFIG.to_dict()}},
        "data": {"seq_len": SEQ_LEN, "batch_size": BATCH},
    }))
    return str(path)


@pytest.mark.parametrize("reference_trainer", [{}, {"accumulate_grad_batches": 2},
                                               {"devices": 2, "num_nodes": 2, "accumulate_grad_batches": 3}])
def test_compute_matched_steps_spend_the_references_flops_counting_every_token(tmp_path, reference_trainer):
    bam_config = {**CONFIG.to_dict(), "n_experts": 2, "attn_experts": 2}
    reference = write_recipe(tmp_path / "btx.yaml", 40, config={**CONFIG.to_dict(), "n_experts": 2},
                             **reference_trainer)
    bam = write_recipe(tmp_path / "bam.yaml", 40, config=bam_config)
    steps = compute_matched_steps(reference, bam)
    # tokens per step by hand: batch x seq x accumulation x devices x nodes
    ref_tokens = BATCH * SEQ_LEN * math.prod(reference_trainer.get(k, 1)
                                             for k in ("accumulate_grad_batches", "devices", "num_nodes"))
    ref_total = training_flops_per_token(ModelConfig(**{**CONFIG.to_dict(), "n_experts": 2}), SEQ_LEN) * ref_tokens * 40
    per_step = training_flops_per_token(ModelConfig(**bam_config), SEQ_LEN) * BATCH * SEQ_LEN
    assert steps * per_step <= ref_total < (steps + 1) * per_step


def test_compute_matching_refuses_a_machine_dependent_device_count(tmp_path):
    reference = write_recipe(tmp_path / "btx.yaml", 40, devices="auto")
    with pytest.raises(ValueError, match=r"btx.yaml: trainer.devices is 'auto'"):
        compute_matched_steps(reference, write_recipe(tmp_path / "bam.yaml", 40))


def test_compute_matched_stages_keep_the_warmup_fraction(tmp_path):
    recipe = write_recipe(tmp_path / "bam.yaml", 100, warmup=10)
    config = {"checkpoint_every_n_steps": 10}
    dm = compose_stage(Stage("bam", "bam", "mixture", recipe), config, tmp_path)
    cm = compose_stage(Stage("bam_cm", "bam_cm", "mixture", recipe, max_steps=60, budget="CM"), config, tmp_path)
    assert dm["model"]["init_args"]["warmup_steps"] == 10 and dm["trainer"]["max_steps"] == 100
    assert cm["trainer"]["max_steps"] == 60 and cm["model"]["init_args"]["warmup_steps"] == 6
    assert recipe_model_config(cm) == recipe_model_config(dm)
