"""A BAM (Branch-Attend-Mix) or BTX mixture exported by bam_lightning, for transformers.

Load with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. The parameter
names and layouts are bam_lightning's own (`blocks.N.attn.wq` is [experts, heads * head_dim,
d_model], ...), so the exported weights are the training checkpoint's tensors unchanged.

- Attention experts (BAM): every expert attends with its own queries (Expert-KV: and its own keys
  and values; Shared-KV: one shared K/V projection) at the same RoPE positions; a soft gate from
  the query token weights each expert's output after its own output projection.
- FFN experts: softmax over all experts, top-k, optionally renormalised, times ffn_gate_scale.
- Block: parallel (x + Attn(N(x)) + FFN(N(x)); GPT-NeoX: x + Attn(N1(x)) + FFN(N2(x))) or
  sequential (Llama-style).
- Other families' fields travel with the experts: q/k/v/o biases (Qwen2, GPT-NeoX), per-head q/k
  RMSNorm (Qwen3), partial rotary (GPT-NeoX), RoPE scaling (Llama 3.x), a sliding window (Mistral),
  a 2-layer GELU MLP with biases and LayerNorm with bias (GPT-NeoX).
- Generation: transformers' cache stores each layer's keys/values (Expert-KV: experts x KV heads);
  positions and the causal-plus-padding mask come from `attention_mask`, so left-padded batches
  give each row the result it gets alone.
Needs only torch and transformers; written for clarity over speed (experts run in a loop).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_bam import BamConfig

# the cache's name in model outputs and generation inputs: `cache` from transformers 5.x on
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=getattr(config, "norm_bias", False))


def _inv_freq(config, device):
    """RoPE frequencies of the rotated dims, with the config's scaling: `linear` divides all by
    factor, `llama3` only the low-frequency band (smoothly towards the high band, which is
    kept), `factors` divides frequency i by factors[i] (llama.cpp's rope_freqs)."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    scaling = getattr(config, "rope_scaling_bam", None)
    if not scaling:
        return inv_freq
    if scaling["type"] == "factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device=device)
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    context, low, high = scaling["original_max_position_embeddings"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = ((context * inv_freq / (2 * torch.pi) - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / scaling["factor"] + smooth * inv_freq


def _rope_tables(position_ids, config):
    """cos/sin [B, 1, T, rotary_dim/2] for the given positions, computed in float32 each call
    (buffers are not restored by from_pretrained)."""
    angles = position_ids.to(torch.float32)[..., None] * _inv_freq(config, position_ids.device)
    return angles.cos()[:, None], angles.sin()[:, None]


def _rotate(x, cos, sin):
    """RoPE on (first half, second half) pairs of the first rotary dims; x [B, heads, T, head_dim]."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _router_probs(router, h):
    """Softmax over all experts, in float32 whatever the model's dtype."""
    return F.linear(h.float(), router.weight.float()).softmax(dim=-1)


class BamAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        experts = max(1, config.attn_experts)
        kv_experts = 1 if config.attn_shared_kv else experts
        d, hd = config.d_model, config.head_dim
        self.wq = nn.Parameter(torch.empty(experts, config.n_head * hd, d))
        self.wk = nn.Parameter(torch.empty(kv_experts, config.n_kv_head * hd, d))
        self.wv = nn.Parameter(torch.empty(kv_experts, config.n_kv_head * hd, d))
        self.wo = nn.Parameter(torch.empty(experts, d, config.n_head * hd))
        self.router = nn.Linear(d, config.attn_experts, bias=False) if config.attn_experts else None
        bias, norm = getattr(config, "qkv_bias", False), getattr(config, "qk_norm", False)
        self.bq = nn.Parameter(torch.empty(experts, config.n_head * hd)) if bias else None
        self.bk = nn.Parameter(torch.empty(kv_experts, config.n_kv_head * hd)) if bias else None
        self.bv = nn.Parameter(torch.empty(kv_experts, config.n_kv_head * hd)) if bias else None
        self.bo = nn.Parameter(torch.empty(experts, d)) if getattr(config, "attn_out_bias", False) else None
        self.q_norm = nn.Parameter(torch.empty(experts, hd)) if norm else None
        self.k_norm = nn.Parameter(torch.empty(kv_experts, hd)) if norm else None

    def forward(self, h, cos, sin, mask, cache):
        cfg = self.config
        B, T, d = h.shape
        E, E_kv = self.wq.shape[0], self.wk.shape[0]
        H, H_kv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim

        def heads(weight, bias, norm, count):
            """[B, experts * count, T, hd]: every expert's heads, expert-major."""
            x = F.linear(h, weight.reshape(-1, d), None if bias is None else bias.reshape(-1))
            x = x.view(B, T, -1, count, hd)
            if norm is not None:  # Qwen3: RMSNorm over each head's dims, per expert
                x = F.rms_norm(x, (hd,), eps=cfg.norm_eps) * norm[:, None, :]
            return x.flatten(2, 3).transpose(1, 2)

        k = _rotate(heads(self.wk, self.bk, self.k_norm, H_kv), cos, sin)
        v = heads(self.wv, self.bv, None, H_kv)
        if cache is not None:  # all experts' K/V of this layer as one [B, E_kv * H_kv, S, hd] entry
            k, v = cache.update(k, v, self.layer_idx)
        q = _rotate(heads(self.wq, self.bq, self.q_norm, H), cos, sin)
        outputs = []
        for e in range(E):
            kv = 0 if E_kv == 1 else e
            k_e = k[:, kv * H_kv:(kv + 1) * H_kv].repeat_interleave(H // H_kv, dim=1)
            v_e = v[:, kv * H_kv:(kv + 1) * H_kv].repeat_interleave(H // H_kv, dim=1)
            o = F.scaled_dot_product_attention(q[:, e * H:(e + 1) * H], k_e, v_e, attn_mask=mask)
            outputs.append(F.linear(o.transpose(1, 2).reshape(B, T, H * hd), self.wo[e],
                                    None if self.bo is None else self.bo[e]))
        if self.router is None:
            return outputs[0]
        gates = _router_probs(self.router, h)
        if cfg.attn_routing == "top_k":
            top, idx = gates.topk(cfg.attn_top_k, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        gates = gates.to(h.dtype)
        return sum(gates[..., e:e + 1] * out for e, out in enumerate(outputs))


class BamFFN(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        experts, d, f = max(1, config.n_experts), config.d_model, config.d_ff
        self.activation = getattr(config, "ffn_activation", "swiglu")
        gated, bias = self.activation == "swiglu", getattr(config, "ffn_bias", False)
        self.w_gate = nn.Parameter(torch.empty(experts, f, d)) if gated else None
        self.w_up = nn.Parameter(torch.empty(experts, f, d))
        self.w_down = nn.Parameter(torch.empty(experts, d, f))
        self.router = nn.Linear(d, config.n_experts, bias=False) if config.n_experts else None
        self.b_gate = nn.Parameter(torch.empty(experts, f)) if gated and bias else None
        self.b_up = nn.Parameter(torch.empty(experts, f)) if bias else None
        self.b_down = nn.Parameter(torch.empty(experts, d)) if bias else None

    def expert(self, x, e):
        """SwiGLU, or a 2-layer MLP with GELU (exact, or its tanh form) as GPT-NeoX has."""
        def linear(w, b):
            return F.linear(x, w[e], None if b is None else b[e])

        if self.w_gate is not None:
            hidden = F.silu(linear(self.w_gate, self.b_gate)) * linear(self.w_up, self.b_up)
        else:
            hidden = F.gelu(linear(self.w_up, self.b_up), approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return F.linear(hidden, self.w_down[e], None if self.b_down is None else self.b_down[e])

    def forward(self, h):
        if self.router is None:
            return self.expert(h, 0)
        cfg = self.config
        x = h.reshape(-1, h.shape[-1])
        weights, idx = _router_probs(self.router, x).topk(cfg.ffn_top_k, dim=-1)
        if cfg.ffn_renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.w_up.shape[0]):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, self.expert(x[rows], e) * weights[rows, slot, None].to(x.dtype))
        return (cfg.ffn_gate_scale * out).view_as(h)


class BamBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel = config.block_layout == "parallel"
        self.norm = _norm(config)
        two_norms = not self.parallel or getattr(config, "parallel_ffn_norm", False)
        self.norm_ffn = _norm(config) if two_norms else None
        self.attn = BamAttention(config, layer_idx)
        self.ffn = BamFFN(config)

    def forward(self, x, cos, sin, mask, cache):
        h = self.norm(x)
        if self.parallel:  # GPT-NeoX: the FFN has its own norm
            return x + self.attn(h, cos, sin, mask, cache) + self.ffn(h if self.norm_ffn is None else self.norm_ffn(x))
        x = x + self.attn(h, cos, sin, mask, cache)
        return x + self.ffn(self.norm_ffn(x))


class BamPreTrainedModel(PreTrainedModel):
    config_class = BamConfig
    base_model_prefix = "bam"
    _no_split_modules = ["BamBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Only for weights a checkpoint lacks (all of them are exported)."""
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, (BamAttention, BamFFN)):
            for param in module.parameters(recurse=False):
                if param is not None:
                    nn.init.normal_(param, std=std)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(BamBlock(config, i) for i in range(config.n_layer))
        self.norm_f = _norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers 5.x renamed it `cache`
        use_cache = self.config.use_cache if use_cache is None else use_cache
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
        if position_ids is None:  # left padding: a row's first real token is position 0
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]
        mask = self._mask(attention_mask.bool(), past, T)
        window = getattr(self.config, "sliding_window_bam", None)
        if window:  # Mistral: a query sees the keys of its last `window` positions
            key_position = attention_mask.long().cumsum(-1) - 1
            inside = key_position[:, None, None, :] > position_ids[:, None, :, None] - window
            mask = mask & (inside | ~attention_mask.bool()[:, None, None, :])
        cos, sin = _rope_tables(position_ids, self.config)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        x = self.norm_f(x)
        logits = F.linear(x, self.tok_emb.weight if self.lm_head is None else self.lm_head.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    @staticmethod
    def _mask(keep, past, T):
        """[B, 1, T, S] booleans: query t (at cache index past + t) sees key s when s <= past + t and
        s is not padding. A padding query sees itself, so no softmax row is empty."""
        S = keep.shape[1]
        query_index = torch.arange(past, past + T, device=keep.device)[:, None]
        key_index = torch.arange(S, device=keep.device)[None, :]
        causal = key_index <= query_index
        mask = causal[None] & keep[:, None, :]
        mask = mask | (key_index == query_index)[None]
        return mask[:, None]

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Only the tokens the cache has not seen; positions and mask come from attention_mask."""
        cache = cache if cache is not None else past_key_values
        past = cache.get_seq_length() if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, _CACHE_FIELD: cache}
        if inputs_embeds is not None and past == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, past:]
        return inputs
