"""Every `bam` command on several processes, started the ways users start them: Lightning's own
launcher (`bam fit --trainer.devices 2`), torchrun on one machine, and torchrun as two "nodes" of
one process each. Each run is a subprocess with a timeout, so a hang fails instead of blocking."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

MAX_STEPS = 4
BAM = str(Path(sys.executable).with_name("bam"))  # the console script users run
MODULE = [sys.executable, "-m", "bam_lightning.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def write_recipe(root: Path, **trainer) -> Path:
    """Two tiny word domains and a recipe that checkpoints into ./checkpoints."""
    for domain, words in (("animals", "cat dog owl fox hen"), ("numbers", "one two three four five")):
        folder = root / domain
        folder.mkdir(exist_ok=True)
        for i in range(6):
            vocabulary = words.split()
            (folder / f"{i}.txt").write_text(" ".join(vocabulary[(i * j) % 5] for j in range(400)))
    recipe = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": MAX_STEPS, "logger": False,
            "val_check_interval": MAX_STEPS, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": "checkpoints", "save_last": True, "save_top_k": 0,
                                         "every_n_train_steps": 2}}],
            **trainer,
        },
        "model": {"class_path": "bam_lightning.lit.DenseLM", "init_args": {
            "lr": 0.01, "warmup_steps": 1,
            "config": {"n_layer": 1, "d_model": 16, "n_head": 2, "d_ff": 32, "max_seq_len": 16}}},
        "data": {"domains": {d: str(root / d / "*.txt") for d in ("animals", "numbers")},
                 "train_weights": {"animals": 0.7, "numbers": 0.3},
                 "seq_len": 16, "batch_size": 4, "val_fraction": 0.2, "val_tokens_per_domain": 64},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return write_recipe(tmp_path_factory.mktemp("launch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], run_dir: Path, recipe: Path, **env: str) -> subprocess.Popen:
    """`command` in `run_dir`, in its own process group (a timeout stops every rank it started)."""
    run_dir.mkdir(exist_ok=True)
    environment = dict(os.environ, BAM_CACHE_DIR=str(recipe.parent / "cache"), PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(command, cwd=run_dir, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish in {timeout} s:\n{output[-4000:]}")
    return process.returncode, output


def run(command: list[str], run_dir: Path, recipe: Path, timeout: float = 180, **env: str) -> str:
    code, output = finish(start(command, run_dir, recipe, **env), timeout)
    assert code == 0, output[-4000:]
    return output


def assert_trained_once(run_dir: Path, output: str, processes: int) -> None:
    """The fit ran as one job of `processes` ranks and left one final `last.ckpt`."""
    assert f"Starting with {processes} processes" in output, output[-4000:]
    assert output.count(f"`max_steps={MAX_STEPS}` reached") == 1, output[-4000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == MAX_STEPS and saved["bam_lightning"]["final"]


def test_bam_fit_and_validate_on_two_processes_with_lightnings_launcher(recipe):
    """Lightning starts rank 1 by running `sys.argv` again: the `bam` script and `python -m`."""
    run_dir = recipe.parent / "ddp"
    output = run([BAM, "fit", "--config", str(recipe), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                 run_dir, recipe)
    assert_trained_once(run_dir, output, 2)
    assert "LightningCLI's args parameter" not in output
    validated = run([*MODULE, "validate", "--config", str(recipe), "--trainer.devices", "2",
                     "--trainer.strategy", "ddp", "--ckpt_path", "checkpoints/last.ckpt"], run_dir, recipe)
    assert "Starting with 2 processes" in validated and "val/avg/ppl" in validated, validated[-4000:]


def test_bam_fit_with_fsdp2_from_the_command_line(recipe):
    """ModelParallelStrategy is a class with arguments: the `class_path` form (a dotted name alone
    is read as a strategy name and refused)."""
    run_dir = recipe.parent / "fsdp2"
    output = run([BAM, "fit", "--config", str(recipe), "--trainer.devices", "2",
                  "--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy",
                  "--trainer.strategy.init_args.data_parallel_size", "2",
                  "--trainer.strategy.init_args.tensor_parallel_size", "1",
                  "--trainer.strategy.init_args.save_distributed_checkpoint", "false"], run_dir, recipe)
    assert_trained_once(run_dir, output, 2)


def test_torchrun_on_one_machine(recipe):
    run_dir = recipe.parent / "torchrun"
    output = run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "bam_lightning.cli", "fit",
                  "--config", str(recipe), "--trainer.devices", "2", "--trainer.strategy", "ddp"], run_dir, recipe)
    assert_trained_once(run_dir, output, 2)


def test_torchrun_as_two_nodes_of_one_process(recipe):
    run_dir, port = recipe.parent / "two_nodes", free_port()
    nodes = [start([*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                    "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "bam_lightning.cli", "fit",
                    "--config", str(recipe), "--trainer.num_nodes", "2", "--trainer.strategy", "ddp"],
                   run_dir, recipe) for rank in (0, 1)]
    results = [finish(node) for node in nodes]
    for code, output in results:
        assert code == 0, output[-4000:]
    assert_trained_once(run_dir, results[0][1], 2)


def test_a_rank_that_cannot_meet_the_others_stops_within_the_timeout_naming_the_cause(recipe):
    """Node 0 of two started by hand (Lightning's environment variables), node 1 never: rank 0
    gives up after the strategy's timeout, here 10 s, and says what was missing."""
    run_dir, timeout_s = recipe.parent / "alone", 10
    started = time.monotonic()
    process = start([BAM, "fit", "--config", str(recipe), "--trainer.num_nodes", "2",
                     "--trainer.strategy.class_path", "lightning.pytorch.strategies.DDPStrategy",
                     "--trainer.strategy.init_args.timeout", f"0:00:{timeout_s}"], run_dir, recipe,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0")
    code, output = finish(process, timeout=120)
    elapsed = time.monotonic() - started
    assert code == 1, output[-4000:]
    assert "bam fit: this process could not meet the other ranks" in output, output[-4000:]
    assert "1/2 clients joined" in output and "--trainer.strategy.init_args.timeout" in output
    assert timeout_s <= elapsed < timeout_s + 60  # start-up plus the wait, not Lightning's 30 minutes
    assert not (run_dir / "checkpoints").exists()
