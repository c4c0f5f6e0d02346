"""`bam pipeline` with two processes per stage: started by Lightning's launcher from the study's
`trainer.devices`, and by torchrun (every rank runs the pipeline; the stages run in lockstep).
Each stage trains once, as one two-process job, and rank 0 alone writes the records and report;
a rank killed mid-stage stops the pipeline naming the stage, and the same command resumes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import finish as finish_process
from helpers import random_dense_state_dict, save_lightning_checkpoint, tiny_config, write_domains

TWO_DDP = ["--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"]
STAGES = ["expert_digits", "bam"]
MODEL = {"vocab_size": 257, "n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16}


def write_study(root: Path, expert_steps: int = 4) -> Path:
    """An existing seed (random weights, the same in every test), one expert and BAM: two stages."""
    config = tiny_config(**MODEL)
    seed = save_lightning_checkpoint(root / "seed.ckpt", config, random_dense_state_dict(config, 0))
    schedule = {"lr": 0.003, "warmup_steps": 1}
    study = {
        "run_dir": str(root / "run"), "checkpoint_every_n_steps": 2, "seed_everything": 1,
        "data": {"domains": write_domains(root / "corpora"), "seq_len": 16, "batch_size": 4,
                 "val_tokens_per_domain": 128, "val_fraction": 0.2},
        "trainer": {"accelerator": "cpu", "devices": 1, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": MODEL,
        "seed": {"domain": "alpha", "checkpoint": str(seed)},
        "experts": {"domains": ["digits"], "train_weights": {"own": 0.9, "seed": 0.1}, "steps": expert_steps,
                    **schedule},
        "mixtures": {"methods": ["bam"], "steps": 4, **schedule},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def start(command: list[str], root: Path) -> subprocess.Popen:
    env = dict(os.environ, BAM_CACHE_DIR=str(root / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 420) -> tuple[int, str]:
    return finish_process(process, timeout)


def pipeline(study: Path, *launcher: str) -> list[str]:
    """`bam pipeline STUDY --set trainer.devices=2 --set trainer.strategy=ddp`, under `launcher`
    (e.g. torchrun) when given."""
    return [*(launcher or [sys.executable]), "-m", "bam_lightning.cli", "pipeline", str(study), *TWO_DDP]


def records(run_dir: Path) -> dict[str, dict]:
    return {name: json.loads((run_dir / "stages" / name / "stage.json").read_text()) for name in STAGES}


def assert_each_stage_trained_once_on_two_processes(output: str, run_dir: Path) -> None:
    assert "2 stages composed and checked" in output
    for number, name in enumerate(STAGES, 1):
        assert output.count(f"[{number}/2] {name}: training") == 1, output[-4000:]
    assert output.count("`max_steps=4` reached") == 2, output[-4000:]  # rank 0 reports each fit once
    for name, record in records(run_dir).items():
        assert record["steps"] == 4 and record["tokens"] == 4 * 2 * 4 * 16, name  # 2 processes x batch 4
        saved = torch.load(run_dir / "stages" / name / "checkpoints" / "last.ckpt", weights_only=True)
        assert saved["global_step"] == 4 and saved["bam_lightning"]["final"], name
    assert "| BAM DM Expert-KV |" in (run_dir / "report.md").read_text()
    assert not list(run_dir.rglob(".*.tmp")) and not list(run_dir.rglob("error.txt"))


@pytest.fixture(scope="module")
def launched_by_lightning(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_devices")
    code, output = finish(start(pipeline(write_study(root)), root))
    assert code == 0, output[-4000:]
    return root / "run", output


def test_a_study_with_two_devices_runs_each_stage_once_as_one_two_process_job(launched_by_lightning):
    run_dir, output = launched_by_lightning
    assert output.count("Starting with 2 processes") == 2, output[-4000:]
    assert_each_stage_trained_once_on_two_processes(output, run_dir)


def test_under_torchrun_every_rank_runs_the_pipeline_and_the_stages_run_in_lockstep(launched_by_lightning,
                                                                                      tmp_path):
    code, output = finish(start(pipeline(write_study(tmp_path), sys.executable, "-m", "torch.distributed.run",
                                         "--standalone", "--nproc-per-node", "2"), tmp_path))
    assert code == 0, output[-4000:]
    assert output.count("pipeline finished") == 1  # rank 1 followed; it did not run a pipeline of its own
    assert_each_stage_trained_once_on_two_processes(output, tmp_path / "run")
    # the same two-process training as Lightning's launcher gives
    expected = records(launched_by_lightning[0])
    for name, record in records(tmp_path / "run").items():
        assert record["final"]["val/avg/loss"] == pytest.approx(expected[name]["final"]["val/avg/loss"], rel=1e-6)


def stage_rank_1(root: Path) -> int | None:
    """The process Lightning's launcher started as rank 1 of the running stage."""
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"--stage" in command and b"LOCAL_RANK=1" in environ and f"BAM_CACHE_DIR={root}/cache".encode() in environ:
            return int(entry.name)
    return None


