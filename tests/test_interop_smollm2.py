"""The real pretrained reference: SmolLM2-135M-Instruct (Q4_1 GGUF) imported by us vs transformers
(the GGUF and both loads come from conftest.py's session fixtures)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def imported(smollm2_seed):
    from bam_lightning.checkpoint import read_checkpoint
    from bam_lightning.data.hf_tokenizer import HFTokenizer
    from bam_lightning.model import GPT

    checkpoint = read_checkpoint(smollm2_seed)
    model = GPT(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state_dict)
    tokenizer = HFTokenizer(smollm2_seed.with_name("smollm2.tokenizer") / "tokenizer.json")
    return checkpoint, model, tokenizer


def test_imported_config_is_smollm2(imported):
    checkpoint, _, tokenizer = imported
    c = checkpoint.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert (c.rope_base, c.tie_embeddings, c.block_layout) == (100000.0, True, "sequential")
    assert checkpoint.tokenizer == tokenizer.fingerprint and tokenizer.eos_id == 2  # <|im_end|>


def test_logits_and_greedy_tokens_equal_transformers_on_the_same_gguf(imported, smollm2_transformers):
    _, ours, tokenizer = imported
    reference, _ = smollm2_transformers
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert (ours(prompt)[0] - reference(prompt).logits).abs().max().item() <= 1e-3
        theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False)
        sequence = prompt
        for _ in range(20):
            sequence = torch.cat([sequence, ours(sequence)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sequence, theirs)  # 100% greedy agreement over 20 tokens
    assert tokenizer.decode(sequence[0, prompt.shape[1]:].tolist()).startswith(" Paris")


def test_token_byte_lengths_add_up_to_the_text(imported):
    _, _, tokenizer = imported
    lengths = tokenizer.token_byte_lengths()
    assert len(lengths) == tokenizer.vocab_size and lengths[tokenizer.eos_id] == 0
    for text in ("def f(x):\n    return x ** 2\n", "Ünïcödé — 東京 and emoji 🙂 split into bytes"):
        assert sum(lengths[i] for i in tokenizer.encode(text)) == len(text.encode("utf-8"))
