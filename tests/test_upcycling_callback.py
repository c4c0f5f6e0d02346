"""UpcyclingCallback: upcycles once at the start of a fresh fit, never on resume, sharded or not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bam_lightning.callbacks.upcycling as upcycling_module
import lightning as L
import pytest
import torch
from bam_lightning.callbacks import UpcyclingCallback
from helpers import (
    dense_sources,
    moe_config,
    random_dense_state_dict,
    save_lightning_checkpoint,
    tiny_config,
)
from torch.utils.data import DataLoader

from bam_lightning.lit import MoELM
from bam_lightning.upcycle import upcycle_from_checkpoints

N = 3
DENSE = tiny_config()
BAM = moe_config(DENSE, n_experts=N, attn_experts=N)


class WeightProbe(L.Callback):
    """Copies the model's weights when validation or training first sees them (it runs after the
    callbacks listed before it)."""

    def __init__(self):
        self.at_sanity_check: dict[str, torch.Tensor] | None = None
        self.at_train_start: dict[str, torch.Tensor] | None = None

    def on_sanity_check_start(self, trainer, pl_module):
        self.at_sanity_check = self.copy(pl_module)

    def on_train_start(self, trainer, pl_module):
        self.at_train_start = self.copy(pl_module)

    @staticmethod
    def copy(pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def token_blocks(n: int = 8, length: int = 8) -> DataLoader:
    return DataLoader(torch.randint(0, DENSE.vocab_size, (n, length + 1), generator=torch.Generator().manual_seed(0)),
                      batch_size=2)


def make_trainer(root, callbacks, max_steps: int, sanity_check: bool = False) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=int(sanity_check),
                     limit_val_batches=int(sanity_check), default_root_dir=root, callbacks=callbacks)


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key


def test_fresh_fit_upcycles_once_and_resume_restores_without_upcycling(tmp_path, monkeypatch):
    paths = [str(p) for p in dense_sources(tmp_path, DENSE, N)]
    calls = []

    def counting_upcycle(*args, **kwargs):
        calls.append(args)
        return upcycle_from_checkpoints(*args, **kwargs)

    monkeypatch.setattr(upcycling_module, "upcycle_from_checkpoints", counting_upcycle)
    probe = WeightProbe()
    upcycling = UpcyclingCallback(paths, method="bam", router_seed=4)
    trainer = make_trainer(tmp_path, [upcycling, probe], max_steps=2, sanity_check=True)
    module = MoELM(BAM, lr=1e-2, warmup_steps=0)
    trainer.fit(module, token_blocks(), token_blocks())
    expected, info = upcycle_from_checkpoints(paths, BAM, "bam", router_seed=4)
    assert_same_weights(probe.at_sanity_check, expected)  # the step-0 validation sees the mixture
    assert_same_weights(probe.at_train_start, expected)
    assert len(calls) == 1

    checkpoint_path = tmp_path / "moe.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    saved = torch.load(checkpoint_path, weights_only=True)
    assert saved["callbacks"]["UpcyclingCallback"]["upcycled_from"] == info
    assert [e["source"] for e in info["experts"]] == paths
    trained = {k.removeprefix("model."): v for k, v in saved["state_dict"].items()}
    assert not torch.equal(trained["blocks.0.ffn.w_up"], expected["blocks.0.ffn.w_up"])  # training moved it

    # A second fit() with the same callback continues training, it does not start over.
    make_trainer(tmp_path, [upcycling, probe], max_steps=1).fit(module, token_blocks())
    assert len(calls) == 1
    assert_same_weights(probe.at_train_start, trained)

    # Resume: the sources are gone and must not be needed; nothing is upcycled again.
    for path in paths:
        Path(path).unlink()
    callback, probe = UpcyclingCallback(paths, method="bam", router_seed=4), WeightProbe()
    resumed = make_trainer(tmp_path, [callback, probe], max_steps=3)
    resumed.fit(MoELM(BAM, lr=1e-2, warmup_steps=0), token_blocks(), ckpt_path=checkpoint_path)
    assert len(calls) == 1
    assert_same_weights(probe.at_train_start, trained)
    assert callback.provenance == info  # restored, so the next checkpoint still carries it
    resumed.save_checkpoint(tmp_path / "resumed.ckpt")
    assert torch.load(tmp_path / "resumed.ckpt", weights_only=True)["callbacks"]["UpcyclingCallback"][
        "upcycled_from"] == info


def test_bad_source_fails_before_the_first_step(tmp_path):
    paths = [str(p) for p in dense_sources(tmp_path, DENSE, N)]
    (tmp_path / "dense1.ckpt").write_bytes(b"garbage" * 20)
    probe = WeightProbe()
    with pytest.raises(ValueError, match=f"{paths[1]}: not a readable checkpoint"):
        make_trainer(tmp_path, [UpcyclingCallback(paths), probe], max_steps=1).fit(MoELM(BAM), token_blocks())
    assert probe.at_train_start is None


def test_source_tokenizer_must_match_the_module(tmp_path):
    paths = [str(p) for p in dense_sources(tmp_path, DENSE, N)]
    save_lightning_checkpoint(tmp_path / "dense2.ckpt", DENSE, random_dense_state_dict(DENSE, 2), tokenizer="bpe-abc")
    module = MoELM(BAM)
    module.tokenizer_fingerprint = "bpe-xyz"
    with pytest.raises(ValueError, match=f"{paths[2]}: trained with tokenizer 'bpe-abc', expected 'bpe-xyz'"):
        make_trainer(tmp_path, [UpcyclingCallback(paths)], max_steps=1).fit(module, token_blocks())


def test_callback_refuses_unknown_methods_and_a_module_that_also_initialises_itself(tmp_path):
    paths = [str(p) for p in dense_sources(tmp_path, DENSE, N)]
    with pytest.raises(ValueError, match="unknown upcycling method 'moe'"):
        UpcyclingCallback(paths, method="moe")
    with pytest.raises(ValueError, match="would both initialise the model"):
        make_trainer(tmp_path, [UpcyclingCallback(paths)], max_steps=1).fit(
            MoELM(BAM, init_from=paths[0]), token_blocks())


SHARDED_SCRIPT = """
import json, sys
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader

