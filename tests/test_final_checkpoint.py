"""Every fit's final state is checkpointed, and a stage built on another stage's checkpoint gets
that stage's final step or a clear error (issue 11, item 1)."""

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from bam_lightning.callbacks import UpcyclingCallback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from bam_lightning import ModelConfig
from bam_lightning.checkpoint import read_checkpoint
from bam_lightning.lightning_cli import run_lightning_cli
from bam_lightning.lit import DenseLM

CONFIG = ModelConfig(vocab_size=40, n_layer=1, d_model=16, n_head=2, d_ff=32, max_seq_len=16)


def blocks(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 40, (n, 17), generator=g)


def loaders():
    return DataLoader(blocks(64, 0), batch_size=8, shuffle=True), [DataLoader(blocks(16, 1), batch_size=8)]


class SaveAtStep(L.Callback):
    """Writes a checkpoint at one step mid-fit: what `last.ckpt` held when the final save was missing."""

    def __init__(self, step: int, path: Path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def fit(tmp_path: Path, max_steps: int, **module_args) -> tuple[DenseLM, Path]:
    torch.manual_seed(0)
    module = DenseLM(CONFIG, warmup_steps=1, **module_args)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0,
                                  every_n_train_steps=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[checkpoints, SaveAtStep(4, tmp_path / "step4.ckpt")])
    train, val = loaders()
    trainer.fit(module, train, val)
    return module, tmp_path / "checkpoints" / "last.ckpt"


def test_last_checkpoint_holds_the_final_step_when_no_interval_divides_it(tmp_path):
    """6 steps, checkpoints and validation every 4: Lightning alone leaves step 4 in last.ckpt."""
    module, last = fit(tmp_path, max_steps=6)
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 6
    assert saved["bam_lightning"]["global_step"] == 6 and saved["bam_lightning"]["final"] is True
    for key, value in module.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value), key
    mid = read_checkpoint(tmp_path / "step4.ckpt")
    assert (mid.global_step, mid.max_steps, mid.final) == (4, 6, False)


def test_init_from_an_intermediate_checkpoint_names_the_file_and_both_steps(tmp_path):
    fit(tmp_path, max_steps=6)
    branch = DenseLM(CONFIG, init_from=str(tmp_path / "step4.ckpt"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    train, val = loaders()
    message = f"{tmp_path / 'step4.ckpt'}: model.init_from needs the final state of the fit that wrote it, " \
              "but this checkpoint holds step 4 of 6"
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.fit(branch, train, val)


def test_upcycling_refuses_an_intermediate_source(tmp_path):
    fit(tmp_path, max_steps=6)
    final = str(tmp_path / "checkpoints" / "last.ckpt")
    moe = ModelConfig(**{**CONFIG.to_dict(), "n_experts": 2})
    UpcyclingCallback([final, final], method="btx").check_sources(moe)  # the final one is accepted
    callback = UpcyclingCallback([final, str(tmp_path / "step4.ckpt")], method="btx")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'step4.ckpt'}: UpcyclingCallback (init_args.sources) "
                                                   "needs the final state of the fit that wrote it, but this "
                                                   "checkpoint holds step 4 of 6")):
        callback.check_sources(moe)


class StopBeforeValidation(L.Callback):
    """Raises at the first validation of the fit: a kill between a step's checkpoint and its validation."""

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            raise RuntimeError("killed")


def test_resumed_bam_fit_validates_the_final_step_it_never_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "words").mkdir()
    for i in range(4):
        (tmp_path / "words" / f"{i}.txt").write_text(" ".join(f"word{(i * j) % 13}" for j in range(300)))
    metrics = tmp_path / "metrics.jsonl"
    recipe = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 4, "val_check_interval": 4, "check_val_every_n_epoch": None,
                    "logger": False, "num_sanity_val_steps": 0, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True,
                                                 "save_top_k": 0, "every_n_train_steps": 4}},
                                  {"class_path": "bam_lightning.callbacks.MetricsFile",
                                   "init_args": {"path": str(metrics)}}]},
        "model": {"class_path": "bam_lightning.lit.DenseLM",
                  "init_args": {"warmup_steps": 1, "config": {"vocab_size": 257, "n_layer": 1, "d_model": 16,
                                                              "n_head": 2, "d_ff": 32, "max_seq_len": 16}}},
        "data": {"domains": {"words": str(tmp_path / "words" / "*.txt")}, "seq_len": 16, "batch_size": 4,
                 "val_fraction": 0.25, "val_tokens_per_domain": 64},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = run_lightning_cli(["--config", str(path)], run=False)
    cli.trainer.callbacks.append(StopBeforeValidation())
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert read_checkpoint(tmp_path / "ckpt" / "last.ckpt").global_step == 4
    assert not metrics.exists()  # step 4 was never validated

    run_lightning_cli(["fit", "--config", str(path), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt")])
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [4] and "val/avg/ppl" in records[0]
