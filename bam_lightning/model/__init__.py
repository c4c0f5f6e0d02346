"""Shared layer code for dense seeds and their mixtures."""

from bam_lightning.model.attention import MixtureOfAttention
from bam_lightning.model.ffn import MixtureOfFFN
from bam_lightning.model.gpt import GPT, Block
from bam_lightning.model.layers import RouterStats

__all__ = ["GPT", "Block", "MixtureOfAttention", "MixtureOfFFN", "RouterStats"]
