"""Cached decoding against full recomputation, left-padded batches, sampling, checkpoints, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_dense_state_dict, save_lightning_checkpoint, tiny_config
from safetensors.torch import save_file

from bam_lightning.checkpoint import read_checkpoint, save_safetensors
from bam_lightning.config import ModelConfig
from bam_lightning.data.tokenizer import ByteTokenizer, train_bpe
from bam_lightning.generate import (
    checkpoint_tokenizer,
    generate,
    load_for_generation,
    main,
    sample_next,
)
from bam_lightning.model import GPT

# Larger weights than training's init so logits and routers are decisive (no near-ties).
SHARP = dict(init_std=0.15, router_init_std=1.0, max_seq_len=24)
KINDS = {
    "dense_parallel": tiny_config(**SHARP),
    "dense_sequential_gqa": tiny_config(**SHARP, block_layout="sequential", n_head=4, n_kv_head=2),
    "dense_tied_layernorm": tiny_config(**SHARP, tie_embeddings=True, norm="layernorm"),
    "btx_top1": tiny_config(**SHARP, n_experts=3),
    "sparse_top2_renorm": tiny_config(**SHARP, n_experts=3, ffn_top_k=2, ffn_renormalize=True),
    "bam_expert_kv": tiny_config(**SHARP, n_experts=3, attn_experts=3),
    "bam_expert_kv_sequential_gqa": tiny_config(**SHARP, n_experts=3, attn_experts=3, block_layout="sequential",
                                                n_head=4, n_kv_head=2),
    "bam_shared_kv": tiny_config(**SHARP, n_experts=3, attn_experts=3, attn_shared_kv=True),
    "bam_shared_kv_gqa": tiny_config(**SHARP, n_experts=3, attn_experts=3, attn_shared_kv=True, n_head=4,
                                     n_kv_head=2),
    "attn_top_k": tiny_config(**SHARP, n_experts=3, attn_experts=3, attn_routing="top_k", attn_top_k=2),
}


def make_model(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def recompute_greedy(model: GPT, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """The reference: the whole sequence through the training forward at every step."""
    ids, logits_per_step = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0][0, -1]
            logits_per_step.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], logits_per_step


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_greedy_matches_full_recomputation(kind):
    model = make_model(KINDS[kind])
    prompt, steps = [3, 17, 5, 42, 8, 1], 10
    expected, expected_logits = recompute_greedy(model, prompt, steps)
    with torch.no_grad():
        cache = model.new_cache(1, len(prompt) + steps)
        prefill = model(torch.tensor([prompt]), cache=cache)[0]
        torch.testing.assert_close(prefill, model(torch.tensor([prompt]))[0], atol=1e-5, rtol=0)
        logits, tokens = prefill[0, -1], []
        for step in range(steps):
            torch.testing.assert_close(logits, expected_logits[step], atol=1e-5, rtol=0)
            tokens.append(int(logits.argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[0][0, -1]
    assert tokens == expected
    assert generate(model, [prompt], steps) == [expected]


@pytest.mark.parametrize("kind", list(KINDS))
def test_left_padded_batch_rows_decode_as_alone(kind):
    model = make_model(KINDS[kind], seed=1)
    prompts = [[5, 9, 2], [7, 1, 30, 11, 4, 19, 2], [44], [8, 8, 8, 8]]
    steps = 9
    batched = generate(model, prompts, steps)
    for prompt, row in zip(prompts, batched, strict=True):
        assert [row] == generate(model, [prompt], steps)
        assert row == recompute_greedy(model, prompt, steps)[0]


def test_each_row_of_a_batch_gets_the_tokens_it_gets_alone_up_to_its_own_max_seq_len():
    """A long prompt near max_seq_len (24) stops early; the short rows beside it do not."""
    model = make_model(KINDS["bam_expert_kv"], seed=2)
    prompts = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [44, 3, 8, 8, 8, 1, 7]]
    alone = [generate(model, [prompt], 10)[0] for prompt in prompts]
    assert [len(row) for row in alone] == [10, 5, 10]  # 24 - 20 + 1 = 5 for the long prompt
    assert generate(model, prompts, 10) == alone
    assert alone[0] == recompute_greedy(model, prompts[0], 10)[0]
    eos = alone[2][3]  # an end-of-text id that stops row 2 (and maybe others) early
    stopped = [generate(model, [prompt], 10, eos_id=eos)[0] for prompt in prompts]
    assert stopped[2] == alone[2][:alone[2].index(eos) + 1]
    assert generate(model, prompts, 10, eos_id=eos) == stopped
    assert generate(model, prompts[::-1], 10, eos_id=eos) == stopped[::-1]


def test_prompt_prefilled_in_chunks_equals_one_prefill():
    model = make_model(KINDS["bam_expert_kv"])
    prompt = torch.tensor([[4, 9, 13, 2, 7, 30, 1]])
    with torch.no_grad():
        whole = model(prompt, cache=model.new_cache(1, 8))[0]
        cache = model.new_cache(1, 8)
        first = model(prompt[:, :3], cache=cache)[0]
        second = model(prompt[:, 3:], cache=cache)[0]
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=0)


def test_shared_kv_cache_is_exactly_one_eth_of_expert_kv():
    E = 4
    base = tiny_config(n_head=4, n_kv_head=2, n_experts=E, attn_experts=E)
    expert_kv = GPT(base).new_cache(3, 16)
    shared_kv = GPT(ModelConfig(**{**base.to_dict(), "attn_shared_kv": True})).new_cache(3, 16)
    dense = GPT(base.dense()).new_cache(3, 16)
    per_layer_kv = 2 * 3 * base.n_kv_head * 16 * base.head_dim * 4  # K and V, fp32
    assert dense.bytes() == base.n_layer * per_layer_kv
    assert shared_kv.bytes() == dense.bytes()
    assert shared_kv.bytes() * E == expert_kv.bytes()
    assert expert_kv.bytes_per_token() == E * 2 * base.n_layer * base.n_kv_head * base.head_dim * 4


def test_eos_stops_a_row_and_other_rows_go_on():
    model = make_model(KINDS["dense_parallel"])
    prompts = [[3, 17, 5], [9, 9]]
    free = generate(model, prompts, 6)
    eos = free[0][2]  # row 0's third token becomes the end-of-text id
    stopped = generate(model, prompts, 6, eos_id=eos)
    assert stopped[0] == free[0][:3]
    cut = free[1].index(eos) + 1 if eos in free[1] else len(free[1])
    assert stopped[1] == free[1][:cut]


def test_sampling_restrictions_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 2, 1.0, gen).tolist()) == {0, 1}  # top-k 2
    assert set(sample_next(logits, 1.0, None, 0.6, gen).tolist()) == {0, 1}  # 0.5 < 0.6 <= 0.8
    assert set(sample_next(logits, 1.0, None, 0.5, gen).tolist()) == {0}  # 0.5 already reaches p
    assert set(sample_next(logits, 1.0, None, 1.0, gen).tolist()) == {0, 1, 2, 3}
    draws = sample_next(logits, 1.0, None, 1.0, gen)
    assert abs((draws == 0).float().mean().item() - 0.5) < 0.05  # the softmax itself, at T = 1
    model = make_model(KINDS["btx_top1"])
    sampled = [generate(model, [[1, 2, 3]], 8, temperature=1.5, seed=s) for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    assert generate(model, [[1, 2, 3]], 8, temperature=1.0, top_k=1) == generate(model, [[1, 2, 3]], 8)


def test_generation_stops_at_max_seq_len():
    model = make_model(KINDS["dense_parallel"])  # max_seq_len 24
    out = generate(model, [[1] * 20], 50)
    assert len(out[0]) == 5  # positions 20..23 fed back, the 5th token needs no slot
    assert out == [recompute_greedy(model, [1] * 20, 5)[0]]


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(prompts=[[1] * 25]), "more than the model's max_seq_len 24"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 99]]), "outside the vocabulary"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_generation_inputs(kwargs, message):
    model = make_model(KINDS["dense_parallel"])
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(model, args.pop("prompts"), **args)


def test_forward_refuses_mask_without_cache_and_cache_overflow():
    model = make_model(KINDS["dense_parallel"])
    with pytest.raises(ValueError, match="attention_mask is for cached decoding"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2))
    cache = model.new_cache(1, 3)
    model(torch.tensor([[1, 2]]), cache=cache)
    with pytest.raises(ValueError, match="exceed its max_len 3"):
        model(torch.tensor([[1, 2]]), cache=cache)


# ----- checkpoints and tokenizers -----

BYTE_MODEL = dict(vocab_size=257, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=32)


def test_checkpoint_without_tokenizer_is_a_clear_error(tmp_path):
    config = ModelConfig(**BYTE_MODEL)
    for fingerprint in (None, "bpe-300-abcdef012345"):
        path = save_lightning_checkpoint(tmp_path / "m.ckpt", config, random_dense_state_dict(config, 0),
                                         tokenizer=fingerprint)
        with pytest.raises(ValueError, match=r"m\.ckpt: the checkpoint carries no tokenizer.*--tokenizer"):
            load_for_generation(path)
    with pytest.raises(ValueError, match="trained with tokenizer 'bpe-300-abcdef012345', but --tokenizer byte"):
        load_for_generation(path, tokenizer="byte")
    path = save_lightning_checkpoint(tmp_path / "m.ckpt", config, random_dense_state_dict(config, 0))
    assert isinstance(load_for_generation(path, tokenizer="byte")[1], ByteTokenizer)  # the user's word


def test_tokenizer_travels_in_ckpt_and_beside_safetensors(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n", "The licensee shall not sublicense."] * 20
    bpe = train_bpe(texts, 300, tmp_path / "tokenizer.json")
    config = ModelConfig(**{**BYTE_MODEL, "vocab_size": bpe.vocab_size})
    state = random_dense_state_dict(config, 0)
    ckpt = tmp_path / "ckpt" / "bpe.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "hyper_parameters": {"config": config.to_dict()},
                "bam_lightning": {"tokenizer": bpe.fingerprint,
                                  "tokenizer_files": {"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes().decode()}}},
               ckpt)
    model, tokenizer = load_for_generation(ckpt)
    assert tokenizer.fingerprint == bpe.fingerprint
    assert tokenizer.encode(texts[0]) == bpe.encode(texts[0])
    torch.testing.assert_close(model.state_dict(), state)

    seed = tmp_path / "seed" / "model.safetensors"
    seed.parent.mkdir()
    save_safetensors(state, config, seed, tokenizer=bpe.fingerprint)
    with pytest.raises(ValueError, match="carries no tokenizer"):
        checkpoint_tokenizer(read_checkpoint(seed))
    (seed.parent / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    assert checkpoint_tokenizer(read_checkpoint(seed)).fingerprint == bpe.fingerprint
    with pytest.raises(ValueError, match="trained with tokenizer 'bpe-"):
        checkpoint_tokenizer(read_checkpoint(seed), "byte")
    (seed.parent / "tokenizer.json").rename(tmp_path / "tokenizer.json")  # an imported seed's layout:
    save_file({k: v.contiguous() for k, v in state.items()}, seed.parent / "imported.safetensors",
              metadata={"bam_lightning.config": json.dumps(config.to_dict()), "bam_lightning.tokenizer": bpe.fingerprint,
                        "bam_lightning.tokenizer_dir": ".."})  # as `bam import-hf` writes: the folder it names
    imported = checkpoint_tokenizer(read_checkpoint(seed.parent / "imported.safetensors"))
    assert imported.fingerprint == bpe.fingerprint


def test_bam_generate_command(tmp_path, capsys):
    config = ModelConfig(**BYTE_MODEL, init_std=0.3)
    state = random_dense_state_dict(config, 3)
    path = save_lightning_checkpoint(tmp_path / "m.ckpt", config, state, tokenizer="byte")
    model = GPT(config).eval()
    model.load_state_dict(state)
    tok = ByteTokenizer()
    expected = generate(model, [tok.encode("ab")], 6, eos_id=tok.eos_id)[0]

    main(["--ckpt", str(path), "--prompt", "ab", "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert out.out == "ab" + tok.decode(expected) + "\n"
    assert "new tokens in" in out.err

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps("ab") + "\n" + json.dumps("x\ny") + "\n")
    main(["--ckpt", str(path), "--prompts", str(prompts), "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert f"=== prompt 0 ===\nab{tok.decode(expected)}\n" in out and "=== prompt 1 ===\nx\ny" in out

    for argv, message in [(["--prompt", "x" * 33], "more than the model's max_seq_len 32"),
                          (["--prompt", ""], "prompt 0 is empty"),
                          (["--prompt", "a", "--top-p", "0"], r"top_p must be in \(0, 1\]")]:
        with pytest.raises(SystemExit, match=message):
            main(["--ckpt", str(path), *argv])


def test_trained_checkpoints_carry_their_bpe_tokenizer(tmp_path):
    """DenseLM/MoELM store the BPE's tokenizer.json text, so the .ckpt alone decodes."""
    from types import SimpleNamespace

    from bam_lightning.lit import DenseLM

    bpe = train_bpe(["alpha beta gamma delta"] * 30, 280, tmp_path / "tokenizer.json")
    config = ModelConfig(**{**BYTE_MODEL, "vocab_size": bpe.vocab_size})
    module = DenseLM(config)
    datamodule = SimpleNamespace(vocab_size=bpe.vocab_size, val_domain_names=["a"], val_document_counts={"a": 1},
                                 token_byte_lengths=bpe.token_byte_lengths, seq_len=config.max_seq_len,
                                 tokenizer_fingerprint=bpe.fingerprint, tokenizer=bpe)
    module._trainer = SimpleNamespace(datamodule=datamodule, max_steps=1, global_step=1)
    module.setup("fit")
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
                  "hyper_parameters": {"config": config.to_dict()}}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    (tmp_path / "tokenizer.json").unlink()  # nothing beside the checkpoint: it must carry the text
    _, tokenizer = load_for_generation(tmp_path / "last.ckpt")
    assert tokenizer.fingerprint == bpe.fingerprint
    assert tokenizer.decode(tokenizer.encode("beta gamma")) == "beta gamma"
