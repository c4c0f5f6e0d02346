"""The fast mixture paths (grouped_mm FFN, its fallback and row padding, the attention bank run as
one wide attention) against plain per-expert loops: forward and gradients, idle experts included,
and the bf16 paths against the fp32 loops with a loose tolerance."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_rope, torch_threads

import bam_lightning.model.ffn as ffn_module
from bam_lightning import ModelConfig
from bam_lightning.model.attention import MixtureOfAttention
from bam_lightning.model.ffn import MixtureOfFFN
from bam_lightning.model.layers import apply_rope, rope_tables

TINY = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, max_seq_len=24)
FP32 = dict(rtol=1e-5, atol=1e-5)  # sums over heads and experts run in another order
BF16_REL = 2e-2  # relative error, normwise: bf16 keeps 8 bits of mantissa


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CPU their barrier waits turned
    these 4 s of tests into 30 s."""
    with torch_threads(1):
        yield


def large_weights(module: torch.nn.Module) -> None:
    """Outputs and gradients of order one, so that absolute tolerances mean something."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith("router"):
                p.normal_(std=0.3)


def loop_ffn(ffn: MixtureOfFFN, x: torch.Tensor) -> torch.Tensor:
    """Expert by expert: the tokens that picked e, their SwiGLU, scaled by their gate, added back."""
    idx, weights, _ = ffn.route(x)
    out = torch.zeros_like(x)
    for e in range(ffn.w_gate.shape[0]):
        token, slot = (idx == e).nonzero(as_tuple=True)
        xe = x[token]
        y = (F.silu(xe @ ffn.w_gate[e].T) * (xe @ ffn.w_up[e].T)) @ ffn.w_down[e].T
        out = out.index_add(0, token, weights[token, slot, None] * y)
    return ffn.config.ffn_gate_scale * out


def run_with_grads(module: torch.nn.Module, x: torch.Tensor, forward, grad: torch.Tensor | None = None):
    """Output and the gradients of x and every parameter for out.backward(grad) (out.sum() if None)."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out = forward(x)
    out.backward(grad) if grad is not None else out.sum().backward()
    grads = {"x": x.grad} | {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), grads


def assert_all_close(actual: dict, expected: dict) -> None:
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **FP32, msg=lambda m, name=name: f"{name}: {m}")


def assert_near(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> None:
    error = (actual.float() - expected).norm() / expected.norm()
    assert error < BF16_REL, f"{name}: relative error {error:.2e}"


def ffn_with_idle_experts(top_k: int, renormalize: bool = False) -> tuple[MixtureOfFFN, torch.Tensor]:
    """Five experts of which 3 and 4 never win (and 0-2 get uneven loads), with positive inputs."""
    torch.manual_seed(1)
    ffn = MixtureOfFFN(ModelConfig(**TINY, n_experts=5, ffn_top_k=top_k, ffn_renormalize=renormalize,
                                   ffn_gate_scale=0.7))
    ffn.reset_parameters()
    large_weights(ffn)
    with torch.no_grad():
        ffn.router.weight.normal_(std=0.3)
        ffn.router.weight[3:] = -1.0
    return ffn, torch.randn(2, 13, TINY["d_model"]).abs()


PATHS = ["grouped_mm", "fallback_loop", "padded_rows"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (3, True)])
def test_ffn_fast_path_matches_expert_loop(path, top_k, renormalize, monkeypatch):
    if path == "grouped_mm" and ffn_module.ffn_kernel("cpu", torch.float32) == ffn_module.LOOP:
        pytest.skip("torch has no grouped_mm")
    if path == "fallback_loop":
        monkeypatch.setattr(ffn_module, "ffn_kernel", lambda device, dtype: ffn_module.LOOP)
    if path == "padded_rows":  # the bf16 row padding, checked exactly in fp32
        monkeypatch.setattr(ffn_module, "row_alignment", lambda device, dtype: 8)
    ffn, x = ffn_with_idle_experts(top_k, renormalize)
    grad = torch.randn_like(x)
    out, grads = run_with_grads(ffn, x, lambda t: ffn(t)[0], grad)
    assert ffn(x)[1].expert_fraction[3:].sum() == 0
    expected, expected_grads = run_with_grads(ffn, x, lambda t: loop_ffn(ffn, t.flatten(0, 1)).view_as(t), grad)
    torch.testing.assert_close(out, expected, **FP32)
    assert_all_close(grads, expected_grads)
    for w in ("w_gate", "w_up", "w_down"):
        assert grads[w][3:].abs().max() == 0  # idle experts: exactly zero, not garbage


