"""Every `bam` command on several processes, started the ways users start them: Lightning's own
launcher (`bam fit --trainer.devices 2`) and torchrun as two "nodes" of one process each (torchrun
on one machine: test_training_processes.py). Each run is a subprocess with a timeout, so a hang
fails instead of blocking."""

from __future__ import annotations

import json
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
from helpers import finish as finish_process

MAX_STEPS = 4
BAM = str(Path(sys.executable).with_name("bam"))  # the console script users run
MODULE = [sys.executable, "-m", "bam_lightning.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


STEP_LOG = '''
import json, os, time
import lightning as L


class StepLog(L.Callback):
    """Appends each step (rank, step, loss) at once; STEP_PAUSE_S slows a run down so a test can
    signal it part-way. It changes no number."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"rank": trainer.global_rank, "step": trainer.global_step, "loss": float(outputs["loss"])}
        with open("steps.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\\n")
        time.sleep(float(os.environ.get("STEP_PAUSE_S", "0")))
'''


def write_recipe(root: Path, max_steps: int = MAX_STEPS, every_n_train_steps: int = 2, **trainer) -> Path:
    """Two tiny word domains and a recipe that checkpoints into ./checkpoints."""
    (root / "step_log.py").write_text(STEP_LOG)
    for domain, words in (("animals", "cat dog owl fox hen"), ("numbers", "one two three four five")):
        folder = root / domain
        folder.mkdir(exist_ok=True)
        for i in range(6):
            vocabulary = words.split()
            (folder / f"{i}.txt").write_text(" ".join(vocabulary[(i * j) % 5] for j in range(400)))
    recipe = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "val_check_interval": max_steps, "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": "checkpoints", "save_last": True, "save_top_k": 0,
                                         "every_n_train_steps": every_n_train_steps}},
                          {"class_path": "step_log.StepLog"}],
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
    path = os.pathsep.join(filter(None, [str(recipe.parent), os.environ.get("PYTHONPATH")]))  # step_log.py
    environment = dict(os.environ, BAM_CACHE_DIR=str(recipe.parent / "cache"), PYTHONUNBUFFERED="1",
                       PYTHONPATH=path, **env)
    return subprocess.Popen(command, cwd=run_dir, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    return finish_process(process, timeout)


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
    gives up after the strategy's timeout, here 4 s, and says what was missing."""
    run_dir, timeout_s = recipe.parent / "alone", 4
    started = time.monotonic()
    process = start([BAM, "fit", "--config", str(recipe), "--trainer.num_nodes", "2",
                     "--trainer.strategy.class_path", "lightning.pytorch.strategies.DDPStrategy",
                     "--trainer.strategy.init_args.timeout", f"0:00:{timeout_s:02d}"], run_dir, recipe,
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NODE_RANK="0")
    code, output = finish(process, timeout=120)
    elapsed = time.monotonic() - started
    assert code == 1, output[-4000:]
    assert "bam fit: this process could not meet the other ranks" in output, output[-4000:]
    assert "1/2 clients joined" in output and "--trainer.strategy.init_args.timeout" in output
    assert timeout_s <= elapsed < timeout_s + 60  # start-up plus the wait, not Lightning's 30 minutes
    assert not (run_dir / "checkpoints").exists()


# --- SIGTERM (preemption) -----------------------------------------------------------------------
SIGTERM_STEPS = 10


@pytest.fixture(scope="module")
def preemptible(tmp_path_factory):
    """A recipe whose interval checkpoints never come (every 100 steps), and its uninterrupted run
    (in this process: no second start-up)."""
    from bam_lightning.lightning_cli import run_lightning_cli

    root = tmp_path_factory.mktemp("sigterm")
    recipe = write_recipe(root, max_steps=SIGTERM_STEPS, every_n_train_steps=100)
    whole = root / "uninterrupted"
    whole.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(whole)
        patch.setenv("BAM_CACHE_DIR", str(root / "cache"))
        patch.syspath_prepend(str(root))
        run_lightning_cli(["fit", "--config", str(recipe)])
    return recipe, whole


def steps(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def terminate_after(process: subprocess.Popen, run_dir: Path, n_steps: int) -> tuple[int, str]:
    """SIGTERM to the command's own process (rank 0) once `n_steps` steps are logged."""
    deadline = time.time() + 120
    while len(steps(run_dir)) < n_steps and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    return finish(process)


def assert_saved_at_the_step_reached(run_dir: Path, code: int, output: str) -> int:
    """Exit 143, and `last.ckpt` holds the last step any rank trained."""
    assert code == 143, output[-4000:]
    reached = max(r["step"] for r in steps(run_dir))
    assert 3 <= reached < SIGTERM_STEPS, output[-4000:]
    assert f"SIGTERM: saved step {reached} to " in output, output[-4000:]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == reached and not saved["bam_lightning"]["final"]
    return reached


def assert_all_exit(process: subprocess.Popen, within_s: float = 60) -> None:
    """Every rank the command started ends too (rank 1 may finish its exit after rank 0)."""
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"a rank of {process.args} was still running {within_s} s after rank 0 exited")


def assert_resumed_exactly(run_dir: Path, whole: Path, reached: int) -> None:
    expected = {r["step"]: r["loss"] for r in steps(whole)}
    after = [r for r in steps(run_dir) if r["step"] > reached]
    assert sorted({r["step"] for r in after}) == list(range(reached + 1, SIGTERM_STEPS + 1))
    for record in after:
        assert record["loss"] == expected[record["step"]], record
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == SIGTERM_STEPS and final["bam_lightning"]["final"]
    for key, value in reference["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_sigterm_saves_the_step_reached_exits_143_and_resumes_exactly(preemptible):
    recipe, whole = preemptible
    run_dir = recipe.parent / "terminated"
    command = [BAM, "fit", "--config", str(recipe)]
    code, output = terminate_after(start(command, run_dir, recipe, STEP_PAUSE_S="0.4"), run_dir, 3)
    reached = assert_saved_at_the_step_reached(run_dir, code, output)
    run([*command, "--ckpt_path", "checkpoints/last.ckpt"], run_dir, recipe)
    assert_resumed_exactly(run_dir, whole, reached)


def test_sigterm_to_rank_0_stops_both_ranks_after_the_same_step(preemptible):
    """Kubernetes signals the container's first process only: rank 1 (started by Lightning's
    launcher) learns of it through the per-step agreement, saves with rank 0 and exits too."""
    recipe, _ = preemptible
    run_dir = recipe.parent / "terminated_ddp"
    command = [BAM, "fit", "--config", str(recipe), "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    process = start(command, run_dir, recipe, STEP_PAUSE_S="0.4")
    code, output = terminate_after(process, run_dir, 6)
    reached = assert_saved_at_the_step_reached(run_dir, code, output)
    assert {max(r["step"] for r in steps(run_dir) if r["rank"] == rank) for rank in (0, 1)} == {reached}
    assert_all_exit(process)
    # resuming it is a 2-process resume from a mid-run checkpoint: exact (test_training_processes.py)


def test_shipped_fsdp2_recipes_shard_over_every_process():
    """ModelParallelStrategy needs data_parallel_size x tensor_parallel_size = devices x num_nodes;
    its `auto` data-parallel size is num_nodes, which fails at start-up on 8 GPUs of one node."""
    checked = 0
    for path in sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml")):
        trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        strategy = trainer.get("strategy")
        if isinstance(strategy, dict) and strategy["class_path"].endswith("ModelParallelStrategy"):
            sizes = strategy["init_args"]
            processes = trainer["devices"] * trainer.get("num_nodes", 1)
            assert sizes["data_parallel_size"] * sizes["tensor_parallel_size"] == processes, path
            checked += 1
    assert checked >= 16  # paper_590m and paper_2b: every stage recipe and both studies


def test_gpu_check_fit_overlay_shards_over_its_one_gpu(tmp_path):
    """benchmarks/gpu_check.sh runs `bam fit` with benchmarks/gpu_fit.yaml laid over the paper_590m
    BAM recipe on one GPU: the merged strategy must shard over that one process (the recipe's 8
    failed at start-up there). Read from the CLI's own merge, as the check runs it."""
    root = Path(__file__).parents[1]
    result = subprocess.run([BAM, "fit", "--config", str(root / "recipes/paper_590m/bam.yaml"),
                             "--config", str(root / "benchmarks/gpu_fit.yaml"), "--print_config"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    trainer = yaml.safe_load(result.stdout)["trainer"]
    sizes = trainer["strategy"]["init_args"]
    assert trainer["devices"] == 1
    assert sizes["data_parallel_size"] * sizes["tensor_parallel_size"] == trainer["devices"] * trainer["num_nodes"]
