"""A killed run loses nothing: checkpoints are replaced atomically, and `bam fit --ckpt_path
last.ckpt` after SIGKILLs (three, at random moments, each resuming the previous resume; with 0
or 2 loader workers) continues exactly where the uninterrupted run would be."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from bam_lightning.checkpoint import AtomicCheckpointIO
from bam_lightning.errors import DiskFullError
from bam_lightning.lightning_cli import run_lightning_cli

# --- atomic writes ----------------------------------------------------------------------------


def checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 64), value)}, "global_step": int(value)}


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(checkpoint(1.0), path)
    real_save = torch.save

    def disk_full_halfway(obj, target):
        real_save(obj, target)
        size = os.path.getsize(target)
        with open(target, "r+b") as handle:
            handle.truncate(size // 2)  # the torn file an in-place writer would leave
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_halfway)
    with pytest.raises(DiskFullError, match=f"no space left on device: cannot write {re.escape(str(path))}.*"
                                            "The previous last.ckpt is intact"):
        io.save_checkpoint(checkpoint(2.0), path)
    monkeypatch.undo()
    restored = io.load_checkpoint(path)
    assert restored["global_step"] == 1 and torch.equal(restored["state_dict"]["w"], torch.ones(64, 64))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_the_next_write_removes_the_temporary_file_of_a_killed_one(tmp_path):
    path = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.0badf00d.tmp"  # what a SIGKILL during a write leaves behind
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / ".other.ckpt.0badf00d.tmp").write_bytes(b"another file's")
    AtomicCheckpointIO().save_checkpoint(checkpoint(3.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.0badf00d.tmp", "last.ckpt"]
    assert torch.load(path, weights_only=True)["global_step"] == 3


def test_remote_paths_keep_lightnings_writer():
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(4.0), "memory://bucket/run/last.ckpt")
    assert io.load_checkpoint("memory://bucket/run/last.ckpt")["global_step"] == 4


def test_a_torn_checkpoint_is_named_when_loaded(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(5.0), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable checkpoint, the file is truncated")):
        io.load_checkpoint(path)


MINIMAL_RECIPE = {
    "trainer": {"accelerator": "cpu", "logger": False},
    "model": {"class_path": "bam_lightning.lit.DenseLM",
              "init_args": {"config": {"n_layer": 1, "d_model": 16, "n_head": 2, "max_seq_len": 16}}},
    "data": {"domains": {"mine": "unused.txt"}},
}


def test_every_cli_run_writes_checkpoints_atomically_and_recipes_may_set_their_own_plugins(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(MINIMAL_RECIPE))
    cli = run_lightning_cli(["--config", str(path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO

    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["plugins"] == [{"class_path": "bam_lightning.checkpoint.AtomicCheckpointIO"}]

    # A recipe's own list replaces the default (the comment in cli.py says to list ours too).
    own = {**MINIMAL_RECIPE, "trainer": {**MINIMAL_RECIPE["trainer"], "plugins": [
        {"class_path": "lightning.fabric.plugins.environments.LightningEnvironment"},
        {"class_path": "bam_lightning.checkpoint.AtomicCheckpointIO"}]}}
    path.write_text(yaml.safe_dump(own))
    cli = run_lightning_cli(["--config", str(path)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert [type(p).__name__ for p in cli.config_init.trainer.plugins] == ["LightningEnvironment",
                                                                           "AtomicCheckpointIO"]


# --- exact resume after SIGKILL ---------------------------------------------------------------

MAX_STEPS = 14

LOSS_LOG = '''
import json, os, time
import lightning as L


class LossLog(L.Callback):
    """Appends each step's training loss at once, so a killed run keeps every line it wrote.
    STEP_PAUSE_S slows a run down so the test can kill it part-way; it changes no number."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"pid": os.getpid(), "step": trainer.global_step, "loss": float(outputs["loss"])}
        with open("losses.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\\n")
        time.sleep(float(os.environ.get("STEP_PAUSE_S", "0")))
