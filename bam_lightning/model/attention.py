"""Causal multi-head attention as a bank of E experts (E = 1 is the dense attention).

Weights are stacked with a leading expert dimension, so dense model j's tensors are expert
slice j. Every expert attends with its own queries (and, for Expert-KV, its own keys and values)
at the same RoPE positions; keys are never mixed across experts inside one softmax. The soft gate
g_e(token) weights each expert's output after its own output projection:

    Attn_moa(h) = sum_e g_e(h) * W_o,e MHA_e(h)

which equals one matrix product over the concatenated expert outputs, [g_1 o_1 ... g_E o_E] @
[W_o,1 ... W_o,E]^T, so the whole bank runs as a few large GEMMs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bam_lightning.config import ModelConfig
from bam_lightning.model.layers import (
    RouterStats,
    apply_rope,
    config_rope_tables,
    init_router,
    router_probs,
)
from bam_lightning.model.short_attention import causal_attention


class MixtureOfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        e_q, e_kv = config.n_attn_banks, config.n_kv_banks
        d, hd = config.d_model, config.head_dim
        self.wq = nn.Parameter(torch.empty(e_q, config.n_head * hd, d))
        self.wk = nn.Parameter(torch.empty(e_kv, config.n_kv_head * hd, d))
        self.wv = nn.Parameter(torch.empty(e_kv, config.n_kv_head * hd, d))
        self.wo = nn.Parameter(torch.empty(e_q, d, config.n_head * hd))
        self.router = nn.Linear(d, config.attn_experts, bias=False) if config.attn_experts else None
        # Other families' extras, per expert like the weights (absent by default): biases
        # (Qwen2, GPT-NeoX) and per-head RMSNorm weights on q and k (Qwen3).
        self.bq = nn.Parameter(torch.empty(e_q, config.n_head * hd)) if config.qkv_bias else None
        self.bk = nn.Parameter(torch.empty(e_kv, config.n_kv_head * hd)) if config.qkv_bias else None
        self.bv = nn.Parameter(torch.empty(e_kv, config.n_kv_head * hd)) if config.qkv_bias else None
        self.bo = nn.Parameter(torch.empty(e_q, d)) if config.attn_out_bias else None
        self.q_norm = nn.Parameter(torch.empty(e_q, hd)) if config.qk_norm else None
        self.k_norm = nn.Parameter(torch.empty(e_kv, hd)) if config.qk_norm else None

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for w in (self.wq, self.wk, self.wv):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.wo, std=std / math.sqrt(2 * self.config.n_layer))
        if self.router is not None:
            init_router(self.router, self.config)
        for bias in (self.bq, self.bk, self.bv, self.bo):
            if bias is not None:
                nn.init.zeros_(bias)
        for weight in (self.q_norm, self.k_norm):
            if weight is not None:
                nn.init.ones_(weight)

    def gates(self, h: torch.Tensor) -> torch.Tensor | None:
        """[B, T, E] gates from the query token only; None for a dense attention."""
        if self.router is None:
            return None
        _, probs = router_probs(self.router, h)
        if self.config.attn_routing == "top_k":  # the paper's ablation: keep k, renormalise
            top, idx = probs.topk(self.config.attn_top_k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return probs

    def bank_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_q [E*H*hd, d] and W_o [d, E*H*hd] with the heads in the bank's order."""
        E, d, H, hd = self.wq.shape[0], self.config.d_model, self.config.n_head, self.config.head_dim
        # The bank is one wide multi-head attention with E * H query heads, laid out exactly like
        # a dense one: every projection is one GEMM and [B, T, heads, hd] -> [B, heads, T, hd] is
        # a free transpose. Expert-KV orders the heads (expert, head), so expert e's query heads
        # meet its own K/V heads. Shared-KV orders them (head, expert), so that grouped-query
        # attention maps every expert's head h onto the shared K/V head of h; reordering the
        # (small) weights costs less than reordering the activations.
        wq, wo = self.wq, self.wo.view(E, d, H, hd)
        if self.wk.shape[0] < E:  # Shared-KV
            wq, wo = wq.view(E, H, hd, d).transpose(0, 1), wo.permute(1, 2, 0, 3)  # (head, expert)
        else:
            wo = wo.permute(1, 0, 2, 3)  # (expert, head)
        # a copy where the order changes (E > 1): decoding keeps it in the cache, built once
        return wq.reshape(E * H * hd, d), wo.reshape(d, E * H * hd)

    def bank_extras(self) -> dict[str, torch.Tensor]:
        """The q/k/v biases [heads * hd] and q/k norm weights [heads, 1, hd] that exist, in the
        bank's head order (see `bank_weights`)."""
        E, H, H_kv, hd = self.wq.shape[0], self.config.n_head, self.config.n_kv_head, self.config.head_dim
        shared_kv = self.wk.shape[0] < E
        extras = {}
        if self.bq is not None:
            bq = self.bq.view(E, H, hd).transpose(0, 1) if shared_kv else self.bq
            extras.update(bq=bq.reshape(-1), bk=self.bk.reshape(-1), bv=self.bv.reshape(-1))
        if self.q_norm is not None:
            q_norm = self.q_norm.repeat(H, 1) if shared_kv else self.q_norm.repeat_interleave(H, dim=0)
            extras.update(q_norm=q_norm[:, None], k_norm=self.k_norm.repeat_interleave(H_kv, dim=0)[:, None])
        return extras

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first `rotary_dim` dims of each head (all of them by default)."""
        r = self.config.rotary_dim
        if r == x.shape[-1]:
            return apply_rope(x, cos, sin)
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> tuple[torch.Tensor, RouterStats]:
        """`cache`: decoding (see `GPT.forward`); h holds the new tokens only, their K/V go into
        the cache's slots for `layer` and the queries read every cached position."""
        cfg = self.config
        B, T, d = h.shape
        E, E_kv, H, H_kv, hd = self.wq.shape[0], self.wk.shape[0], cfg.n_head, cfg.n_kv_head, cfg.head_dim
        shared_kv = E_kv < E
        wq, wo = self.bank_weights() if cache is None else cache.constant(("attn", layer), self.bank_weights)
        extras = {} if self.bq is None and self.q_norm is None else (
            self.bank_extras() if cache is None else cache.constant(("attn_extras", layer), self.bank_extras))
        q = _project(h, wq, extras.get("bq")).view(B, T, E * H, hd).transpose(1, 2)
        k = _project(h, self.wk.reshape(E_kv * H_kv * hd, d), extras.get("bk")).view(B, T, E_kv * H_kv, hd)
        v = _project(h, self.wv.reshape(E_kv * H_kv * hd, d), extras.get("bv")).view(B, T, E_kv * H_kv, hd)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if "q_norm" in extras:  # Qwen3: RMSNorm over each head's dims, before RoPE
            q = F.rms_norm(q, (hd,), eps=cfg.norm_eps) * extras["q_norm"]
            k = F.rms_norm(k, (hd,), eps=cfg.norm_eps) * extras["k_norm"]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if cache is not None:
            o = cache.attend(layer, q, k, v)
        elif cfg.sliding_window is not None and T > cfg.sliding_window:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, cfg.sliding_window, h.device),
                                               enable_gqa=E * H != E_kv * H_kv)
        else:
            o = causal_attention(q, k, v)
        gates = self.gates(h)
        stats = RouterStats()
        if gates is None:
            o = o.transpose(1, 2).reshape(B, T, E * H * hd)
        else:
            o = _GatedHeads.apply(o, gates.to(o.dtype), E, not shared_kv)
            stats.attn_gate_mean = gates.detach().mean(dim=(0, 1))
        # sum_e W_o,e (g_e o_e) as one GEMM over the concatenated expert outputs.
        out = o @ wo.T
        if self.bo is not None:  # sum_e g_e b_o,e
            out = out + (self.bo[0] if gates is None else gates.to(out.dtype) @ self.bo)
        return out, stats