@pytest.mark.parametrize("n_experts", [0, 3])
def test_ffn_takes_a_broadcast_gradient(n_experts):
    """grouped_mm's backward rejects expanded gradients such as that of out.sum()."""
    torch.manual_seed(2)
    ffn = MixtureOfFFN(ModelConfig(**TINY, n_experts=n_experts))
    ffn.reset_parameters()
    large_weights(ffn)
    x = torch.randn(2, 5, TINY["d_model"])
    _, grads = run_with_grads(ffn, x, lambda t: ffn(t)[0])
    if n_experts:
        _, expected = run_with_grads(ffn, x, lambda t: loop_ffn(ffn, t.flatten(0, 1)).view_as(t))
    else:
        dense = lambda t: (F.silu(t @ ffn.w_gate[0].T) * (t @ ffn.w_up[0].T)) @ ffn.w_down[0].T  # noqa: E731
        _, expected = run_with_grads(ffn, x, dense)
    assert_all_close(grads, expected)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
@pytest.mark.parametrize("align", [1, 64])
def test_ffn_bf16_path_matches_fp32_loop(mode, align, monkeypatch):
    """bf16 with and without the rows of every expert padded to 64 (AMX CPUs pad; an expert with
    no tokens included)."""
    monkeypatch.setattr(ffn_module, "row_alignment", lambda device, dtype: align)
    ffn, x = ffn_with_idle_experts(top_k=2)
    grad = torch.randn_like(x)
    expected, expected_grads = run_with_grads(ffn, x, lambda t: loop_ffn(ffn, t.flatten(0, 1)).view_as(t), grad)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = run_with_grads(ffn, x, lambda t: ffn(t)[0], grad)
    else:
        ffn = ffn.to(torch.bfloat16)
        out, grads = run_with_grads(ffn, x.bfloat16(), lambda t: ffn(t)[0], grad.bfloat16())
        assert out.dtype == torch.bfloat16
    assert_near(out, expected)
    for name in expected_grads:
        assert_near(grads[name], expected_grads[name], name)


HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def count_host_reads(monkeypatch, run) -> int:
    """Python-level reads of tensor values during `run()`: each one is a host sync on CUDA."""
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)
        counting.__wrapped__ = real
        monkeypatch.setattr(torch.Tensor, name, counting)
    run()
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, getattr(torch.Tensor, name).__wrapped__)
    return len(reads)


