"""Tokenizers of imported models: bytes per token (bits-per-byte) and the special tokens of prompts.

The tokenizers are built here with the `tokenizers` library (no download): a GPT-2-style
byte-level BPE and a SentencePiece-style BPE (`▁` metaspace, `<0xNN>` byte fallback, as in
Llama-2 and Mistral)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bam_lightning.data.hf_tokenizer import HFTokenizer
from bam_lightning.data.tokenizer import ByteTokenizer, train_bpe

SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "on the mat the cat sat"] * 5
TEXTS = ["the cat sat on the mat", "the café", "東京の猫 🙂 sat", "naïve — 😀😀 end\n"]


def sentencepiece_style(path, prepend_scheme: str) -> HFTokenizer:
    """A Llama-2-like tokenizer.json: BPE over `▁`-marked words, unknown characters as UTF-8 bytes."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    vocab.update({f"<0x{byte:02X}>": first + byte for byte in range(256)})  # byte fallback pieces
    spec["model"]["byte_fallback"] = True
    path.write_text(json.dumps(spec, ensure_ascii=False))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return HFTokenizer(path)


def byte_level(path) -> HFTokenizer:
    """A GPT-2 / SmolLM2-style byte-level BPE, loaded as an imported model's tokenizer."""
    train_bpe(SENTENCES, 300, path)
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return HFTokenizer(path)


def counted_bytes(tokenizer, text: str) -> int:
    lengths = tokenizer.token_byte_lengths()
    assert len(lengths) == tokenizer.vocab_size and lengths[tokenizer.eos_id] == 0
    return int(sum(lengths[i] for i in tokenizer.encode(text)))


@pytest.mark.parametrize("text", TEXTS)
def test_byte_and_byte_level_tokens_add_up_to_the_utf8_length(tmp_path, text):
    assert counted_bytes(ByteTokenizer(), text) == len(text.encode("utf-8"))
    assert counted_bytes(train_bpe(SENTENCES, 300, tmp_path / "ours.json"), text) == len(text.encode("utf-8"))
    (tmp_path / "hf").mkdir()
    assert counted_bytes(byte_level(tmp_path / "hf" / "tokenizer.json"), text) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_tokens_add_up_to_the_utf8_length(tmp_path, text):
    """`▁` counts as the one space it stands for and `<0xNN>` as one byte. With prepend_scheme
    "never" the sum is the text's UTF-8 length; a tokenizer that prepends `▁` to the text (Llama-2,
    Mistral: "first"/"always") counts that space too, one byte per text that does not start with one."""
    never = sentencepiece_style(tmp_path / "tokenizer.json", "never")
    assert any(token.startswith("<0x") for token in never._tokenizer.encode(text).tokens) == (not text.isascii())
    assert counted_bytes(never, text) == len(text.encode("utf-8"))
    for scheme in ("first", "always"):
        prepending = sentencepiece_style(tmp_path / "tokenizer.json", scheme)
        assert prepending._tokenizer.encode(text).tokens[0].startswith("▁")
        assert counted_bytes(prepending, text) == len(text.encode("utf-8")) + 1
        assert counted_bytes(prepending, " " + text) == len((" " + text).encode("utf-8"))