'''


def write_study(root: Path) -> Path:
    """Two tiny text domains, the callback module and a recipe that checkpoints every step."""
    for domain, words in (("animals", "cat dog owl fox hen"), ("numbers", "one two three four five")):
        folder = root / domain
        folder.mkdir()
        for i in range(6):
            vocabulary = words.split()
            text = " ".join(vocabulary[(i * j) % 5] for j in range(400))
            (folder / f"{i}.txt").write_text(text)
    (root / "loss_log.py").write_text(LOSS_LOG)
    recipe = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "logger": False,
            "val_check_interval": 4, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",  # into ./checkpoints
                 "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}},
                {"class_path": "loss_log.LossLog"},
            ],
        },
        "model": {"class_path": "bam_lightning.lit.DenseLM", "init_args": {
            "lr": 0.01, "warmup_steps": 2,
            "config": {"n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16}}},
        "data": {"domains": {d: str(root / d / "*.txt") for d in ("animals", "numbers")},
                 "train_weights": {"animals": 0.7, "numbers": 0.3},
                 "seq_len": 16, "batch_size": 4, "val_fraction": 0.2, "val_tokens_per_domain": 64},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def bam_fit(recipe: Path, run_dir: Path, *extra: str, pause_s: float = 0.0) -> subprocess.Popen:
    """`bam fit --config recipe` in its own process, inside `run_dir`."""
    run_dir.mkdir(exist_ok=True)
    env = dict(os.environ, BAM_CACHE_DIR=str(run_dir / "cache"), STEP_PAUSE_S=str(pause_s),
               PYTHONPATH=os.pathsep.join(filter(None, [str(recipe.parent), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, "-m", "bam_lightning.cli", "fit", "--config", str(recipe), *extra],
                            cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(run_dir: Path) -> list[dict]:
    path = run_dir / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The study and its uninterrupted run (0 workers), run in this process: no second start-up."""
    root = tmp_path_factory.mktemp("resume")
    recipe = write_study(root)
    whole_dir = root / "uninterrupted"
    whole_dir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(whole_dir)
        patch.setenv("BAM_CACHE_DIR", str(whole_dir / "cache"))
        patch.syspath_prepend(str(root))  # loss_log.py
        run_lightning_cli(["fit", "--config", str(recipe)])
    return recipe, whole_dir


def test_three_random_sigkills_change_no_loss_and_no_weight(uninterrupted):
    """With 2 loader workers (their prefetched batches are lost at each kill). Without workers the
    same holds: test_training_processes.py kills a 2-process run, and test_pipeline.py a stage."""
    recipe, whole_dir = uninterrupted
    workers = 2
    killed_dir = recipe.parent / f"killed_{workers}_workers"
    rng = random.Random(workers)
    last = killed_dir / "checkpoints" / "last.ckpt"
    attempts = []
    for _ in range(3):
        before = len(losses(killed_dir))
        resume = ["--ckpt_path", "checkpoints/last.ckpt"] if last.exists() else []
        run = bam_fit(recipe, killed_dir, f"--data.num_workers={workers}", *resume, pause_s=0.5)
        wanted = before + rng.randint(1, 3)  # a random moment: after 1-3 new steps, then mid-step
        deadline = time.time() + 240
        while len(losses(killed_dir)) < wanted and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
        run.send_signal(signal.SIGKILL)
        output, _ = run.communicate()
        assert run.returncode == -signal.SIGKILL, output[-4000:]  # killed mid-run, not finished
        attempts.append(losses(killed_dir)[before:])
    resumed = bam_fit(recipe, killed_dir, f"--data.num_workers={workers}", "--ckpt_path", "checkpoints/last.ckpt")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-4000:]

    expected = {r["step"]: r["loss"] for r in losses(whole_dir)}
    assert sorted(expected) == list(range(1, MAX_STEPS + 1))
    records = losses(killed_dir)
    assert all(attempts) and len({r["pid"] for r in records}) == 4
    assert attempts[-1][-1]["step"] < MAX_STEPS  # every kill came before the end
    for record in records:  # every step, also those redone after a kill, agrees exactly
        assert record["loss"] == pytest.approx(expected[record["step"]], rel=1e-6, abs=0), record
    assert {r["step"] for r in records} == set(expected)

    final_whole = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(last, weights_only=True)
    assert final_whole["global_step"] == final_resumed["global_step"] == MAX_STEPS
    assert final_whole["state_dict"].keys() == final_resumed["state_dict"].keys()
    for key, value in final_whole["state_dict"].items():
        torch.testing.assert_close(final_resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
