"""Tokenizers of imported models: bytes per token (bits-per-byte) and the special tokens of prompts.

The tokenizers are built here with the `tokenizers` library (no download): a GPT-2-style
byte-level BPE and a SentencePiece-style BPE (`▁` metaspace, `<0xNN>` byte fallback, as in
Llama-2 and Mistral)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import random_dense_state_dict, tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bam_lightning.data.hf_tokenizer import HFTokenizer
from bam_lightning.data.tokenizer import ByteTokenizer, train_bpe
from bam_lightning.generate import generate
from bam_lightning.model import GPT

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


# ----- prompts get the tokenizer's special tokens; training documents do not -----

def with_bos_template(path) -> HFTokenizer:
    """A Llama-style tokenizer.json whose post-processor prepends `<s>` to every input."""
    sentencepiece_style(path, "first")
    tokenizer = Tokenizer.from_file(str(path))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.save(str(path))
    return HFTokenizer(path)


def test_prompts_get_the_bos_transformers_gives_and_documents_do_not(tmp_path):
    tokenizer = with_bos_template(tmp_path / "tokenizer.json")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    bos = tokenizer._tokenizer.token_to_id("<s>")
    for text in TEXTS:
        expected = reference(text)["input_ids"]
        assert expected[0] == bos and tokenizer.encode_prompt(text) == expected
        assert tokenizer.encode(text) == expected[1:]  # a training document: EOS separates, no BOS
        assert tokenizer.encode_batch([text]) == [expected[1:]]
    for ours in (ByteTokenizer(), train_bpe(SENTENCES, 300, tmp_path / "ours.json")):  # no template
        assert ours.encode_prompt("the cat") == ours.encode("the cat")


def test_bam_generate_feeds_the_prompt_with_its_bos(tmp_path):
    tokenizer = with_bos_template(tmp_path / "tokenizer.json")
    config = tiny_config(vocab_size=tokenizer.vocab_size, max_seq_len=32, init_std=0.3)
    state = random_dense_state_dict(config, 5)
    model = GPT(config).eval()
    model.load_state_dict(state)
    files = {name: (tmp_path / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "hyper_parameters": {"config": config.to_dict()},
                "bam_lightning": {"tokenizer": tokenizer.fingerprint, "tokenizer_files": files}}, path)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    prompts = ["the cat sat", "a dog"]
    with_bos = [tokenizer.decode(ids) for ids in generate(
        model, [reference(text)["input_ids"] for text in prompts], 8, eos_id=tokenizer.eos_id)]
    without = [tokenizer.decode(ids) for ids in generate(
        model, [tokenizer.encode(text) for text in prompts], 8, eos_id=tokenizer.eos_id)]
    assert with_bos != without  # the test can tell them apart
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    done = subprocess.run([str(Path(sys.executable).with_name("bam")), "generate", "--ckpt", str(path), "--prompts",
                           str(tmp_path / "prompts.txt"), "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(f"=== prompt {i} ===\n{text}{new}\n"
                                  for i, (text, new) in enumerate(zip(prompts, with_bos, strict=True)))
