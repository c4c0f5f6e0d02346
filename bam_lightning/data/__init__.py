"""Offline multi-domain data: built-in corpora, user files, tokenizers, the Lightning DataModule."""

from bam_lightning.data.corpora import (
    BUILTIN_DOMAINS,
    SOURCES,
    builtin_documents,
    default_cache_dir,
    load_documents,
)
from bam_lightning.data.datamodule import BAMDataModule
from bam_lightning.data.math_gen import generate_math_documents
from bam_lightning.data.prepare import split_indices
from bam_lightning.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BAMDataModule",
    "BPETokenizer",
    "BUILTIN_DOMAINS",
    "ByteTokenizer",
    "SOURCES",
    "build_tokenizer",
    "builtin_documents",
    "default_cache_dir",
    "generate_math_documents",
    "load_documents",
    "load_tokenizer",
    "split_indices",
    "train_bpe",
]