from bam_lightning.callbacks import UpcyclingCallback
from bam_lightning.config import ModelConfig
from bam_lightning.lit import MoELM


class GatherFullWeights(L.Callback):
    def __init__(self, prefix):
        self.prefix = prefix

    def on_train_start(self, trainer, pl_module):
        self.save(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self.save(trainer, pl_module, "end")

    def save(self, trainer, pl_module, when):
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(pl_module.model, options=options)  # collective: every rank calls it
        if trainer.global_rank == 0:
            torch.save(state, f"{self.prefix}_{when}.pt")


def fit(config, callbacks, max_steps, ckpt_path=None):
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)
    data = torch.randint(0, config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(0))
    trainer.fit(MoELM(config, lr=1e-2, warmup_steps=0), DataLoader(data, batch_size=2), ckpt_path=ckpt_path)
    return trainer


if __name__ == "__main__":
    args = json.load(open(sys.argv[1]))
    out, config = args["out"], ModelConfig.from_dict(args["config"])
    upcycling = UpcyclingCallback(args["sources"], method="bam", router_seed=4)
    trainer = fit(config, [upcycling, GatherFullWeights(f"{out}/first")], max_steps=1)
    trainer.save_checkpoint(f"{out}/moe.ckpt")  # a sharded (distributed) checkpoint
    # Resume: sources that do not exist prove nothing is upcycled; the checkpoint gives the weights.
    resumed = UpcyclingCallback(["/nonexistent.ckpt"] * len(args["sources"]), method="bam", router_seed=4)
    trainer = fit(config, [resumed, GatherFullWeights(f"{out}/resumed")], max_steps=2, ckpt_path=f"{out}/moe.ckpt")
    if trainer.global_rank == 0:
        torch.save({"first": upcycling.provenance, "resumed": resumed.provenance}, f"{out}/provenance.pt")
"""


def test_fsdp2_on_two_processes_upcycles_like_one_process_and_resumes_without_upcycling(tmp_path):
    """Lightning restores after `on_fit_start` under ModelParallelStrategy: the resume must still skip upcycling."""
    paths = [str(p) for p in dense_sources(tmp_path, DENSE, N)]
    args = {"config": BAM.to_dict(), "sources": paths, "out": str(tmp_path)}
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "sharded.py").write_text(SHARDED_SCRIPT)
    run = subprocess.run([sys.executable, str(tmp_path / "sharded.py"), str(tmp_path / "args.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    expected, info = upcycle_from_checkpoints(paths, BAM, "bam", router_seed=4)

    def load(name):
        return torch.load(tmp_path / f"{name}.pt", weights_only=True)

    assert_same_weights(load("first_start"), expected)
    trained = load("first_end")
    assert not torch.equal(trained["blocks.0.ffn.w_up"], expected["blocks.0.ffn.w_up"])
    assert_same_weights(load("resumed_start"), trained)
    assert load("provenance") == {"first": info, "resumed": info}


@pytest.mark.parametrize("renormalize", [True, False])
def test_function_preservation_is_measured_against_the_seed_at_the_first_validation(tmp_path, renormalize):
    """N copies of one dense model: soft attention gates sum to one and a renormalised top-1
    FFN gate is one, so the mixture is the seed's function exactly; the paper's gate is not."""
    state = random_dense_state_dict(DENSE, seed=3)
    paths = []
    for j in range(N):
        paths.append(str(tmp_path / f"copy{j}.ckpt"))
        save_lightning_checkpoint(Path(paths[-1]), DENSE, state)
    callback = UpcyclingCallback(paths, method="bam")
    config = moe_config(DENSE, n_experts=N, attn_experts=N, ffn_renormalize=renormalize)
    make_trainer(tmp_path, [callback], max_steps=1, sanity_check=True).fit(
        MoELM(config, lr=1e-3, warmup_steps=0), token_blocks(), token_blocks())
    # the seed's loss, computed here independently on the one sanity-check batch
    from bam_lightning.model import GPT

    seed = GPT(DENSE).eval()
    seed.load_state_dict(state)
    batch = next(iter(token_blocks()))
    with torch.no_grad():
        logits, _ = seed(batch[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    measured = callback.function_preservation
    assert measured["seed_val_loss"] == pytest.approx(expected, abs=1e-5)
    if renormalize:
        assert abs(measured["gap"]) < 1e-4
    else:
        assert abs(measured["gap"]) > 1e-3
    assert callback._seed_model is None  # measured once, then freed
