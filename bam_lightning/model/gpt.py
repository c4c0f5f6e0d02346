"""The GPT: one class for the dense seed and every mixture built from it.

Parallel block (GPT-J / PaLM, the paper's seeds): h = Norm(x); y = x + Attn(h) + FFN(h).
Sequential block (Llama family, for imported seeds): y = x + Attn(N1(x)); y = y + FFN(N2(y)).
Parallel block with two norms (GPT-NeoX / Pythia, `parallel_ffn_norm`): y = x + Attn(N1(x)) + FFN(N2(x)).

Decoding uses the same forward with a `KVCache` (see `GPT.forward`): prefill the prompt, then one
token per call. Training never passes a cache and runs exactly the code it always ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bam_lightning.config import ModelConfig
from bam_lightning.model.attention import KVCache, MixtureOfAttention
from bam_lightning.model.ffn import MixtureOfFFN
from bam_lightning.model.layers import RouterStats, config_rope_tables, make_norm


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.parallel = config.block_layout == "parallel"
        self.norm = make_norm(config)
        self.norm_ffn = make_norm(config) if not self.parallel or config.parallel_ffn_norm else None
        self.attn = MixtureOfAttention(config)
        self.ffn = MixtureOfFFN(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> tuple[torch.Tensor, RouterStats]:
        h = self.norm(x)
        attn_out, attn_stats = self.attn(h, cos, sin, cache, layer)
        if self.parallel:
            ffn_out, stats = self.ffn(h if self.norm_ffn is None else self.norm_ffn(x))
            y = x + attn_out + ffn_out
        else:
            x = x + attn_out
            ffn_out, stats = self.ffn(self.norm_ffn(x))
            y = x + ffn_out
        stats.attn_gate_mean = attn_stats.attn_gate_mean
        return y, stats


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.activation_checkpointing = False  # recompute each block in backward: memory for time
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh initialisation (upcycling overwrites it from the dense checkpoints)."""
        nn.init.normal_(self.tok_emb.weight, std=self.config.init_std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=self.config.init_std)
        for module in self.modules():
            if isinstance(module, (MixtureOfAttention, MixtureOfFFN)):
                module.reset_parameters()
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
                module.reset_parameters()

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, list[RouterStats]]:
        """Logits [B, T, V] and each layer's router statistics (empty stats for dense layers).

        Training and scoring: `forward(idx)`, idx [B, T] from position 0, causal.
        Decoding: `forward(idx, cache=cache)` with `cache = model.new_cache(B, max_len)`: idx holds
        only the tokens after those already cached (the prompt, then one token per call); their
        keys and values are appended to the cache and the logits are theirs. A left-padded prompt
        batch passes `attention_mask` [B, T] (1 token, 0 padding) with its prefill; RoPE
        positions then start at each row's first real token, so a row decodes as it would alone.
        `last_only`: logits of the last position only ([B, 1, V]), all a sampler needs.
        """
        B, T = idx.shape
        if cache is None:
            if attention_mask is not None:
                raise ValueError("attention_mask is for cached decoding: pass cache=model.new_cache(...)")
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
            x = self.tok_emb(idx)
            cos, sin = config_rope_tables(self.config, T, x.device, x.dtype)
        else:
            cos, sin = cache.advance(idx, attention_mask)
            x = self.tok_emb(idx)
        layer_stats = []
        for layer, block in enumerate(self.blocks):
            if cache is not None:
                x, stats = block(x, cos, sin, cache, layer)
            elif self.activation_checkpointing and self.training:
                x, stats = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin)
            layer_stats.append(stats)
        if last_only:
            x = x[:, -1:]
        x = self.norm_f(x)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head), layer_stats

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  padding: int = 0) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` (default max_seq_len)
        tokens, in the weights' dtype and on their device; `padding` allows max_len up to
        max_seq_len + padding for the left padding of a batch of prompts of different lengths."""
        weight = self.tok_emb.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, dtype or weight.dtype,
                       weight.device, padding)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