def _project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h @ weight.T if bias is None else F.linear(h, weight, bias)


def window_mask(T: int, window: int, device) -> torch.Tensor:
    """[T, T] booleans: query i sees keys j with i - window < j <= i (Mistral's sliding window)."""
    offset = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]
    return (offset >= 0) & (offset < window)


class _GatedHeads(torch.autograd.Function):
    """SDPA's output [B, heads, T, hd] -> [B, T, heads * hd] with each expert's heads scaled by its
    gate [B, T, E], in one pass. Written as transpose, reshape and multiply, autograd copies the
    output once to reshape it, again to scale it, and keeps the copy for the backward; here the
    scaling writes the [B, T, ...] layout directly and the backward reuses the SDPA output that
    attention keeps anyway. A throwaway A/B measured 0.97-0.98x the three-op version's
    attention-bank fwd+bwd (E 4; issue 5's note).
    Heads are ordered (expert, head) when `expert_major`, else (head, expert) (Shared-KV)."""

    @staticmethod
    def _views(o: torch.Tensor, g: torch.Tensor, experts: int, expert_major: bool):
        B, heads, T, hd = o.shape
        o = o.transpose(1, 2)  # [B, T, heads, hd], a view
        if expert_major:
            return o.view(B, T, experts, heads // experts, hd), g.view(B, T, experts, 1, 1), (3, 4)
        return o.view(B, T, heads // experts, experts, hd), g.view(B, T, 1, experts, 1), (2, 4)

    @staticmethod
    def forward(ctx, o: torch.Tensor, g: torch.Tensor, experts: int, expert_major: bool) -> torch.Tensor:
        o5, g5, _ = _GatedHeads._views(o, g, experts, expert_major)
        out = torch.empty(o5.shape, dtype=torch.result_type(o, g), device=o.device)
        torch.mul(o5, g5, out=out)
        ctx.save_for_backward(o, g)
        ctx.experts, ctx.expert_major = experts, expert_major
        return out.flatten(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        o, g = ctx.saved_tensors
        o5, g5, head_dims = _GatedHeads._views(o, g, ctx.experts, ctx.expert_major)
        grad5 = grad.view(o5.shape)
        B, heads, T, hd = o.shape
        grad_o = (grad5 * g5).view(B, T, heads, hd).transpose(1, 2)
        grad_g = (grad5 * o5).sum(head_dims) if ctx.needs_input_grad[1] else None
        return grad_o, grad_g, None, None


class KVCache:
    """Preallocated keys and values of every layer, for decoding one token at a time.

    Layer l's keys are one tensor [B, kv_heads, max_len, head_dim], written in place (no
    per-token concatenation); kv_heads is E * n_kv_head for Expert-KV (every attention expert
    keeps its own keys) and n_kv_head for Shared-KV and dense attention, so Shared-KV's cache is
    exactly 1/E of Expert-KV's. Columns are shared by the batch: a left-padded batch marks its
    padding in `mask` and each row's RoPE positions count only its real tokens, so every row
    sees exactly what it would see alone. Build with `GPT.new_cache`.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, padding: int = 0):
        # `padding`: columns beyond max_seq_len for a left-padded batch, whose short rows may run
        # past the longest row's end; each row's own positions stay below max_seq_len (generate).
        if not 1 <= max_len <= config.max_seq_len + padding:
            raise ValueError(f"KVCache: max_len {max_len} must be between 1 and max_seq_len {config.max_seq_len}"
                             + (f" + padding {padding}" if padding else ""))
        if batch_size < 1:
            raise ValueError(f"KVCache: batch_size must be positive, got {batch_size}")
        shape = (batch_size, config.n_kv_banks * config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # real token?
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)  # per row
        # RoPE tables for every position, built as the training forward builds them (same values)
        self.cos, self.sin = config_rope_tables(config, max_len, device, dtype)
        self.window = config.sliding_window
        # each column's RoPE position (per row), for the sliding window
        self.column_position = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.max_len, self.length, self.padded = max_len, 0, False
        self._start, self._attn_mask, self._causal = 0, None, False
        self._gqa = config.n_attn_banks * config.n_head != shape[1]
        self._constants: dict = {}  # per-layer values that depend only on the weights

    def constant(self, key, make):
        """`make()` once per cache: weights do not change while a cache decodes."""
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = make()
        return value

    def bytes(self) -> int:
        """Bytes held by the keys and values (the mask and RoPE tables are negligible)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def bytes_per_token(self) -> int:
        """Cache bytes one token position costs, per sequence."""
        return self.bytes() // (self.keys[0].shape[0] * self.max_len)

    def advance(self, idx: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Claim columns for the new tokens `idx` [B, T]; returns their RoPE tables.

        `attention_mask` [B, T] (1 = token, 0 = left padding) is needed only for a padded prefill;
        without it every new token is real. Positions start at each row's first real token.
        """
        B, T = idx.shape
        start = self.length
        if B != self.mask.shape[0]:
            raise ValueError(f"KVCache: built for batch {self.mask.shape[0]}, got {B} rows")
        if start + T > self.max_len:
            raise ValueError(f"KVCache: {start} cached + {T} new tokens exceed its max_len {self.max_len}")
        if attention_mask is not None:
            real = attention_mask.to(device=self.mask.device, dtype=torch.bool)
            if real.shape != idx.shape:
                raise ValueError(f"attention_mask shape {tuple(real.shape)} != tokens {tuple(idx.shape)}")
            self.padded = self.padded or not bool(real.all())
        self.length, self._start = start + T, start
        if not self.padded:  # every row has the same positions: views, no new tensors
            self.mask[:, start:start + T] = True
            self.next_position += T
            self._attn_mask, self._causal = None, start == 0 and T > 1
            if T > 1 and start > 0:  # a second chunk of a prompt: causal within, all before
                self._attn_mask = self._causal_mask(start, T)
            if self.window is not None:
                self._apply_window(torch.arange(start, start + T, device=self.mask.device).expand(B, T), start, T)
            return self.cos[start:start + T], self.sin[start:start + T]
        if attention_mask is None:  # decoding after a padded prefill: every new token is real
            self.mask[:, start:start + T] = True
            positions = self.next_position[:, None] + torch.arange(T, device=idx.device)
            self.next_position += T
        else:
            self.mask[:, start:start + T] = real
            positions = (self.next_position[:, None] + real.cumsum(1) - 1).clamp(min=0)
            self.next_position += real.sum(1)
        self._causal = False
        if T == 1:  # a view: the row's real columns so far
            self._attn_mask = self.mask[:, None, None, :start + 1]
        else:  # a padding query sees only itself: finite values nobody reads, instead of a NaN row
            self._attn_mask = ((self._causal_mask(start, T) & self.mask[:, None, None, :start + T])
                               | self._causal_mask(start, T, diagonal_only=True))
        if self.window is not None:
            self._apply_window(positions, start, T)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Row i becomes the old row `rows[i]` (rows may repeat): one prefilled context continued
        several ways (scoring the choices of a question) without recomputing it."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.mask = self.mask.index_select(0, rows)
        self.next_position = self.next_position.index_select(0, rows)
        self.column_position = self.column_position.index_select(0, rows)

    def _apply_window(self, positions: torch.Tensor, start: int, T: int) -> None:
        """Restrict the mask to the last `window` positions of each row (columns of padding rows
        count no positions, so a padded row sees what it would see alone)."""
        self.column_position[:, start:start + T] = positions
        if start + T <= self.window:  # every column is inside the window
            return
        mask = self._attn_mask
        if mask is None:
            mask = self._causal_mask(start, T)[None, None] if T > 1 else torch.ones(
                1, 1, 1, start + T, dtype=torch.bool, device=self.mask.device)
        columns = self.column_position[:, None, None, :start + T]
        inside = columns > positions[:, None, :, None] - self.window
        diagonal = self._causal_mask(start, T, diagonal_only=True)
        self._attn_mask, self._causal = (mask & inside) | diagonal, False

    def _causal_mask(self, start: int, T: int, diagonal_only: bool = False) -> torch.Tensor:
        """[T, start + T]: query t (column start + t) sees columns <= start + t (or only its own)."""
        columns = torch.arange(start + T, device=self.mask.device)
        if diagonal_only:
            return columns[None, :] == columns[start:, None]
        return columns[None, :] <= columns[start:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k, v [B, kv_heads, T, hd] in `layer`'s slots and attend over all
        cached columns."""
        start, end = self._start, self.length
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=self._attn_mask,
                                              is_causal=self._causal, enable_gqa=self._gqa)
