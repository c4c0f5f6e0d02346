"""The same training on two CPU processes (gloo) as on one: FSDP2 gives one process's validation
metrics and weights for the same global batch, and its sharded and full checkpoints reload into
one process and into two. (DDP against one process: test_training_processes.py, through `bam fit`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from bam_lightning.checkpoint import read_checkpoint
from bam_lightning.lit import DenseLM

# Imported by this test for the one-process reference and run as a script for two processes
# (Lightning's launcher starts the second rank by running the script again).
SCRIPT = '''
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, DistributedSampler

from bam_lightning.config import ModelConfig
from bam_lightning.lit import DenseLM

CONFIG = ModelConfig(vocab_size=40, n_layer=1, d_model=16, n_head=2, d_ff=32, max_seq_len=16)
EPOCH_STEPS, GLOBAL_BATCH = 4, 8


def blocks(n, seed):
    """Token blocks counting up by 1 or 2 from a random start: the loss falls in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(0, 40, (n, 1), generator=g), torch.randint(1, 3, (n, 1), generator=g)
    return (start + stride * torch.arange(17)) % 40


class Snapshots(L.Callback):
    """Full weights and validation metrics after each validation. Gathering an FSDP2 module's
    weights is a collective, so every rank takes part."""

    def __init__(self):
        self.taken = []

    def on_validation_end(self, trainer, pl_module):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {k: v.clone() for k, v in get_model_state_dict(pl_module.model, options=options).items()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.taken.append({"weights": weights, "metrics": metrics})


def run(devices, strategy, epochs, ckpt_path=None, save_as=None, validate_only=False):
    """On two processes Lightning gives each loader a DistributedSampler (seeded by
    seed_everything; training shuffled, validation not): rank r takes items r, r+2, ... of one
    permutation, so the two half batches of a step hold the items of one full batch of that
    permutation. One process draws the same permutation from a one-replica DistributedSampler.

    `save_as` (a path ending in .ckpt) checkpoints after the last step, inside the training loop
    as a run's `last.ckpt` is: a checkpoint saved after `fit()` returns resumes one epoch later."""
    L.seed_everything(0)
    callbacks = [Snapshots()]
    if save_as:
        callbacks.append(ModelCheckpoint(dirpath=Path(save_as).parent, filename=Path(save_as).stem,
                                         every_n_train_steps=epochs * EPOCH_STEPS))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=epochs * EPOCH_STEPS,
                        logger=False, enable_checkpointing=bool(save_as), enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)
    batch = GLOBAL_BATCH // devices
    data = blocks(EPOCH_STEPS * GLOBAL_BATCH, 0)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0) if devices == 1 else None
    train = DataLoader(data, batch_size=batch, sampler=sampler)
    val = [DataLoader(blocks(16, 1), batch_size=batch), DataLoader(blocks(16, 2), batch_size=batch)]
    module = DenseLM(CONFIG, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0)  # a constant rate: any max_steps
    if validate_only:
        trainer.validate(module, val, ckpt_path=ckpt_path, verbose=False)
    else:
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, callbacks[0].taken


def fsdp2(save_distributed_checkpoint=True):
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                 save_distributed_checkpoint=save_distributed_checkpoint)


if __name__ == "__main__":
    out, results = sys.argv[1], {}
    # The first checkpoint is a folder of per-rank shards, the second one file written by rank 0.
    trainer, results["fsdp2"] = run(2, fsdp2(), epochs=1, save_as=f"{out}/sharded.ckpt")
    trainer, results["fsdp2_resumed"] = run(2, fsdp2(save_distributed_checkpoint=False), epochs=2,
                                            ckpt_path=f"{out}/sharded.ckpt", save_as=f"{out}/full.ckpt")
    trainer, results["fsdp2_validated"] = run(2, fsdp2(), epochs=2, ckpt_path=f"{out}/full.ckpt",
                                              validate_only=True)
    if trainer.global_rank == 0:
        torch.save(results, f"{out}/results.pt")
'''


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multiprocess")
    (folder / "two_processes.py").write_text(SCRIPT)
    sys.path.insert(0, str(folder))
    try:
        import two_processes
    finally:
        sys.path.remove(str(folder))
    yield folder, two_processes
    sys.modules.pop("two_processes", None)


@pytest.fixture(scope="module")
def one_process(script):
    """The reference: one process, batch GLOBAL_BATCH, two epochs (a validation after each)."""
    _, module = script
    return module.run(1, "auto", epochs=2)[1]


def launch(script_folder: Path, out: Path) -> dict:
    run = subprocess.run([sys.executable, str(script_folder / "two_processes.py"), str(out)],
                         cwd=out, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    # validation metrics are reduced across ranks: Lightning has nothing to warn about per key
    assert "It is recommended to use `self.log(" not in run.stderr, run.stderr[-4000:]
    return torch.load(out / "results.pt", weights_only=True)


def assert_same(got: dict, expected: dict) -> None:
    """Validation metrics and weights agree."""
    assert got["metrics"].keys() == expected["metrics"].keys() and len(got["metrics"]) == 6  # 2 domains + avg
    for key, value in expected["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5), key
    assert_same_weights(got["weights"], expected["weights"])


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Gradients averaged by all-reduce round differently from one process's mean: allow
    float32 noise grown over a few Adam steps (about 2e-7 here), far below one step's change (~1e-2)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fsdp2_matches_one_process_and_its_checkpoints_reload_on_one_or_two_processes(script, one_process,
                                                                                      tmp_path):
    folder, module = script
    results = launch(folder, tmp_path)
    after_epoch_1, after_epoch_2 = one_process
    (fsdp2,), (resumed,), (validated,) = results["fsdp2"], results["fsdp2_resumed"], results["fsdp2_validated"]
    assert_same(fsdp2, after_epoch_1)
    assert sorted((tmp_path / "sharded.ckpt").glob("*.distcp")) and (tmp_path / "full.ckpt").is_file()

    # Sharded -> two processes: Lightning resumes from the folder and trains on as one process would.
    assert_same(resumed, after_epoch_2)
    # Full -> two processes: validating the file re-shards it and gives the same metrics.
    assert_same(validated, after_epoch_2)

    # Sharded -> one process: a one-process Trainer reads files only; torch converts the folder.
    dcp_to_torch_save(tmp_path / "sharded.ckpt", tmp_path / "consolidated.pt")
    consolidated = torch.load(tmp_path / "consolidated.pt", weights_only=True)["state_dict"]
    single = DenseLM(module.CONFIG)
    single.load_state_dict(consolidated)
    assert_same_weights(single.model.state_dict(), after_epoch_1["weights"])

    # Full -> one process: bam_lightning's reader, Lightning's loader and a one-process validation.
    source = read_checkpoint(tmp_path / "full.ckpt")
    assert source.config == module.CONFIG
    assert_same_weights(source.state_dict, after_epoch_2["weights"])
    loaded = DenseLM.load_from_checkpoint(tmp_path / "full.ckpt", weights_only=True)
    assert_same_weights(loaded.model.state_dict(), after_epoch_2["weights"])
    _, (validated_here,) = module.run(1, "auto", epochs=2, ckpt_path=tmp_path / "full.ckpt", validate_only=True)
    assert_same(validated_here, after_epoch_2)
