"""The LightningModules on plain dataloaders: training, metrics, schedule, checkpoint contract."""

import math

import lightning as L
import pytest
import torch
from bam_lightning.callbacks.monitoring import NonFiniteLossGuard
from torch.utils.data import DataLoader

from bam_lightning import ModelConfig
from bam_lightning.lit import DenseLM, MoELM

CONFIG = ModelConfig(vocab_size=40, n_layer=2, d_model=32, n_head=2, max_seq_len=16)


def patterned_blocks(n: int, seed: int) -> torch.Tensor:
    """Token blocks [n, 17] counting up by a stride of 1 or 2 from a random start: learnable
    from two tokens of context in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 40, (n, 1), generator=g)
    stride = torch.randint(1, 3, (n, 1), generator=g)
    return (start + stride * torch.arange(17)) % 40


def trainer(**overrides) -> L.Trainer:
    kwargs = dict(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=-1)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def loaders():
    train = DataLoader(patterned_blocks(256, 0), batch_size=16, shuffle=True)
    val = [DataLoader(patterned_blocks(32, 1), batch_size=16), DataLoader(patterned_blocks(32, 2), batch_size=16)]
    return train, val


def test_dense_fit_lowers_every_validation_loss_and_names_metrics_per_domain():
    torch.manual_seed(0)
    module = DenseLM(CONFIG, lr=3e-3, warmup_steps=5)
    train, val = loaders()
    t = trainer()
    t.fit(module, train, val)
    start, end = module.initial_val_metrics, {k: v.item() for k, v in t.callback_metrics.items()}
    for domain in ("domain0", "domain1"):
        assert end[f"val/{domain}/loss"] < start[f"val/{domain}/loss"] - 0.3
        assert math.isclose(end[f"val/{domain}/ppl"], math.exp(end[f"val/{domain}/loss"]), rel_tol=1e-5)
    assert math.isclose(end["val/avg/ppl"], (end["val/domain0/ppl"] + end["val/domain1/ppl"]) / 2, rel_tol=1e-5)


def test_validation_loss_is_token_weighted_mean_of_cross_entropy():
    torch.manual_seed(1)
    module = DenseLM(CONFIG)
    blocks = patterned_blocks(20, 3)
    t = trainer()
    metrics = t.validate(module, DataLoader(blocks, batch_size=8), verbose=False)[0]  # uneven last batch
    with torch.no_grad():
        logits, _ = module.model(blocks[:, :-1])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert math.isclose(metrics["val/domain0/loss"], expected.item(), rel_tol=1e-5)


def test_schedule_warms_up_then_decays_to_the_floor():
    module = DenseLM(CONFIG, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    t = trainer(max_steps=100)
    module.trainer = t
    opt = module.configure_optimizers()
    schedule = opt["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert schedule(0) < 0.1 and math.isclose(schedule(10), 1.0)
    assert schedule(55) < 1.0 and math.isclose(schedule(100), 0.1) and math.isclose(schedule(500), 0.1)
    groups = opt["optimizer"].param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    assert id(module.model.tok_emb.weight) not in decayed
    assert id(module.model.blocks[0].norm.weight) not in decayed
    assert id(module.model.blocks[0].attn.wq) in decayed


def test_modules_refuse_the_wrong_kind_of_config():
    with pytest.raises(ValueError, match="DenseLM got a mixture config"):
        DenseLM(ModelConfig(**{**CONFIG.to_dict(), "n_experts": 2}))
    with pytest.raises(ValueError, match="MoELM needs a mixture config"):
        MoELM(CONFIG)


def test_validate_with_a_checkpoint_of_another_shape_names_the_field(tmp_path):
    module = DenseLM(CONFIG)
    t = trainer(max_steps=1, num_sanity_val_steps=0)
    train, val = loaders()
    t.fit(module, train, val)
    path = tmp_path / "dense.ckpt"
    t.save_checkpoint(path)
    other = MoELM(ModelConfig(**{**CONFIG.to_dict(), "n_experts": 2, "attn_experts": 2}))
    with pytest.raises(ValueError, match=r"dense model, expected a mixture.*n_experts: checkpoint 0 vs expected 2"):
        trainer().validate(other, val, ckpt_path=path, verbose=False)


def test_init_from_starts_where_the_source_ended_and_not_on_resume(tmp_path):
    torch.manual_seed(2)
    train, val = loaders()
    seed_module = DenseLM(CONFIG, lr=3e-3, warmup_steps=5)
    t = trainer(max_steps=16)  # one epoch: the last validation sees the final weights
    t.fit(seed_module, train, val)
    seed_end = {k: v.item() for k, v in t.callback_metrics.items() if k.startswith("val/")}
    t.save_checkpoint(tmp_path / "seed.ckpt")

    branch = DenseLM(CONFIG, lr=1e-3, init_from=str(tmp_path / "seed.ckpt"))
    t = trainer(max_steps=5)
    t.fit(branch, train, val)
    for key, value in seed_end.items():
        assert math.isclose(branch.initial_val_metrics[key], value, rel_tol=1e-6), key
    t.save_checkpoint(tmp_path / "branch.ckpt")
    saved = torch.load(tmp_path / "branch.ckpt", weights_only=True)["state_dict"]

    resumed = DenseLM(CONFIG, lr=1e-3, init_from=str(tmp_path / "seed.ckpt"))
    t = trainer(max_steps=5, num_sanity_val_steps=0)  # already at max_steps: restores, trains nothing
    t.fit(resumed, train, val, ckpt_path=tmp_path / "branch.ckpt")
    for key, value in resumed.state_dict().items():
        if key.startswith("model."):
            assert torch.equal(value, saved[key]), key


def test_non_finite_loss_stops_the_run_naming_the_step():
    module = DenseLM(CONFIG, lr=1e30, warmup_steps=0)  # diverges within a few steps
    train, _ = loaders()
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient).*at global step \d+; no checkpoint"):
        trainer(max_steps=200, callbacks=[NonFiniteLossGuard()], num_sanity_val_steps=0,
                limit_val_batches=0).fit(module, train)


@pytest.mark.parametrize(("precision", "steps"), [("32-true", 8), ("bf16-mixed", 1)])
def test_fused_adamw_is_the_default_and_matches_the_foreach_step_with_clipping(precision, steps):
    """fused_adamw=None takes the fused kernel on CPU, also with gradient clipping under bf16 (no
    scaler: Lightning must not refuse clipping), and gives the weights of the foreach step (the
    independent reference) up to float rounding. fp32 follows 8 steps; bf16-mixed compares one
    step on identical gradients, since bf16 kernels differ between CPU kinds (AVX-512 bf16, AMX)
    and amplify the two optimizers' 1e-9 rounding difference over a trajectory."""
    weights = {}
    for fused in (None, False):
        torch.manual_seed(0)
        module = DenseLM(CONFIG, lr=1e-2, warmup_steps=2, fused_adamw=fused)
        initial = {k: v.clone() for k, v in module.model.state_dict().items()}
        train, _ = loaders()
        fit = trainer(max_steps=steps, precision=precision, gradient_clip_val=0.5, limit_val_batches=0)
        fit.fit(module, train_dataloaders=train)
        assert fit.optimizers[0].defaults["fused"] is (fused is None)
        weights[fused] = module.model.state_dict()
        assert not torch.equal(weights[fused]["blocks.0.attn.wq"], initial["blocks.0.attn.wq"])  # a step was taken
    for name, tensor in weights[None].items():
        torch.testing.assert_close(tensor, weights[False][name], rtol=0, atol=1e-5, msg=name)


def test_fused_adamw_is_not_taken_where_an_fp16_scaler_must_unscale_before_clipping():
    module = DenseLM(CONFIG)
    module._trainer = type("T", (), {"precision_plugin": type("P", (), {"scaler": object()})()})()
    assert not module._fused_adamw_supported(list(module.model.parameters()))
    module._trainer = None
    assert module._fused_adamw_supported(list(module.model.parameters()))
