"""A failing `bam fit` leaves the earlier run's config, TensorBoard logs and checkpoints as they
were; what can be checked before training is, naming the recipe key; the pipeline says "re-run
to resume" only when a re-run helps (issue 11, items 13 and 14)."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import write_word_documents

from bam_lightning.errors import UserError
from bam_lightning.lightning_cli import run_lightning_cli
from bam_lightning.lit import BaseLM
from bam_lightning.pipeline import Stage, failure_message, load_pipeline_config

MODEL = {"vocab_size": 257, "n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16}


def recipe(root: Path) -> dict:
    return {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "num_sanity_val_steps": 0, "val_check_interval": 2,
                    "check_val_every_n_epoch": None, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(root / "run"),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root / "tb"), "name": "run", "version": ""}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True,
                                                 "save_top_k": 0, "every_n_train_steps": 1}}]},
        "model": {"class_path": "bam_lightning.lit.DenseLM", "init_args": {"warmup_steps": 1, "config": dict(MODEL)}},
        "data": {"domains": {"words": str(root / "words" / "*.txt")}, "seq_len": 16, "batch_size": 4,
                 "val_fraction": 0.25, "val_tokens_per_domain": 64},
    }


def snapshot(root: Path) -> dict[str, str]:
    """Every file the earlier run wrote, with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in ("tb", "ckpt") for p in sorted((root / folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fail_safe")
    write_word_documents(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        path = root / "good.yaml"
        path.write_text(yaml.safe_dump(recipe(root)))
        run_lightning_cli(["fit", "--config", str(path)])
        before = snapshot(root)
        assert "tb/run/config.yaml" in before and "ckpt/last.ckpt" in before
        assert any(name.startswith("tb/run/events.out.tfevents") for name in before)
        yield root, before


@pytest.fixture
def no_training(monkeypatch):
    def training_step(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(BaseLM, "training_step", training_step)


def bad_source(root: Path, content: dict) -> None:
    content["model"] = {"class_path": "bam_lightning.lit.MoELM",
                        "init_args": {"config": {**MODEL, "n_experts": 2}}}
    content["trainer"]["callbacks"].append({"class_path": "bam_lightning.callbacks.UpcyclingCallback",
                                            "init_args": {"method": "btx", "sources": [
                                                str(root / "ckpt" / "last.ckpt"), str(root / "missing.ckpt")]}})


def bad_betas(root: Path, content: dict) -> None:
    content["model"]["init_args"]["betas"] = [0.9, 1.5]


def long_windows(root: Path, content: dict) -> None:
    content["data"]["seq_len"] = 32


def unwritable_checkpoints(root: Path, content: dict) -> None:
    (root / "a_file").write_text("")
    content["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(root / "a_file" / "ckpt")


def no_steps(root: Path, content: dict) -> None:
    content["trainer"]["max_steps"] = 0


def endless(root: Path, content: dict) -> None:
    content["trainer"]["max_steps"] = -1


@pytest.mark.parametrize("edit, error, message", [
    (bad_source, UserError, "missing.ckpt: checkpoint file not found"),
    (bad_betas, ValueError, "model.init_args (lr=0.001, betas=(0.9, 1.5), weight_decay=0.1): AdamW refuses it: "
                            "Invalid beta parameter at index 1: 1.5"),
    (long_windows, ValueError, "data.seq_len (32) is longer than model.init_args.config.max_seq_len (16)"),
    (unwritable_checkpoints, ValueError, "ModelCheckpoint init_args.dirpath: cannot write to"),
    (no_steps, ValueError, "trainer.max_steps is 0: there is nothing to train"),
    (endless, ValueError, "trainer.max_steps is -1 (no limit), but the training stream never ends"),
])
def test_a_failing_fit_leaves_the_earlier_runs_outputs_untouched(earlier_run, tmp_path, monkeypatch, no_training,
                                                                   edit, error, message):
    root, before = earlier_run
    monkeypatch.setenv("BAM_CACHE_DIR", str(root / "cache"))
    content = copy.deepcopy(recipe(root))
    edit(root, content)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(error, match=re.escape(message)):
        run_lightning_cli(["fit", "--config", str(path)])
    assert snapshot(root) == before


class FailAtSanityCheck(L.Callback):
    """A failure no pre-fit check can foresee, after Lightning's setup."""

    def on_sanity_check_start(self, trainer, pl_module):
        raise RuntimeError("late failure")


def test_the_config_is_written_only_when_training_starts(earlier_run, tmp_path, monkeypatch, no_training):
    root, before = earlier_run
    monkeypatch.setenv("BAM_CACHE_DIR", str(root / "cache"))
    content = copy.deepcopy(recipe(root))
    content["model"]["init_args"]["lr"] = 0.5  # a different config.yaml, if it were written
    content["trainer"]["num_sanity_val_steps"] = 1
    content["trainer"]["callbacks"].append({"class_path": f"{__name__}.FailAtSanityCheck"})
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(RuntimeError, match="late failure"):
        run_lightning_cli(["fit", "--config", str(path)])
    after = snapshot(root)
    assert after["tb/run/config.yaml"] == before["tb/run/config.yaml"]
    assert after["ckpt/last.ckpt"] == before["ckpt/last.ckpt"]


def write_pipeline(tmp_path: Path, seed_steps) -> Path:
    seed = tmp_path / "seed.yaml"
    seed.write_text(yaml.safe_dump({"trainer": {"max_steps": seed_steps}}))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "seed": str(seed), "experts": {},
                                    "mixtures": {}}))
    return path


@pytest.mark.parametrize("steps", [0, -1, None])
def test_a_pipeline_refuses_stages_without_a_step_count_before_running_any(tmp_path, steps):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'seed.yaml'}: trainer.max_steps must be a "
                                                   f"positive number of steps, got {steps!r}")):
        load_pipeline_config(str(write_pipeline(tmp_path, steps)))


