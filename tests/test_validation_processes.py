"""Validation gives the same numbers on 1, 2 and 3 processes (gloo, CPU): every window is scored
once (Lightning's DistributedSampler would repeat windows to even the shares), the shares may be
uneven (a rank can even hold no window of a domain) and the metric sums still meet. Checked on
per-document token counts (exactly), per-document loss sums, losses, perplexities, bpb and the
mixture's routing means (1e-6), through `trainer.validate`, inside `fit` (the pre-training
validation) and through `bam validate` under torchrun."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bam_lightning.data import BAMDataModule
from bam_lightning.data.stream import rank_batches

SEQ_LEN, BATCH = 8, 2
CONFIG = dict(vocab_size=257, n_layer=1, d_model=16, n_head=2, d_ff=32, max_seq_len=SEQ_LEN,
              n_experts=2, attn_experts=2)

# Run by this test as a script; Lightning's launcher starts ranks 1.. by running it again.
SCRIPT = '''
import json
import sys

import lightning as L
import torch

from bam_lightning.config import ModelConfig
from bam_lightning.data import BAMDataModule
from bam_lightning.lit import MoELM

devices, settings, out, mode = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if mode == "fsdp2":  # sharded weights: every forward is a collective, so every rank must run as many
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
else:
    strategy = "ddp" if devices > 1 else "auto"


def trainer(**overrides):
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **overrides)


torch.manual_seed(0)
model = MoELM(ModelConfig(**settings.pop("config")), warmup_steps=0)
validating = trainer()
metrics = validating.validate(model, datamodule=BAMDataModule(**settings), verbose=False)[0]
result = {"metrics": metrics, "documents": model.val_document_stats}
if mode == "fsdp2":
    if validating.global_rank == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)
    sys.exit(0)
# the same weights, validated inside fit (before step 0, through the DDP wrapper)
torch.manual_seed(0)
model = MoELM(ModelConfig(**model.config.to_dict()), warmup_steps=0)
fitting = trainer(max_steps=1, num_sanity_val_steps=-1, limit_val_batches=1.0)
fitting.fit(model, datamodule=BAMDataModule(**settings))
result["in_fit"] = model.initial_val_metrics
if fitting.global_rank == 0:
    with open(out, "w") as handle:
        json.dump(result, handle)
'''


def write_domains(root: Path) -> dict[str, str]:
    """Two domains of distinct random documents; their validation splits hold 3 and 2 windows."""
    rng = random.Random(7)
    domains = {}
    for name, alphabet, length in (("prose", "etaoin shr", 40), ("digits", "0123456789", 10)):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(6):
            (folder / f"{i}.txt").write_text("".join(rng.choice(alphabet) for _ in range(length + i)))
        domains[name] = str(folder / "*.txt")
    return domains


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    settings = dict(domains=write_domains(root), tokenizer="byte", seq_len=SEQ_LEN, batch_size=BATCH,
                    val_fraction=0.34, val_tokens_per_domain=3 * (SEQ_LEN + 1), data_dir=str(root / "data"))
    data = BAMDataModule(**settings)
    data.prepare_data()
    data.setup("validate")
    windows = [len(loader.dataset) for loader in data.val_dataloader()]
    assert windows == [3, 2]  # fewer windows than 3 processes in one domain: a rank holds none
    (root / "validate.py").write_text(SCRIPT)
    return root, settings


def run_script(root: Path, settings: dict, devices: int, mode: str = "ddp") -> dict:
    out = root / f"result{devices}{mode}.json"
    run = subprocess.run([sys.executable, str(root / "validate.py"), str(devices),
                          json.dumps({**settings, "config": CONFIG}), str(out), mode],
                         cwd=root, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_rank_batches_share_every_window_once_in_as_many_batches_per_rank():
    for n_windows in range(1, 12):
        for batch_size in (1, 2, 3, 5):
            for world in (1, 2, 3, 4):
                shares = [rank_batches(n_windows, batch_size, rank, world) for rank in range(world)]
                assert len({len(batches) for batches in shares}) == 1  # the same number of forwards
                scored = [int(w) for batches in shares for batch in batches for w in batch]
                assert scored == list(range(n_windows))  # once each, in order
                assert all(len(batch) <= batch_size for batches in shares for batch in batches)
    assert [b.tolist() for b in rank_batches(3, 2, 0, 1)] == [[0, 1], [2]]  # one process: plain batches
    assert [b.tolist() for b in rank_batches(2, 2, 0, 3)] == [[]]  # no window: one padding batch


def test_one_two_and_three_processes_validate_the_same_windows_once(toy):
    root, settings = toy
    results = {devices: run_script(root, settings, devices) for devices in (1, 3)}  # 2: under torchrun below
    reference = results[1]
    fsdp2 = run_script(root, settings, 2, "fsdp2")  # uneven shards (prose 2 + 1 windows), sharded weights
    for domain, windows in (("prose", 3), ("digits", 2)):
        assert sum(reference["documents"][domain]["tokens"]) == windows * SEQ_LEN
    assert any(key.startswith("val/prose/attn_gate/") for key in reference["metrics"])
    assert any(key.startswith("val/digits/ffn_load/") for key in reference["metrics"])
    for devices, got in ((3, results[3]), ("2 fsdp2", fsdp2)):  # 3: a rank with no digits window
        for domain, expected in reference["documents"].items():
            ours = got["documents"][domain]
            assert ours["document"] == expected["document"], (devices, domain)
            assert ours["tokens"] == expected["tokens"], (devices, domain)  # no window twice
            assert ours["bytes"] == expected["bytes"], (devices, domain)
            assert ours["loss_sum"] == pytest.approx(expected["loss_sum"], rel=1e-6), (devices, domain)
        assert_same_metrics(got["metrics"], reference["metrics"])
    for devices in (1, 3):  # inside fit, before step 0: the same weights, the same numbers
        losses = {k: v for k, v in reference["metrics"].items() if k.split("/")[-1] in ("loss", "ppl", "bpb")}
        assert_same_metrics(results[devices]["in_fit"], losses)


def test_bam_validate_under_torchrun_gives_the_same_numbers_on_1_2_and_3_processes(toy, tmp_path, monkeypatch):
    root, settings = toy
    import lightning as L
    import torch

    from bam_lightning.config import ModelConfig
    from bam_lightning.lightning_cli import run_lightning_cli
    from bam_lightning.lit import MoELM

    torch.manual_seed(1)
    model = MoELM(ModelConfig(**CONFIG), warmup_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, datamodule=BAMDataModule(**settings))
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)

    monkeypatch.chdir(tmp_path)
    records = {}
    for devices in (1, 2, 3):
        metrics_file = tmp_path / f"metrics{devices}.jsonl"
        recipe = {
            "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                        "logger": False, "enable_progress_bar": False,
                        "callbacks": [{"class_path": "bam_lightning.callbacks.MetricsFile",
                                       "init_args": {"path": str(metrics_file)}}]},
            "model": {"class_path": "bam_lightning.lit.MoELM", "init_args": {"config": CONFIG}},
            "data": settings,
        }
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        arguments = ["validate", "--config", str(tmp_path / "recipe.yaml"), "--ckpt_path", str(checkpoint)]
        if devices == 1:  # the reference, in this process (the command's code without a second start-up)
            run_lightning_cli(arguments)
        else:
            run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={devices}", "-m", "bam_lightning.cli", *arguments],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=240)
            assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        (record,) = [json.loads(line) for line in metrics_file.read_text().splitlines()]  # rank 0 only
        records[devices] = {k: v for k, v in record.items() if k.startswith("val/")}
    assert {"val/prose/loss", "val/digits/bpb", "val/avg/ppl"} <= records[1].keys()
    assert any("/ffn_load/" in key for key in records[1])
    for devices in (2, 3):
        assert_same_metrics(records[devices], records[1])
