"""Tokenizers: raw UTF-8 bytes by default, or a byte-level BPE trained on the training split.

Bytes need no training and no file, so the tiny CPU recipes stay self-contained; BPE trades a
prepare-time training pass for ~3x shorter sequences. Both expose the same small interface, and
a `fingerprint` that the model stores in its checkpoints so that a checkpoint is never silently
evaluated with a different tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bam_lightning.data.hf_tokenizer import (
    TOKENIZER_CONFIG_FILE,
    HFTokenizer,
    copy_hf_tokenizer,
    find_tokenizer_json,
)

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class TextTokenizer(Protocol):
    vocab_size: int
    eos_id: int
    fingerprint: str

    def encode(self, text: str) -> list[int]:
        """A training document's ids, without special tokens (documents are joined by EOS)."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids (generation, evaluation): with the special tokens the tokenizer adds to
        an input (an imported model's BOS); our own tokenizers add none."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_byte_lengths(self) -> np.ndarray: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; id 256 ends a document."""

    vocab_size = 257
    eos_id = 256
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)  # no BOS: documents are separated by EOS only

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # A window cut from the stream can split a character: replace it rather than fail.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for: 1 for a byte, 0 for EOS."""
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eos_id] = 0
        return lengths


class BPETokenizer:
    """A HuggingFace `tokenizers` byte-level BPE loaded from its `tokenizer.json`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tokenizer = Tokenizer.from_file(str(self.path))
        eos_id = self._tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise ValueError(f"{self.path}: tokenizer has no {EOS_TOKEN!r} token")
        self.eos_id: int = eos_id
        self.vocab_size: int = self._tokenizer.get_vocab_size()
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self.fingerprint = f"bpe-{self.vocab_size}-{digest}"

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids  # ours has no post-processor: the same ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The "fast" variant skips character offsets we never use: about twice the speed.
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for (0 for special tokens). A byte-level BPE spells each
        byte as one printable character, so a token's byte count is its string's length."""
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        special = set(self._tokenizer.get_added_tokens_decoder())
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token_id in special:
                continue
            if not set(token) <= alphabet:
                raise ValueError(f"{self.path}: token {token!r} is not byte-level; cannot count its bytes")
            lengths[token_id] = len(token)
        return lengths


def train_bpe(texts: Sequence[str], vocab_size: int, path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on `texts` and save it to `path` (a `tokenizer.json`).

    The 256 byte symbols are always in the vocabulary, so any text encodes, and the vocabulary
    may end up smaller than `vocab_size` when the texts run out of merges.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.save(str(path))
    return BPETokenizer(path)


def build_tokenizer(
    kind: str, train_texts: Sequence[str], bpe_vocab_size: int, out_dir: str | Path
) -> ByteTokenizer | BPETokenizer | HFTokenizer:
    """ "byte" -> `ByteTokenizer`; "bpe" -> a BPE trained on `train_texts`, saved in `out_dir`;
    a tokenizer.json path -> that tokenizer, copied into `out_dir`."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(train_texts, bpe_vocab_size, Path(out_dir) / TOKENIZER_FILE)
    if find_tokenizer_json(kind) is not None:  # a pretrained model's tokenizer (bam import-hf)
        return copy_hf_tokenizer(kind, out_dir)
    raise ValueError(f"tokenizer must be 'byte', 'bpe' or a path to a tokenizer.json, got {kind!r}")


def load_tokenizer(spec: str) -> ByteTokenizer | BPETokenizer | HFTokenizer:
    """ "byte", or the path of a BPE `tokenizer.json` (or of the folder that holds one)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected 'byte' or a tokenizer.json)")
    if path.with_name(TOKENIZER_CONFIG_FILE).is_file():  # a pretrained model's tokenizer, not our BPE
        return HFTokenizer(path)
    return BPETokenizer(path)
