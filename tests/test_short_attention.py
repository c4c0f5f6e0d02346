"""The chunked CPU attention for short sequences (bam_lightning/model/short_attention.py): its
output and gradients against SDPA in float64, grouped-query layouts and chunk edges included, when
it runs and when SDPA does, and whole models trained one step with either kernel."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import torch_threads

from bam_lightning import ModelConfig
from bam_lightning.model import GPT
from bam_lightning.model import short_attention as sa

FP64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def two_threads():
    """The chunked kernel runs from two threads up (at one, SDPA is as fast and keeps no scores)."""
    with torch_threads(2):
        yield


def attention_and_grads(attend, q, k, v, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])  # Expert-KV, GQA, one shared K/V
@pytest.mark.parametrize("chunk_bytes", [sa.CHUNK_BYTES, 3 * 20 * 20 * 8])  # one chunk; chunks of 3 (+ rest)
def test_matches_sdpa_in_float64(heads, kv_heads, chunk_bytes, monkeypatch):
    monkeypatch.setattr(sa, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    B, T, hd = 5, 20, 8
    q = torch.randn(B, heads, T, hd, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, T, hd, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(B, heads, T, hd, dtype=torch.float64)
    out, grads = attention_and_grads(sa.causal_attention, q, k, v, grad)
    assert sa.last_attention_kernel() == sa.CHUNKED
    ref_out, ref_grads = attention_and_grads(sdpa, q, k, v, grad)
    torch.testing.assert_close(out, ref_out, **FP64)
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **FP64, msg=lambda m, name=name: f"d{name}: {m}")


def test_query_layout_of_the_attention_bank():
    """q as the bank makes it (a transposed view of the projection, not contiguous) gives what the
    same values in a contiguous tensor give."""
    torch.manual_seed(1)
    B, T, H, hd = 2, 16, 4, 8
    q = torch.randn(B, T, H, hd, dtype=torch.float64).transpose(1, 2)
    k, v = (torch.randn(B, T, H, hd, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    torch.testing.assert_close(sa.causal_attention(q, k, v), sdpa(q.contiguous(), k.contiguous(), v.contiguous()),
                               **FP64)


def kernel_for(q, k):
    sa.causal_attention(q, k, k)
    return sa.last_attention_kernel()


def test_which_kernel_runs():
    q = torch.randn(1, 2, sa.MAX_SEQ_LEN, 8)
    assert kernel_for(q, q) == sa.CHUNKED  # training shapes on CPU in fp32
    assert kernel_for(q.double(), q.double()) == sa.CHUNKED
    with torch.no_grad():  # validation, generation: SDPA keeps no scores
        assert kernel_for(q, q) == sa.SDPA
    long = torch.randn(1, 2, sa.MAX_SEQ_LEN + 1, 8)
    assert kernel_for(long, long) == sa.SDPA  # the saved scores grow with T * T
    assert kernel_for(q.bfloat16(), q.bfloat16()) == sa.SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_for(q, q) == sa.SDPA
    with sa.sdpa_only():
        assert kernel_for(q, q) == sa.SDPA
    with torch_threads(1):
        assert kernel_for(q, q) == sa.SDPA
        assert sa.training_attention_kernel("cpu", torch.float32) == sa.SDPA
    assert kernel_for(q, q) == sa.CHUNKED  # sdpa_only restores the choice when it ends
    # what a fit logs says the same
    assert sa.training_attention_kernel("cpu", torch.float32).startswith(sa.CHUNKED)
    assert sa.training_attention_kernel("cpu", torch.bfloat16) == sa.SDPA
    assert sa.training_attention_kernel("cuda", torch.float32) == sa.SDPA


TINY_BAM = ModelConfig(vocab_size=61, n_layer=2, d_model=32, n_head=4, max_seq_len=32,
                       n_experts=4, ffn_top_k=1, attn_experts=4)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["expert_kv", "shared_kv"])
def test_one_training_step_matches_sdpa(shared_kv):
    """A BAM mixture's loss and every gradient of one step, in fp32, with the chunked kernel and
    with SDPA: equal to float rounding (one step, so the tolerance holds on every CPU kind)."""
    config = dataclasses.replace(TINY_BAM, attn_shared_kv=shared_kv)
    torch.manual_seed(0)
    model = GPT(config)
    tokens = torch.randint(0, config.vocab_size, (3, config.max_seq_len + 1))

    def step():
        model.zero_grad(set_to_none=True)
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, grads = step()
    assert sa.last_attention_kernel() == sa.CHUNKED
    with sa.sdpa_only():
        ref_loss, ref_grads = step()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_fit_at_two_threads_trains_with_the_chunked_kernel_and_says_so(caplog):
    import logging

    import lightning as L
    from torch.utils.data import DataLoader

    from bam_lightning.lit import MoELM

    torch.manual_seed(0)
    blocks = torch.randint(0, TINY_BAM.vocab_size, (4, TINY_BAM.max_seq_len + 1))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(MoELM(TINY_BAM, warmup_steps=1), DataLoader(blocks, batch_size=2))
    assert torch.get_num_threads() == 2  # Lightning left the thread count alone
    assert sa.last_attention_kernel() == sa.CHUNKED
    assert ("Attention in training: chunked bmm for sequences up to 128 tokens, sdpa beyond and in validation "
            "(torch.float32 on cpu)") in caplog.text
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_bam_fit_at_two_threads_runs_the_chunked_kernel_and_one_thread_sdpa(tmp_path):
    """What users run: `bam fit` in a subprocess (with a timeout), at the thread counts
    OMP_NUM_THREADS gives it. Both train; their first step's loss (same weights, same batch) agrees
    to float rounding. Then two DDP ranks at two threads each."""
    import json

    from test_launch import BAM, MAX_STEPS, run, write_recipe

    recipe = write_recipe(tmp_path)
    first_losses = {}
    for threads, kernel in (("2", "chunked bmm for sequences up to 128 tokens"), ("1", "sdpa")):
        run_dir = tmp_path / f"threads_{threads}"
        output = run([BAM, "fit", "--config", str(recipe)], run_dir, recipe, OMP_NUM_THREADS=threads)
        assert f"Attention in training: {kernel}" in output, output[-4000:]
        steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == list(range(1, MAX_STEPS + 1))
        first_losses[threads] = steps[0]["loss"]
    assert first_losses["2"] == pytest.approx(first_losses["1"], rel=1e-5)
    # two DDP ranks of two threads each (Lightning's launcher): both ranks train with the kernel
    run_dir = tmp_path / "ddp_threads_2"
    output = run([BAM, "fit", "--config", str(recipe), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                 run_dir, recipe, OMP_NUM_THREADS="2")
    assert "Starting with 2 processes" in output and "Attention in training: chunked bmm" in output, output[-4000:]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert sorted((s["rank"], s["step"]) for s in steps) == [(r, i) for r in (0, 1) for i in range(1, MAX_STEPS + 1)]