@pytest.mark.parametrize("case,expected", [
    ("grouped_fp32", 0),  # the CUDA path's code: routing, dispatch, kernel, combine, all backward
    ("dense", 0),
    ("padded_bf16", 1),  # the buffer's size; only CPUs pad, and there the host is the device
    ("loop_fp64", 1),  # the block sizes a Python loop over experts needs
])
def test_ffn_forward_backward_reads_no_tensor_values_on_the_host(case, expected, monkeypatch):
    if case == "grouped_fp32" and ffn_module.ffn_kernel("cpu", torch.float32) == ffn_module.LOOP:
        pytest.skip("torch has no grouped_mm")
    ffn, x = ffn_with_idle_experts(top_k=2)
    if case == "dense":
        ffn = MixtureOfFFN(ModelConfig(**TINY))
        ffn.reset_parameters()
    if case == "loop_fp64":
        ffn, x = ffn.double(), x.double()
    x.requires_grad_()
    if case == "padded_bf16":  # as on AMX CPUs, whatever this one is
        monkeypatch.setattr(ffn_module, "row_alignment", lambda device, dtype: 64)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "padded_bf16")

    def run():
        with autocast:
            out, stats = ffn(x)
        (out.float().square().sum() + (stats.lb_loss if stats.lb_loss is not None else 0)).backward()
    assert count_host_reads(monkeypatch, run) == expected
    assert ffn_module.last_ffn_kernel() == (ffn_module.LOOP if case == "loop_fp64" else ffn_module.ffn_kernel(
        "cpu", torch.bfloat16 if case == "padded_bf16" else torch.float32))
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_host_read_counter_counts():
    """The counter above sees the reads it must (else a zero there proves nothing)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        t = torch.arange(3)
        assert count_host_reads(monkeypatch, lambda: (t.sum().item(), t.tolist(), int(t[0]), bool(t[1]))) == 4


@pytest.mark.parametrize("layout", ["contiguous", "heads_transposed"])
def test_fused_rope_matches_plain_formula_in_float64_with_gradients(layout):
    torch.manual_seed(5)
    B, T, H, hd = 2, 7, 3, 8
    base = torch.randn(B, T, H, hd, dtype=torch.float64)
    x = (base.transpose(1, 2) if layout == "heads_transposed" else base.view(B, H, T, hd)).requires_grad_()
    cos, sin = rope_tables(T, hd, 10000.0, x.device, torch.float64)
    grad = torch.randn(B, H, T, hd, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    (dx,) = torch.autograd.grad(out, x, grad)
    expected = reference_rope(x, cos, sin)
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-12, atol=1e-12)
    # A rotation keeps each pair's length: an invariant that needs no second implementation. The
    # tables' angles are float32, so cos^2 + sin^2 = 1 holds to float32's precision only.
    pairs = lambda t: t[..., : hd // 2] ** 2 + t[..., hd // 2:] ** 2  # noqa: E731
    torch.testing.assert_close(pairs(out), pairs(x.detach()), rtol=1e-6, atol=1e-6)
    torch.autograd.gradcheck(lambda t: apply_rope(t, cos[:3], sin[:3]), (x[:1, :1, :3].detach().requires_grad_(),))


def test_fused_rope_rejects_tables_of_the_wrong_width():
    cos, sin = rope_tables(5, 6, 10000.0, "cpu", torch.float32)
    with pytest.raises(ValueError, match="head_dim 8"):
        apply_rope(torch.randn(1, 1, 5, 8), cos, sin)


def loop_attention(attn: MixtureOfAttention, h: torch.Tensor) -> torch.Tensor:
    """Expert by expert, head by head, with an explicit causal softmax; gates from the router."""
    cfg = attn.config
    B, T, d = h.shape
    H, H_kv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    cos, sin = rope_tables(T, hd, cfg.rope_base, h.device, h.dtype)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    gates = (h @ attn.router.weight.T).softmax(-1)
    out = torch.zeros_like(h)
    for e in range(attn.wq.shape[0]):
        kv = 0 if attn.wk.shape[0] == 1 else e
        q = reference_rope((h @ attn.wq[e].T).view(B, T, H, hd).transpose(1, 2), cos, sin)
        k = reference_rope((h @ attn.wk[kv].T).view(B, T, H_kv, hd).transpose(1, 2), cos, sin)
        v = (h @ attn.wv[kv].T).view(B, T, H_kv, hd).transpose(1, 2)
        heads = []
        for head in range(H):
            g = head // (H // H_kv)
            scores = (q[:, head] @ k[:, g].transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, g])
        o = torch.stack(heads, dim=2).reshape(B, T, d)
        out = out + gates[..., e, None] * (o @ attn.wo[e].T)
    return out


def attention_bank(shared_kv: bool, n_kv_head: int) -> tuple[MixtureOfAttention, torch.Tensor]:
    torch.manual_seed(3)
    attn = MixtureOfAttention(ModelConfig(**TINY, n_kv_head=n_kv_head, n_experts=3, attn_experts=3,
                                          attn_shared_kv=shared_kv))
    attn.reset_parameters()
    large_weights(attn)
    torch.nn.init.normal_(attn.router.weight, std=0.5)  # far from uniform gates
    return attn, torch.randn(2, 11, TINY["d_model"])


KV_LAYOUTS = [(False, 4), (False, 2), (True, 4), (True, 1)]


@pytest.mark.parametrize("shared_kv,n_kv_head", KV_LAYOUTS)
def test_attention_bank_matches_expert_loop_with_gradients(shared_kv, n_kv_head):
    attn, h = attention_bank(shared_kv, n_kv_head)
    cos, sin = rope_tables(h.shape[1], attn.config.head_dim, attn.config.rope_base, h.device, h.dtype)
    grad = torch.randn_like(h)
    out, grads = run_with_grads(attn, h, lambda t: attn(t, cos, sin)[0], grad)
    expected, expected_grads = run_with_grads(attn, h, lambda t: loop_attention(attn, t), grad)
    torch.testing.assert_close(out, expected, **FP32)
    assert_all_close(grads, expected_grads)


@pytest.mark.parametrize("shared_kv,n_kv_head", KV_LAYOUTS[::2])
def test_attention_bank_bf16_autocast_matches_fp32_loop(shared_kv, n_kv_head):
    attn, h = attention_bank(shared_kv, n_kv_head)
    cos, sin = rope_tables(h.shape[1], attn.config.head_dim, attn.config.rope_base, h.device, h.dtype)
    grad = torch.randn_like(h)
    expected, expected_grads = run_with_grads(attn, h, lambda t: loop_attention(attn, t), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run_with_grads(attn, h, lambda t: attn(t, cos, sin)[0], grad)
    assert_near(out, expected)
    for name in expected_grads:
        assert_near(grads[name], expected_grads[name], name)
