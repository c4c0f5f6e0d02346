"""A pretrained model's own tokenizer (a Hugging Face `tokenizer.json`), for imported seeds.

An imported seed only understands its own vocabulary, so its domains must be tokenized with it:
`data.tokenizer: <path to the tokenizer.json, or the folder holding it>` (what `bam import-hf`
writes beside the checkpoint). Its end-of-sequence token separates documents, as EOS does for
our own tokenizers. The EOS is read from the `tokenizer_config.json` beside the file (Hugging
Face's convention), else from the usual names; it is part of the fingerprint, because the same
vocabulary with another separator makes different training data.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
METASPACE = "\u2581"  # SentencePiece's visible space, "▁"
BYTE_FALLBACK_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
FALLBACK_EOS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def eos_token_of(tokenizer_json: Path) -> str | None:
    """The EOS token's text from the `tokenizer_config.json` beside `tokenizer_json`, if any."""
    config_path = tokenizer_json.with_name(TOKENIZER_CONFIG_FILE)
    if not config_path.is_file():
        return None
    token = json.loads(config_path.read_text()).get("eos_token")
    if isinstance(token, dict):  # older files store an AddedToken
        token = token.get("content")
    return token if isinstance(token, str) else None


class HFTokenizer:
    """A `tokenizers` tokenizer loaded from a pretrained model's `tokenizer.json`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({error})") from error
        named = eos_token_of(self.path)
        candidates = [named] if named else list(FALLBACK_EOS)
        ids = [self._tokenizer.token_to_id(token) for token in candidates]
        found = [(token, i) for token, i in zip(candidates, ids, strict=True) if i is not None]
        if not found:
            where = (f"its eos_token {named!r} (from {self.path.with_name(TOKENIZER_CONFIG_FILE)})" if named
                     else f"any of {list(FALLBACK_EOS)}")
            raise ValueError(f"{self.path}: the vocabulary has no end-of-sequence token: {where}")
        self.eos_token, self.eos_id = found[0]
        self.vocab_size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        digest = hashlib.sha256(self.path.read_bytes() + f"\neos={self.eos_token}".encode()).hexdigest()[:12]
        self.fingerprint = f"hf-{self.vocab_size}-{digest}"

    def encode(self, text: str) -> list[int]:
        """A training document's ids: no BOS/EOS template, documents are joined by EOS ourselves."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids (generation, evaluation) with the special tokens the tokenizer.json's
        post-processor adds (Llama, Mistral, TinyLlama: a leading BOS), as transformers gives them:
        the model was trained to read text that way."""
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token id stands for (0 for special tokens), for per-byte metrics.

        Counted from the token's spelling, never by decoding it alone (a lone byte-fallback
        piece or a partial character decodes to a 3-byte U+FFFD; a lone `▁word` loses its space):
        - byte-level BPE (GPT-2, SmolLM2): one character per byte;
        - SentencePiece style (`▁` metaspace, byte fallback; Llama-2, Mistral): `<0xNN>` is one
          byte, `▁` is the one space it stands for, anything else its UTF-8 bytes. A tokenizer
          that prepends `▁` to a text counts that space too: a document counts one byte more than
          its UTF-8 length, a 1/len(document) bias;
        - anything else: the token decoded on its own."""
        spec = json.loads(self._tokenizer.to_str())
        decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
        byte_level = "ByteLevel" in decoder
        metaspace = METASPACE in decoder
        byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        special = {i for i, token in self._tokenizer.get_added_tokens_decoder().items() if token.special}
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        lengths = []
        for token_id in range(self.vocab_size):
            token = self._tokenizer.id_to_token(token_id)
            if token_id in special or token is None:
                lengths.append(0)
            elif byte_level and set(token) <= alphabet:
                lengths.append(len(token))
            elif byte_fallback and BYTE_FALLBACK_PIECE.fullmatch(token):
                lengths.append(1)
            elif metaspace:
                lengths.append(len(token.replace(METASPACE, " ").encode("utf-8")))
            else:
                lengths.append(len(self._tokenizer.decode([token_id]).encode("utf-8")))
        return np.asarray(lengths, dtype=np.int64)  # like every tokenizer's: the model indexes it


def find_tokenizer_json(spec: str | Path) -> Path | None:
    """The `tokenizer.json` named by `spec` (the file, or a folder holding one), else None."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    return path if path.is_file() else None


def copy_hf_tokenizer(spec: str | Path, out_dir: str | Path) -> HFTokenizer:
    """Copy the tokenizer named by `spec` into `out_dir` (prepared data carries its tokenizer),
    with its EOS spelled out in tokenizer_config.json; the fingerprint stays the source's."""
    source_path = find_tokenizer_json(spec)
    if source_path is None:
        raise FileNotFoundError(f"tokenizer {spec}: no tokenizer.json there")
    source = HFTokenizer(source_path)
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_bytes(source_path.read_bytes())
    (out_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps({"eos_token": source.eos_token}))
    return HFTokenizer(out_dir / "tokenizer.json")