def test_a_rank_killed_mid_stage_stops_the_pipeline_naming_the_stage_and_a_rerun_finishes(launched_by_lightning,
                                                                                          tmp_path):
    """The finished study of the first test, copied with its prepared data, without its mixture,
    made longer: only that stage runs, and its rank 1 is killed once it has checkpointed."""
    run_dir, _ = launched_by_lightning
    shutil.copytree(run_dir, tmp_path / "run", ignore=lambda folder, _: {"bam"} if Path(folder).name == "stages" else set())
    shutil.copytree(run_dir.parent / "cache", tmp_path / "cache")
    study = yaml.safe_load((run_dir.parent / "study.yaml").read_text())
    study["run_dir"], study["mixtures"]["steps"] = str(tmp_path / "run"), 16
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    process = start(pipeline(tmp_path / "study.yaml"), tmp_path)
    checkpoint = tmp_path / "run" / "stages" / "bam" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    victim = stage_rank_1(tmp_path)
    assert checkpoint.exists() and victim is not None, "the mixture stage never checkpointed on two processes"
    os.kill(victim, signal.SIGKILL)
    code, output = finish(process)
    assert code == 1, output[-4000:]
    assert "[1/2] expert_digits: done earlier, skipped" in output and "[2/2] bam: training" in output
    assert "[2/2] bam stopped: another process of the stage stopped" in output, output[-4000:]
    assert "Re-run the same command to resume" in output
    assert not (tmp_path / "run" / "stages" / "bam" / "stage.json").exists()

    code, output = finish(start(pipeline(tmp_path / "study.yaml"), tmp_path))
    assert code == 0, output[-4000:]
    assert "[1/2] expert_digits: done earlier, skipped" in output and "[2/2] bam: resuming" in output
    assert json.loads((tmp_path / "run" / "stages" / "bam" / "stage.json").read_text())["steps"] == 16
    assert (tmp_path / "run" / "report.md").exists()


def test_sigterm_to_a_stage_stops_the_pipeline_with_its_step_saved_and_a_rerun_resumes(tmp_path):
    """Preemption reaches the stage's process: it saves the step it reached, and the pipeline
    exits 143 saying so (not a missing result.json); the same command then resumes."""
    study = write_study(tmp_path, expert_steps=120)
    command = [sys.executable, "-m", "bam_lightning.cli", "pipeline", str(study)]  # one process per stage
    process = start(command, tmp_path)
    checkpoint = tmp_path / "run" / "stages" / "expert_digits" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    (stage,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()  # the forked stage
    os.kill(int(stage), signal.SIGTERM)
    code, output = finish(process)
    assert code == 143, output[-4000:]
    assert "[1/2] expert_digits was stopped by SIGTERM (its last step is saved). Re-run the same command" in output
    assert "Traceback" not in output, output[-4000:]
    saved = torch.load(checkpoint, weights_only=True)
    assert 2 <= saved["global_step"] < 120 and not saved["bam_lightning"]["final"]

    code, output = finish(start(command, tmp_path))
    assert code == 0, output[-4000:]
    assert "[1/2] expert_digits: resuming" in output
    assert json.loads((tmp_path / "run" / "stages" / "expert_digits" / "stage.json").read_text())["steps"] == 120