def test_the_pipeline_says_rerun_only_when_a_rerun_helps(tmp_path):
    stage = Stage("seed", "seed", "seed", "recipes/seed.yaml")
    config = tmp_path / "config.yaml"
    killed = failure_message("[1/3] seed", -9, stage, config)
    assert "stopped by signal 9" in killed and "Re-run the same command to resume" in killed
    (tmp_path / "error.txt").write_text("ValueError: data.seq_len (256) is longer than model.init_args.config.max_seq_len (128)")
    failed = failure_message("[1/3] seed", 1, stage, config)
    assert "resume" not in failed
    assert "failed: ValueError: data.seq_len (256)" in failed and "Fix the stage's recipe recipes/seed.yaml" in failed
    (tmp_path / "error.txt").write_text("KeyboardInterrupt: ")
    assert "Re-run the same command to resume" in failure_message("[1/3] seed", 1, stage, config)


def test_a_stage_is_recorded_done_only_with_its_final_checkpoint(tmp_path):
    from bam_lightning.pipeline import check_stage_checkpoint

    last = tmp_path / "last.ckpt"
    with pytest.raises(SystemExit, match=re.escape(f"[1/3] seed finished without writing {last}")):
        check_stage_checkpoint("[1/3] seed", last, 6)
    state = {"state_dict": {}, "hyper_parameters": {"config": MODEL}, "global_step": 4}
    torch.save({**state, "bam_lightning": {"global_step": 4, "max_steps": 6, "final": False}}, last)
    with pytest.raises(SystemExit, match=re.escape(f"[1/3] seed finished, but {last} holds step 4 of 6, "
                                                   "not its final step")):
        check_stage_checkpoint("[1/3] seed", last, 6)
    torch.save({**state, "bam_lightning": {"global_step": 4, "max_steps": 4, "final": True}}, last)
    with pytest.raises(SystemExit, match=re.escape(f"{last}: holds step 4, but the stage trained 6 steps")):
        check_stage_checkpoint("[1/3] seed", last, 6)
    check_stage_checkpoint("[1/3] seed", last, 4)
