"""Which grouped kernel the FFN bank uses (by torch build, device and dtype), that the one chosen
is the one that runs, and mixtures in float64 (the per-expert path) against independent references:
a float64 expert loop written here, finite differences, and the float32 grouped_mm model."""

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import torch_threads
from torch.utils.data import DataLoader

import bam_lightning.model.ffn as ffn_module
from bam_lightning import GPT, ModelConfig
from bam_lightning.lit import MoELM
from bam_lightning.model.ffn import LOOP, MixtureOfFFN, ffn_kernel, last_ffn_kernel

TINY = dict(vocab_size=40, n_layer=2, d_model=16, n_head=2, d_ff=24, max_seq_len=12)
MOE = dict(n_experts=3, ffn_top_k=2, attn_experts=2)
GROUPED = "F.grouped_mm"
PRIVATE = "torch._grouped_mm"


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


# ----- selection, for each torch build (patched), device and dtype: no GPU needed -----

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


@pytest.mark.parametrize("device,dtype,expected", [
    ("cpu", FP32, GROUPED), ("cpu", BF16, GROUPED), ("cpu", FP16, GROUPED), ("cpu", FP64, LOOP),
    ("cuda", BF16, GROUPED), ("cuda", FP32, LOOP), ("cuda", FP16, LOOP), ("cuda", FP64, LOOP),
    ("mps", BF16, LOOP),
])
def test_public_grouped_mm_where_it_takes_the_dtype(device, dtype, expected, monkeypatch):
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: None, raising=False)
    assert ffn_kernel(device, dtype) == expected
    assert ffn_kernel(torch.device(device), dtype) == expected


@pytest.mark.parametrize("device,dtype,expected", [
    ("cuda", BF16, PRIVATE), ("cuda", FP32, LOOP), ("cuda", FP64, LOOP), ("cpu", BF16, LOOP), ("cpu", FP32, LOOP),
])
def test_private_grouped_mm_only_for_bf16_on_cuda_when_the_public_name_is_missing(device, dtype, expected,
                                                                                  monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: None, raising=False)
    assert ffn_kernel(device, dtype) == expected


