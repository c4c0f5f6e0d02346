"""The shared layer code against plain, independent references (float64 loops)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_rope

from bam_lightning import GPT, ModelConfig
from bam_lightning.flops import parameter_counts
from bam_lightning.model.ffn import MixtureOfFFN
from bam_lightning.model.layers import rope_tables

TINY = dict(vocab_size=61, n_layer=2, d_model=32, n_head=4, max_seq_len=24)


def reference_attention(h, wq, wk, wv, wo, n_head, n_kv_head, base=10000.0):
    """One expert's causal MHA written out head by head, in the input dtype."""
    B, T, d = h.shape
    hd = d // n_head
    q = (h @ wq.T).view(B, T, n_head, hd).transpose(1, 2)
    k = (h @ wk.T).view(B, T, n_kv_head, hd).transpose(1, 2)
    v = (h @ wv.T).view(B, T, n_kv_head, hd).transpose(1, 2)
    cos, sin = rope_tables(T, hd, base, h.device, h.dtype)
    q, k = reference_rope(q, cos, sin), reference_rope(k, cos, sin)
    group = n_head // n_kv_head
    out = torch.empty_like(q)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for head in range(n_head):
        scores = q[:, head] @ k[:, head // group].transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[:, head] = scores.softmax(-1) @ v[:, head // group]
    return out.transpose(1, 2).reshape(B, T, d) @ wo.T


@pytest.mark.parametrize("shared_kv,n_kv_head", [(False, 4), (False, 2), (True, 4), (True, 1)])
def test_mixture_of_attention_matches_per_expert_loop(shared_kv, n_kv_head):
    torch.manual_seed(0)
    config = ModelConfig(**TINY, n_kv_head=n_kv_head, n_experts=3, attn_experts=3, attn_shared_kv=shared_kv)
    attn = GPT(config).blocks[0].attn.double()
    torch.nn.init.normal_(attn.router.weight, std=0.5)  # far from uniform gates
    h = torch.randn(2, 9, config.d_model, dtype=torch.float64)
    cos, sin = rope_tables(9, config.head_dim, config.rope_base, h.device, h.dtype)
    out, stats = attn(h, cos, sin)
    gates = (h @ attn.router.weight.T).softmax(-1)
    expected = sum(
        gates[..., e, None] * reference_attention(
            h, attn.wq[e], attn.wk[0 if shared_kv else e], attn.wv[0 if shared_kv else e], attn.wo[e],
            config.n_head, n_kv_head)
        for e in range(3))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.attn_gate_mean, gates.mean((0, 1)))
    assert math.isclose(stats.attn_gate_mean.sum().item(), 1.0, rel_tol=1e-9)


def reference_ffn(x, ffn: MixtureOfFFN, top_k: int, renormalize: bool):
    """Token by token: softmax over all experts, top-k, optional renormalisation."""
    probs = (x @ ffn.router.weight.T).softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, idx = probs[t].topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, idx, strict=True):
            hidden = F.silu(x[t] @ ffn.w_gate[e].T) * (x[t] @ ffn.w_up[e].T)
            out[t] += w * (hidden @ ffn.w_down[e].T)
    return out


@pytest.mark.parametrize("top_k,renormalize", [(1, False), (2, False), (2, True)])
def test_ffn_mixture_matches_token_loop_including_idle_experts(top_k, renormalize):
    torch.manual_seed(1)
    config = ModelConfig(**TINY, n_experts=5, ffn_top_k=top_k, ffn_renormalize=renormalize)
    ffn = MixtureOfFFN(config)
    ffn.reset_parameters()
    with torch.no_grad():  # bias the router so that experts 3 and 4 never win: idle experts
        ffn.router.weight.normal_(std=0.3)
        ffn.router.weight[3:] = -1.0
    x = torch.randn(1, 13, config.d_model)
    x = x.abs()  # with positive inputs the biased rows give very negative logits
    out, stats = ffn(x)
    assert stats.expert_fraction[3:].sum() == 0
    expected = reference_ffn(x[0].double(), ffn.double(), top_k, renormalize)
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_ffn_router_losses_match_their_definitions():
    torch.manual_seed(2)
    config = ModelConfig(**TINY, n_experts=4)
    ffn = MixtureOfFFN(config)
    ffn.reset_parameters()
    torch.nn.init.normal_(ffn.router.weight, std=1.0)
    x = torch.randn(50, config.d_model)
    _, _, stats = ffn.route(x)
    logits = x.double() @ ffn.router.weight.double().T
    probs = logits.softmax(-1)
    counts = torch.bincount(probs.argmax(-1), minlength=4).double() / 50
    assert math.isclose(stats.lb_loss.item(), 4 * (counts * probs.mean(0)).sum().item(), rel_tol=1e-5)
    assert math.isclose(stats.z_loss.item(), logits.logsumexp(-1).square().mean().item(), rel_tol=1e-5)


