"""What a 2-process fit equals, and that it resumes exactly after a kill.

The training stream hands global batch g to rank g mod world, so step s of a 2-process run trains
global batches 2s and 2s+1: the samples of batch s of a 1-process run with twice the per-process
batch, in the same order. DDP averages the two ranks' gradients, which is that run's gradient up
to float rounding. So a dense model's 2-process run equals the 1-process run with twice the batch
(the samples exactly, the losses and weights to float tolerance). Both 2-process runs go through
`bam fit` under torchrun; the killed one loses every process at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_resume import MAX_STEPS, write_study

from bam_lightning.lightning_cli import run_lightning_cli

RANK_LOG = '''
import json, os, time
import lightning as L


class RankLog(L.Callback):
    """Each rank appends its step's loss and batch at once (a killed run keeps what it wrote)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"pid": os.getpid(), "rank": trainer.global_rank, "step": trainer.global_step,
                  "loss": float(outputs["loss"]), "batch": batch.tolist()}
        with open(f"steps{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\\n")
        time.sleep(float(os.environ.get("STEP_PAUSE_S", "0")))
'''


def records(run_dir: Path, rank: int) -> list[dict]:
    path = run_dir / f"steps{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def torchrun_fit(recipe: Path, run_dir: Path, *extra: str, pause_s: float = 0.0) -> subprocess.Popen:
    """`bam fit` on 2 processes under torchrun, in a new session (so the test can kill them all)."""
    run_dir.mkdir(exist_ok=True)
    env = dict(os.environ, BAM_CACHE_DIR=str(recipe.parent / "cache"), STEP_PAUSE_S=str(pause_s),
               PYTHONPATH=os.pathsep.join(filter(None, [str(recipe.parent), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "bam_lightning.cli", "fit", "--config", str(recipe), "--trainer.devices=2",
               "--trainer.strategy=ddp", *extra]
    return subprocess.Popen(command, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(run: subprocess.Popen) -> str:
    try:
        output, _ = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        output, _ = run.communicate()
    assert run.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The resume test's study with the rank log, its 1-process run at batch 8 (in this process),
    and its uninterrupted 2-process run at batch 4 per process."""
    root = tmp_path_factory.mktemp("two_processes")
    recipe = write_study(root)
    (root / "rank_log.py").write_text(RANK_LOG)
    settings = yaml.safe_load(recipe.read_text())
    settings["trainer"]["callbacks"] = [
        c if c["class_path"] != "loss_log.LossLog" else {"class_path": "rank_log.RankLog"}
        for c in settings["trainer"]["callbacks"]]
    recipe.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert settings["data"]["batch_size"] == 4

    one_dir = root / "one_process"
    one_dir.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(one_dir)
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        patch.syspath_prepend(str(root))
        run_lightning_cli(["fit", "--config", str(recipe), "--data.batch_size=8"])
    two_dir = root / "two_processes"
    output = finish(torchrun_fit(recipe, two_dir))
    # `torchrun --nproc-per-node 2 -m bam_lightning.cli fit`: one 2-process job, reported once
    assert output.count("Starting with 2 processes") == 1 and output.count(f"`max_steps={MAX_STEPS}` reached") == 1
    return recipe, one_dir, two_dir


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    return checkpoint["state_dict"]


def test_two_processes_train_what_one_process_trains_with_twice_the_batch(study):
    _, one_dir, two_dir = study
    one = {r["step"]: r for r in records(one_dir, 0)}
    ranks = [{r["step"]: r for r in records(two_dir, rank)} for rank in (0, 1)]
    assert sorted(one) == sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, MAX_STEPS + 1))
    for step, record in one.items():
        # the samples: rank 0's half batch, then rank 1's, are the 1-process batch, exactly
        assert record["batch"] == ranks[0][step]["batch"] + ranks[1][step]["batch"], step
        # the loss: the mean of the two half-batch means (equal halves) to float tolerance
        two = (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2
        assert two == pytest.approx(record["loss"], rel=1e-5), step
    ours, theirs = final_weights(two_dir), final_weights(one_dir)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():  # all-reduce rounding grown over 14 Adam steps, not one step's change
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_two_processes_resume_exactly_after_every_process_is_killed(study):
    recipe, _, two_dir = study
    killed_dir = recipe.parent / "killed"
    run = torchrun_fit(recipe, killed_dir, pause_s=0.3)
    deadline = time.time() + 240
    while len(records(killed_dir, 1)) < 5 and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # the whole job, as a lost node or a scheduler's kill -9: both ranks (torchrun starts each in
    # its own session), then torchrun
    for pid in {records(killed_dir, rank)[-1]["pid"] for rank in (0, 1)}:
        os.kill(pid, signal.SIGKILL)
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate()
    killed_at = [len(records(killed_dir, rank)) for rank in (0, 1)]
    assert 5 <= max(killed_at) < MAX_STEPS and (killed_dir / "checkpoints" / "last.ckpt").is_file()

    finish(torchrun_fit(recipe, killed_dir, "--ckpt_path", "checkpoints/last.ckpt"))
    for rank in (0, 1):
        expected = {r["step"]: r for r in records(two_dir, rank)}
        got = records(killed_dir, rank)
        assert len({r["pid"] for r in got}) == 2 and {r["step"] for r in got} == set(expected)
        for record in got:  # every step, also those redone after the kill, exactly
            assert record["batch"] == expected[record["step"]]["batch"], record["step"]
            assert record["loss"] == expected[record["step"]]["loss"], record["step"]
    ours, theirs = final_weights(killed_dir), final_weights(two_dir)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