@pytest.mark.parametrize("device,dtype", [("cuda", BF16), ("cpu", FP32), ("cpu", BF16)])
def test_no_grouped_kernel_at_all_takes_the_loop(device, dtype, monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert ffn_kernel(device, dtype) == LOOP


# ----- the chosen kernel is the one that runs -----

def loop_reference(ffn: MixtureOfFFN, x: torch.Tensor) -> torch.Tensor:
    """Expert by expert over the router's choice: each token's SwiGLU for its experts, gated."""
    idx, weights, _ = ffn.route(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(idx.shape[1]):
            e = idx[t, slot]
            y = (F.silu(ffn.w_gate[e] @ x[t]) * (ffn.w_up[e] @ x[t])) @ ffn.w_down[e].T
            out[t] += weights[t, slot] * y
    return ffn.config.ffn_gate_scale * out


def mixture(dtype: torch.dtype = FP32) -> tuple[MixtureOfFFN, torch.Tensor]:
    torch.manual_seed(0)
    ffn = MixtureOfFFN(ModelConfig(**TINY, n_experts=3, ffn_top_k=2))
    ffn.reset_parameters()
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(std=0.3)  # outputs of order one, so tolerances mean something
    return ffn.to(dtype), torch.randn(2, 7, TINY["d_model"], dtype=dtype)


@pytest.mark.parametrize("kernel", [GROUPED, PRIVATE, LOOP])
def test_each_kernel_runs_when_chosen_and_matches_the_loop(kernel, monkeypatch):
    """The private name is only chosen on CUDA; forcing it here checks the dispatch on CPU."""
    if ffn_kernel("cpu", FP32) == LOOP and kernel != LOOP:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm on CPU")
    calls = []
    if kernel != LOOP:
        real = torch._grouped_mm

        def counting(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)
        monkeypatch.setattr(torch, "_grouped_mm", counting)
        if kernel == PRIVATE:
            monkeypatch.delattr(F, "grouped_mm")  # the public one must not be what ran
        else:
            monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: counting(*a, **k))
    monkeypatch.setattr(ffn_module, "ffn_kernel", lambda device, dtype: kernel)
    ffn, x = mixture()
    out, _ = ffn(x)
    assert last_ffn_kernel() == kernel
    assert len(calls) == (0 if kernel == LOOP else 3)  # gate, up, down
    torch.testing.assert_close(out, loop_reference(ffn, x.flatten(0, 1)).view_as(x), rtol=1e-5, atol=1e-5)


# ----- float64 -----

def test_float64_mixture_matches_a_float64_loop_forward_and_backward():
    ffn, x = mixture(FP64)
    grad = torch.randn_like(x)

    def run(forward):
        inputs = x.clone().requires_grad_()
        ffn.zero_grad(set_to_none=True)
        forward(inputs).backward(grad)
        return {"x": inputs.grad} | {name: p.grad for name, p in ffn.named_parameters()}

    out = ffn(x)[0]
    assert out.dtype == FP64 and last_ffn_kernel() == LOOP
    expected = loop_reference(ffn, x.flatten(0, 1)).view_as(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = run(lambda t: ffn(t)[0])
    expected_grads = run(lambda t: loop_reference(ffn, t.flatten(0, 1)).view_as(t))
    for name, value in expected_grads.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


def test_float64_mixture_passes_gradcheck():
    """What people run `model.double()` for: analytic gradients against finite differences."""
    torch.manual_seed(3)
    ffn = MixtureOfFFN(ModelConfig(**{**TINY, "d_model": 8, "d_ff": 8}, n_experts=3, ffn_top_k=2)).double()
    ffn.reset_parameters()
    with torch.no_grad():
        for p in ffn.parameters():
            p.normal_(std=0.5)  # clear routing margins: finite differences must not flip a choice
    x = torch.randn(1, 4, 8, dtype=FP64, requires_grad=True)
    params = [ffn.w_gate, ffn.w_up, ffn.w_down, ffn.router.weight]
    assert torch.autograd.gradcheck(lambda t, *_: ffn(t)[0], (x, *params), eps=1e-6, atol=1e-6)


def test_float64_gpt_mixture_agrees_with_the_float32_grouped_model():
    """Whole model: float64 runs the loop, float32 the grouped kernel; same weights, same logits
    to float32 precision, and a backward through every parameter."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(**TINY, **MOE))
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["max_seq_len"]))
    logits32, _ = model(idx)
    kernel32 = last_ffn_kernel()
    model = model.double()
    logits64, stats = model(idx)
    assert logits64.dtype == FP64 and last_ffn_kernel() == LOOP
    if ffn_kernel("cpu", FP32) != LOOP:
        assert kernel32 == GROUPED
    torch.testing.assert_close(logits64.float(), logits32, rtol=1e-4, atol=1e-4)
    (logits64.square().mean() + sum(s.lb_loss for s in stats if s.lb_loss is not None)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == FP64 and torch.isfinite(p.grad).all(), name


# ----- the training log -----

@pytest.mark.parametrize("precision,expected", [
    ("64-true", f"{LOOP} (torch.float64 on cpu)"),
    ("bf16-mixed", None),  # whatever ffn_kernel says for bf16 on this CPU
])
def test_fit_logs_the_ffn_kernel(precision, expected, caplog):
    expected = expected or f"{ffn_kernel('cpu', BF16)} (torch.bfloat16 on cpu)"
    torch.manual_seed(2)
    module = MoELM(ModelConfig(**TINY, **MOE), warmup_steps=1)
    blocks = torch.randint(0, TINY["vocab_size"], (4, TINY["max_seq_len"] + 1))
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, DataLoader(blocks, batch_size=2))
    assert f"FFN expert matmuls: {expected}" in caplog.text
    # one thread keeps SDPA; tests/test_short_attention.py fits at two threads with the chunked kernel
    assert "Attention in training: sdpa" in caplog.text
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