def test_one_expert_mixture_gives_dense_logits():
    torch.manual_seed(3)
    dense = GPT(ModelConfig(**TINY))
    mixture = GPT(ModelConfig(**TINY, n_experts=1, attn_experts=1))
    missing = mixture.load_state_dict(dense.state_dict(), strict=False).missing_keys
    assert all(key.endswith("router.weight") for key in missing)
    idx = torch.randint(0, TINY["vocab_size"], (2, 16))
    torch.testing.assert_close(mixture(idx)[0], dense(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("extra", [
    {}, {"tie_embeddings": True}, {"block_layout": "sequential", "norm": "layernorm"},
    {"n_experts": 4, "attn_experts": 4}, {"n_experts": 4, "attn_experts": 4, "attn_shared_kv": True, "n_kv_head": 2},
    {"n_experts": 6, "ffn_top_k": 3},
])
def test_parameter_count_formula_matches_built_model(extra):
    config = ModelConfig(**TINY, **extra)
    assert parameter_counts(config)[0] == GPT(config).num_parameters()


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(4)
    model = GPT(ModelConfig(**TINY, n_experts=3, attn_experts=3))
    idx = torch.randint(0, TINY["vocab_size"], (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % TINY["vocab_size"]
    torch.testing.assert_close(model(idx)[0][:, :8], model(changed)[0][:, :8])


@pytest.mark.parametrize("field,value,message", [
    ("d_model", 30, "d_model (30) must be divisible by n_head (4)"),
    ("n_kv_head", 3, "n_head (4) must be divisible by n_kv_head (3)"),
    ("ffn_top_k", 5, "ffn_top_k (5) must be between 1 and n_experts (4)"),
    ("attn_shared_kv", True, "attn_shared_kv needs attn_experts > 0"),
    ("norm", "batchnorm", "norm must be rmsnorm|layernorm"),
])
def test_config_rejects_nonsense_naming_the_field(field, value, message):
    values = dict(TINY, n_experts=4)
    values[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        ModelConfig(**values)


def test_config_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"ckpt.*unknown ModelConfig keys \['n_expert'\]"):
        ModelConfig.from_dict({"n_expert": 4}, source="ckpt")


def test_activation_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(5)
    model = GPT(ModelConfig(**TINY, n_experts=3, attn_experts=3))
    idx = torch.randint(0, TINY["vocab_size"], (2, 10))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        logits, stats = model(idx)
        (logits.square().mean() + sum(s.lb_loss for s in stats)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_sliding_window_decoding_matches_full_recompute_and_padded_rows_decode_alone():
    """The KV cache's window (Mistral) against the uncached forward, whose window mask is an
    explicit [T, T] band: greedy tokens past the window, and a left-padded batch row by row."""
    from bam_lightning.generate import generate

    torch.manual_seed(0)
    config = ModelConfig(**TINY, sliding_window=5, block_layout="sequential")
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompts = [[3, 9, 4], [7, 1, 8, 2, 6, 5, 11, 13]]
    batch = generate(model, prompts, max_new_tokens=10)
    for prompt, tokens in zip(prompts, batch, strict=True):
        assert generate(model, [prompt], max_new_tokens=10)[0] == tokens
        sequence = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(10):
                sequence = torch.cat([sequence, model(sequence)[0][:, -1:].argmax(-1)], dim=1)
        assert sequence[0, len(prompt):].tolist() == tokens
    full = ModelConfig(**TINY, block_layout="sequential")
    unwindowed = GPT(full).eval()
    unwindowed.load_state_dict(model.state_dict())
    ids = torch.tensor([prompts[1]])
    with torch.no_grad():  # the window changes logits only after position 5
        same, differs = model(ids)[0], unwindowed(ids)[0]
    assert torch.equal(same[:, :5], differs[:, :5]) and not torch.allclose(same[:, 5:], differs[:, 5:])
