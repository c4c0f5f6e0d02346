"""upcycle(): the initialisation table of BAM_SPEC.md, function preservation, and validation."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    dense_sources,
    moe_config,
    random_dense_state_dict,
    save_lightning_checkpoint,
    tiny_config,
)
from torch.testing import assert_close

from bam_lightning.checkpoint import save_safetensors
from bam_lightning.errors import UserError
from bam_lightning.model import GPT
from bam_lightning.model.ffn import swiglu
from bam_lightning.model.layers import rope_tables
from bam_lightning.upcycle import provenance, upcycle, upcycle_from_checkpoints, validate_sources

N = 3
DENSE = tiny_config()
MIXTURES = {  # method -> the mixture fields it needs for N sources
    "bam": dict(n_experts=N, attn_experts=N),
    "bam_shared_kv": dict(n_experts=N, attn_experts=N, attn_shared_kv=True),
    "btx": dict(n_experts=N),
    "sparse": dict(n_experts=N),
}
EXPERT_PROJECTIONS = {"bam": {"wq", "wk", "wv", "wo"}, "bam_shared_kv": {"wq", "wo"}, "btx": set()}


def build(config, state_dict) -> GPT:
    model = GPT(config)
    model.load_state_dict(state_dict)  # strict: the upcycled key set is exactly the model's
    return model.eval()


def tokens(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, DENSE.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----- function preservation from identical sources -----
@pytest.mark.parametrize("method", ["bam", "bam_shared_kv"])
def test_identical_sources_attention_mixture_equals_dense_attention(method):
    dense_state = random_dense_state_dict(DENSE, 0)
    config = moe_config(DENSE, **MIXTURES[method])
    dense, moe = build(DENSE, dense_state), build(config, upcycle([dense_state] * N, config, method))
    h = torch.randn(2, 10, DENSE.d_model, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(10, DENSE.head_dim, DENSE.rope_base, h.device, h.dtype)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in range(DENSE.n_layer):
            expected, _ = dense.blocks[layer].attn(h, cos, sin)
            attn = moe.blocks[layer].attn
            for _ in range(3):  # large random routers: gates far from uniform, still summing to 1
                attn.router.weight.copy_(torch.randn(attn.router.weight.shape, generator=generator) * 3)
                assert attn.gates(h).max() > 0.8
                got, _ = attn(h, cos, sin)
                assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["bam", "bam_shared_kv", "btx"])
def test_identical_sources_paper_gate_ffn_is_p_top_times_dense_ffn(method):
    dense_state = random_dense_state_dict(DENSE, 0)
    config = moe_config(DENSE, **MIXTURES[method], ffn_top_k=1, ffn_renormalize=False)
    moe = build(config, upcycle([dense_state] * N, config, method, router_seed=3))
    ffn = moe.blocks[1].ffn
    with torch.no_grad():
        ffn.router.weight.mul_(100)  # make the router decisive so p_top is far from 1/N
        h = torch.randn(2, 10, DENSE.d_model, generator=torch.Generator().manual_seed(1))
        got, _ = ffn(h)
    x = h.reshape(-1, DENSE.d_model)
    p_top = torch.softmax(x.double() @ ffn.router.weight.double().T, dim=-1).max(dim=-1).values
    dense_ffn = swiglu(x.double(), *(dense_state[f"blocks.1.ffn.{w}"][0].double() for w in ("w_gate", "w_up", "w_down")))
    assert p_top.min() < 0.9 and p_top.max() > 1 / N + 0.1
    assert_close(got.reshape(-1, DENSE.d_model).double(), p_top[:, None] * dense_ffn, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["bam", "bam_shared_kv", "btx"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_identical_sources_renormalised_gate_mixture_equals_dense_model(method, top_k):
    dense_state = random_dense_state_dict(DENSE, 0)
    config = moe_config(DENSE, **MIXTURES[method], ffn_top_k=top_k, ffn_renormalize=True, router_init_std=1.0)
    dense, moe = build(DENSE, dense_state), build(config, upcycle([dense_state] * N, config, method))
    with torch.no_grad():
        assert_close(moe(tokens())[0], dense(tokens())[0], rtol=1e-4, atol=1e-4)


def test_one_expert_mixture_from_one_dense_model_gives_dense_logits():
    dense_state = random_dense_state_dict(DENSE, 0)
    config = moe_config(DENSE, n_experts=1, attn_experts=1)
    dense, moe = build(DENSE, dense_state), build(config, upcycle([dense_state], config, "bam"))
    with torch.no_grad():
        assert_close(moe(tokens())[0], dense(tokens())[0], rtol=1e-5, atol=1e-5)


# ----- where each tensor goes, from different sources -----
@pytest.mark.parametrize("chunk_bytes", [2**24, 36], ids=["whole", "streamed-in-9-float-chunks"])
@pytest.mark.parametrize("method", ["bam", "bam_shared_kv", "btx", "sparse"])
def test_different_sources_fill_expert_slots_means_and_seed_copies(method, chunk_bytes):
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    config = moe_config(DENSE, **MIXTURES[method])
    seed_index = 1
    out = upcycle(states, config, method, seed_index=seed_index, chunk_bytes=chunk_bytes)
    build(config, out)
    seed = states[seed_index]
    for key, tensor in out.items():
        if key.endswith("router.weight"):
            continue
        if method == "sparse":
            assert torch.equal(tensor, seed[key].expand(tensor.shape)), key
        elif ".ffn.w_" in key or key.rsplit(".", 1)[1] in EXPERT_PROJECTIONS[method]:
            assert tensor.shape[0] == N, key
            for j in range(N):
                assert torch.equal(tensor[j], states[j][key][0]), (key, j)
        else:  # embeddings, LM head, norms; BTX attention; Shared-KV K and V
            mean = torch.stack([state[key].double() for state in states]).mean(dim=0)
            assert tensor.shape == states[0][key].shape, key
            assert_close(tensor.double(), mean, rtol=1e-6, atol=1e-7, msg=key)
            assert not torch.equal(tensor, seed[key]), key


@pytest.mark.parametrize("chunk_bytes", [2**24, 36], ids=["whole", "streamed-in-9-float-chunks"])
def test_parameter_matched_btx_extra_experts_copy_the_seed_ffn(chunk_bytes):
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    config = moe_config(DENSE, n_experts=N + 2)
    out = upcycle(states, config, "btx", seed_index=2, chunk_bytes=chunk_bytes)
    build(config, out)
    for key in (k for k in out if ".ffn.w_" in k):
        for j in range(N):
            assert torch.equal(out[key][j], states[j][key][0])
        for j in (N, N + 1):
            assert torch.equal(out[key][j], states[2][key][0])
    info = provenance(["a", "b", "c"], config, "btx", seed_index=2)
    assert info["extra_ffn_experts_from"] == "c"
    assert [e["source"] for e in info["experts"]] == ["a", "b", "c", "c", "c"]


def test_routers_follow_the_config_and_the_seed():
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    config = moe_config(DENSE, **MIXTURES["bam"], router_init_std=0.05)
    first, again = upcycle(states, config, "bam", router_seed=7), upcycle(states, config, "bam", router_seed=7)
    other = upcycle(states, config, "bam", router_seed=8)
    routers = [k for k in first if k.endswith("router.weight")]
    assert len(routers) == 2 * DENSE.n_layer
    for key in routers:
        assert torch.equal(first[key], again[key]) and not torch.equal(first[key], other[key])
        assert 0.02 < first[key].std() < 0.1
    zeros = upcycle(states, moe_config(config, router_init="zeros"), "bam")
    assert all(not zeros[key].any() for key in routers)


def test_low_precision_sources_keep_their_dtype_and_average_in_float32():
    states = [{k: v.to(torch.bfloat16) for k, v in random_dense_state_dict(DENSE, j).items()} for j in range(N)]
    out = upcycle(states, moe_config(DENSE, **MIXTURES["bam"]), "bam")
    assert all(tensor.dtype == torch.bfloat16 for tensor in out.values())
    mean = (sum(state["norm_f.weight"].float() for state in states) / N).to(torch.bfloat16)
    assert torch.equal(out["norm_f.weight"], mean)


def test_ffn_router_gets_gradient_from_the_lm_loss_alone_at_top_1():
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    config = moe_config(DENSE, **MIXTURES["bam"], ffn_top_k=1, ffn_renormalize=False)
    moe = build(config, upcycle(states, config, "bam")).train()
    batch = tokens(length=13)
    logits, _ = moe(batch[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    for block in moe.blocks:
        assert block.ffn.router.weight.grad.abs().sum() > 0
        assert block.attn.router.weight.grad.abs().sum() > 0


# ----- validation of state dicts -----
NAMES = ["a.ckpt", "b.ckpt", "c.ckpt"]


def expect_error(states, method="bam", error=ValueError, match="", config=None, **kwargs):
    config = config or moe_config(DENSE, **MIXTURES[method])
    with pytest.raises(error, match=match):
        upcycle(states, config, method, sources=NAMES[: len(states)], **kwargs)


def test_validation_names_source_key_and_shapes():
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    states[1]["blocks.1.ffn.w_up"] = torch.zeros(1, 65, DENSE.d_model)
    expect_error(states, match=re.escape("b.ckpt: key 'blocks.1.ffn.w_up' has shape [1, 65, 32], but a.ckpt has [1, 64, 32]"))


def test_validation_names_vocabulary_and_layer_count():
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    states[2] = random_dense_state_dict(tiny_config(vocab_size=60), 2)
    expect_error(states, match="c.ckpt: vocab_size 60 vs 50 in a.ckpt")
    states[2] = random_dense_state_dict(tiny_config(n_layer=3), 2)
    expect_error(states, match="c.ckpt: n_layer 3 vs 2 in a.ckpt")
    same = [random_dense_state_dict(tiny_config(vocab_size=60), j) for j in range(N)]
    expect_error(same, match="a.ckpt: vocab_size 60 vs 50 in the mixture config")


def test_validation_names_missing_and_unexpected_keys():
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    del states[1]["blocks.0.attn.wk"]
    expect_error(states, error=KeyError, match="b.ckpt: missing key 'blocks.0.attn.wk'")
    states[1] = random_dense_state_dict(DENSE, 1) | {"blocks.0.attn.bias": torch.zeros(3)}
    expect_error(states, error=KeyError, match="b.ckpt: unexpected key 'blocks.0.attn.bias'")


def test_validation_refuses_mixture_state_dicts_and_mismatched_mixture_config():
    states = [random_dense_state_dict(DENSE, j) for j in range(N)]
    mixture = moe_config(DENSE, **MIXTURES["btx"])
    states[0] = random_dense_state_dict(mixture, 0)
    expect_error(states, match="a.ckpt: is a mixture state dict .*expected dense")
    states[0] = random_dense_state_dict(DENSE, 0)
    expect_error(states, config=moe_config(tiny_config(d_ff=128), **MIXTURES["bam"]),
                 match=re.escape("a.ckpt: key 'blocks.0.ffn.w_gate' has shape [1, 64, 32], the mixture config's "
                                 "dense shape is [1, 128, 32]"))


@pytest.mark.parametrize(("method", "mixture", "n_sources", "match"), [
    ("bam", MIXTURES["bam"], 2, "2 sources need attn_experts = n_experts = 2"),
    ("bam", MIXTURES["bam_shared_kv"], 3, "bam needs attn_shared_kv=False"),
    ("bam_shared_kv", MIXTURES["bam"], 3, "bam_shared_kv needs attn_shared_kv=True"),
    ("btx", dict(n_experts=2), 3, "3 sources need n_experts >= 3"),
    ("btx", MIXTURES["bam"], 3, "btx keeps one attention"),
    ("sparse", MIXTURES["bam"], 1, "sparse keeps one attention"),
    ("moe", MIXTURES["bam"], 3, "unknown upcycling method 'moe'"),
])
def test_validation_refuses_source_counts_that_do_not_fit(method, mixture, n_sources, match):
    states = [random_dense_state_dict(DENSE, j) for j in range(n_sources)]
    expect_error(states, method=method, config=moe_config(DENSE, **mixture), match=match)


def test_sparse_accepts_any_number_of_sources_but_seed_index_must_exist():
    states = [random_dense_state_dict(DENSE, j) for j in range(2)]
    config = moe_config(DENSE, n_experts=4)
    validate_sources(states, config, "sparse", seed_index=1)
    expect_error(states, method="sparse", config=config, seed_index=2, match="seed_index 2 is out of range")


# ----- from checkpoint files -----
def test_upcycle_from_checkpoints_matches_upcycle_and_reports_provenance(tmp_path):
    paths = dense_sources(tmp_path, DENSE, N)
    paths[2] = tmp_path / "dense2.safetensors"  # either format may be a source
    save_safetensors(random_dense_state_dict(DENSE, 2), DENSE, paths[2])
    config = moe_config(DENSE, **MIXTURES["bam_shared_kv"])
    state, info = upcycle_from_checkpoints(paths, config, "bam_shared_kv", seed_index=2, router_seed=5)
    expected = upcycle([random_dense_state_dict(DENSE, j) for j in range(N)], config, "bam_shared_kv",
                       seed_index=2, router_seed=5)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[key], expected[key]) for key in state)
    assert info["method"] == "bam_shared_kv" and info["seed"] == str(paths[2])
    assert [(e["index"], e["source"]) for e in info["experts"]] == [(j, str(p)) for j, p in enumerate(paths)]
    assert info["experts"][0]["parts"] == ["attention_q_o", "ffn"]


def test_sources_may_differ_in_fields_that_do_not_change_weights(tmp_path):
    paths = dense_sources(tmp_path, DENSE, 2)
    other = tiny_config(init_std=0.05, max_seq_len=64)
    save_lightning_checkpoint(paths[1], other, random_dense_state_dict(other, 1))
    upcycle_from_checkpoints(paths, moe_config(DENSE, n_experts=2), "btx")


def file_error(paths, method="bam", error=ValueError, match="", mixture=None, **kwargs):
    config = moe_config(DENSE, **(mixture or MIXTURES[method]))
    with pytest.raises(error, match=match):
        upcycle_from_checkpoints(paths, config, method, **kwargs)


@pytest.mark.parametrize(("field", "value"), [("d_ff", 128), ("vocab_size", 60), ("n_layer", 3), ("norm", "layernorm")])
def test_checkpoint_config_mismatch_names_file_and_field(tmp_path, field, value):
    paths = dense_sources(tmp_path, DENSE, N)
    odd = tiny_config(**{field: value})
    save_lightning_checkpoint(paths[1], odd, random_dense_state_dict(odd, 1))
    file_error(paths, match=f"{re.escape(str(paths[1]))}: does not match the first source .*{field}: checkpoint")


def test_checkpoint_tensor_problems_name_file_and_key(tmp_path):
    paths = dense_sources(tmp_path, DENSE, N)
    state = random_dense_state_dict(DENSE, 1)
    del state["blocks.1.ffn.w_down"]
    save_lightning_checkpoint(paths[1], DENSE, state)
    file_error(paths, error=KeyError, match=f"{re.escape(str(paths[1]))}: missing key 'blocks.1.ffn.w_down'")
    state = random_dense_state_dict(DENSE, 1) | {"lm_head.weight": torch.zeros(DENSE.vocab_size, 16)}
    save_lightning_checkpoint(paths[1], DENSE, state)
    file_error(paths, match=f"{re.escape(str(paths[1]))}: key 'lm_head.weight' has shape")


def test_corrupt_truncated_and_missing_files_are_named(tmp_path):
    paths = dense_sources(tmp_path, DENSE, N)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])
    file_error(paths, match=f"{re.escape(str(paths[2]))}: not a readable checkpoint")
    paths[2].write_bytes(b"this is not a checkpoint" * 10)
    file_error(paths, match=f"{re.escape(str(paths[2]))}: not a readable checkpoint")
    paths[2].unlink()
    file_error(paths, error=UserError, match=re.escape(str(paths[2])))


def test_mixture_checkpoint_as_source_is_refused(tmp_path):
    paths = dense_sources(tmp_path, DENSE, N)
    mixture = moe_config(DENSE, **MIXTURES["btx"])
    save_lightning_checkpoint(paths[0], mixture, random_dense_state_dict(mixture, 0))
    file_error(paths, match=f"{re.escape(str(paths[0]))}: is a mixture checkpoint, expected dense")


def test_wrong_number_of_checkpoints_and_tokenizer_mismatch(tmp_path):
    paths = dense_sources(tmp_path, DENSE, N)
    file_error(paths[:2], match="2 sources need attn_experts = n_experts = 2")
    save_lightning_checkpoint(paths[1], DENSE, random_dense_state_dict(DENSE, 1), tokenizer="bpe-abc")
    file_error(paths, match=f"{re.escape(str(paths[1]))}: trained with tokenizer 'bpe-abc', expected 'bpe-xyz'",
               tokenizer="bpe-xyz")


# ----- other families' tensors (biases, q/k norms, GELU MLP) follow their projection -----
FAMILY_DENSE = tiny_config(n_head=4, n_kv_head=2, head_dim=12, rotary_dim=4, qkv_bias=True, attn_out_bias=True,
                           qk_norm=True, ffn_activation="gelu", ffn_bias=True, norm="layernorm", norm_bias=True,
                           parallel_ffn_norm=True, sliding_window=5,
                           rope_scaling={"type": "linear", "factor": 2.0})
QUERY_SIDE, KV_SIDE = {"wq", "wo", "bq", "bo", "q_norm"}, {"wk", "wv", "bk", "bv", "k_norm"}


@pytest.mark.parametrize("method", ["bam", "bam_shared_kv", "btx"])
def test_family_fields_identical_sources_renormalised_mixture_equals_dense_model(method):
    dense_state = random_dense_state_dict(FAMILY_DENSE, 0)
    config = moe_config(FAMILY_DENSE, **MIXTURES[method], ffn_top_k=2, ffn_renormalize=True, router_init_std=1.0)
    dense, moe = build(FAMILY_DENSE, dense_state), build(config, upcycle([dense_state] * N, config, method))
    with torch.no_grad():  # 12 tokens: past the window of 5
        assert_close(moe(tokens())[0], dense(tokens())[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["bam", "bam_shared_kv", "btx"])
def test_family_fields_fill_expert_slots_or_means_with_their_projection(method):
    states = [random_dense_state_dict(FAMILY_DENSE, j) for j in range(N)]
    config = moe_config(FAMILY_DENSE, **MIXTURES[method])
    out = upcycle(states, config, method)
    per_expert = {"bam": QUERY_SIDE | KV_SIDE, "bam_shared_kv": QUERY_SIDE, "btx": set()}[method]
    seen = set()
    for key, tensor in out.items():
        name = key.rsplit(".", 1)[1]
        if key.endswith("router.weight"):
            continue
        seen.add(name)
        if ".ffn." in key or name in per_expert:
            for j in range(N):
                assert torch.equal(tensor[j], states[j][key][0]), (key, j)
        else:
            mean = torch.stack([state[key].double() for state in states]).mean(dim=0)
            assert_close(tensor.double(), mean, rtol=1e-6, atol=1e-7, msg=key)
    assert {"bq", "bk", "bv", "bo", "q_norm", "k_norm", "b_up", "b_down", "bias"} <= seen
