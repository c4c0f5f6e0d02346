"""One configuration dataclass for dense seeds and their mixtures.

A dense model is the configuration with `n_experts == 0` and `attn_experts == 0`; every mixture
(BAM Expert-KV / Shared-KV, BTX, sparse upcycling) is the same `GPT` with those fields set. The
config travels inside every checkpoint, so it holds plain values only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from bam_lightning.errors import UserError

ROPE_SCALING_KEYS = {  # type -> its required keys (the names follow transformers' rope_parameters)
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "factors": ("factors",),  # llama.cpp's rope_freqs tensor: frequency i is divided by factors[i]
}
FFN_ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh")


@dataclass
class ModelConfig:
    """Shape and mixture layout of a GPT (see BAM_SPEC.md for the method's terms)."""

    vocab_size: int = 257
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_kv_head: int | None = None  # None -> n_head (plain multi-head); fewer -> grouped-query
    d_ff: int | None = None  # SwiGLU hidden size; None -> 8/3 * d_model rounded up to 64
    max_seq_len: int = 128
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    block_layout: Literal["parallel", "sequential"] = "parallel"
    init_std: float = 0.02

    # --- other model families (imported seeds); every default is the original architecture ---
    head_dim: int | None = None  # None -> d_model / n_head; Qwen3 sets it wider
    rotary_dim: int | None = None  # RoPE on the first rotary_dim dims of each head; None -> all (GPT-NeoX: 1/4)
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3" | "linear", "factor": ..., ...}
    sliding_window: int | None = None  # Mistral: a query sees the last sliding_window positions
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2, GPT-NeoX)
    attn_out_bias: bool = False  # bias on the attention output projection (GPT-NeoX)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    ffn_activation: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"  # gelu*: 2-layer MLP (GPT-NeoX)
    ffn_bias: bool = False  # biases on the FFN projections (GPT-NeoX)
    norm_bias: bool = False  # LayerNorm with a bias (GPT-NeoX); only with norm = layernorm
    parallel_ffn_norm: bool = False  # parallel block with its own FFN norm: x + Attn(N1(x)) + FFN(N2(x))

    # --- mixture (all zero/off for a dense model) ---
    n_experts: int = 0  # FFN experts; 0 = one dense FFN
    ffn_top_k: int = 1
    ffn_renormalize: bool = False  # False: paper's softmax-then-top-k; True: BTX top-k renorm
    ffn_gate_scale: float = 1.0  # multiplies the FFN mixture output ("weight scaling" option)
    attn_experts: int = 0  # attention experts; 0 = one dense attention (BTX, sparse)
    attn_shared_kv: bool = False  # BAM Shared-KV: one K/V projection shared by all experts
    attn_routing: Literal["soft", "top_k"] = "soft"  # soft = the method; top_k = ablation
    attn_top_k: int = 1  # only for attn_routing = "top_k"
    router_init: Literal["normal", "zeros"] = "normal"
    router_init_std: float = 0.01
    lb_loss_coef: float = 0.01  # Switch load-balancing alpha
    z_loss_coef: float = 0.001  # ST-MoE router z-loss beta

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 64 * -(-(8 * self.d_model // 3) // 64)
        if self.head_dim is None:
            if self.n_head > 0 and self.d_model % self.n_head:
                raise UserError(f"ModelConfig: d_model ({self.d_model}) must be divisible by n_head "
                                f"({self.n_head}), or set head_dim")
            self.head_dim = self.d_model // max(1, self.n_head)
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        self.validate()

    def validate(self) -> None:
        """Refuse nonsense before any tensor is allocated; messages name the field."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "max_seq_len"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.head_dim > 0, f"head_dim must be positive, got {self.head_dim}")
        need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
             f"rotary_dim ({self.rotary_dim}) must be even and between 2 and head_dim ({self.head_dim}) for RoPE")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            need(kind in ROPE_SCALING_KEYS, f"rope_scaling type must be one of {sorted(ROPE_SCALING_KEYS)}, "
                 f"got {kind!r}")
            missing = [key for key in ROPE_SCALING_KEYS[kind] if key not in self.rope_scaling]
            need(not missing, f"rope_scaling of type {kind!r} needs {missing}")
            unknown = sorted(set(self.rope_scaling) - {"type", *ROPE_SCALING_KEYS[kind]})
            need(not unknown, f"rope_scaling of type {kind!r}: unknown keys {unknown}")
            if kind == "factors":
                need(len(self.rope_scaling["factors"]) == self.rotary_dim // 2,
                     f"rope_scaling factors: {len(self.rope_scaling['factors'])} values, rotary_dim / 2 = "
                     f"{self.rotary_dim // 2} frequencies")
        need(self.sliding_window is None or self.sliding_window > 0,
             f"sliding_window must be positive or null, got {self.sliding_window}")
        need(self.ffn_activation in FFN_ACTIVATIONS,
             f"ffn_activation must be one of {list(FFN_ACTIVATIONS)}, got {self.ffn_activation!r}")
        need(not (self.norm_bias and self.norm != "layernorm"), "norm_bias needs norm: layernorm")
        need(not (self.parallel_ffn_norm and self.block_layout != "parallel"),
             "parallel_ffn_norm needs block_layout: parallel (a sequential block always has two norms)")
        need(self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm must be rmsnorm|layernorm, got {self.norm!r}")
        need(self.block_layout in ("parallel", "sequential"),
             f"block_layout must be parallel|sequential, got {self.block_layout!r}")
        need(self.n_experts >= 0, f"n_experts must be >= 0, got {self.n_experts}")
        need(self.attn_experts >= 0, f"attn_experts must be >= 0, got {self.attn_experts}")
        if self.n_experts:
            need(1 <= self.ffn_top_k <= self.n_experts,
                 f"ffn_top_k ({self.ffn_top_k}) must be between 1 and n_experts ({self.n_experts})")
        need(self.attn_routing in ("soft", "top_k"),
             f"attn_routing must be soft|top_k, got {self.attn_routing!r}")
        if self.attn_experts and self.attn_routing == "top_k":
            need(1 <= self.attn_top_k <= self.attn_experts,
                 f"attn_top_k ({self.attn_top_k}) must be between 1 and attn_experts ({self.attn_experts})")
        need(not (self.attn_shared_kv and self.attn_experts == 0),
             "attn_shared_kv needs attn_experts > 0")
        need(self.router_init in ("normal", "zeros"),
             f"router_init must be normal|zeros, got {self.router_init!r}")

    # --- derived shapes ---
    @property
    def rope_scaling_type(self) -> str | None:
        return None if self.rope_scaling is None else self.rope_scaling["type"]

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0 or self.attn_experts > 0

    @property
    def n_ffn_banks(self) -> int:
        """Leading dimension of the stacked FFN weights (1 for a dense FFN)."""
        return max(1, self.n_experts)

    @property
    def n_attn_banks(self) -> int:
        """Leading dimension of the stacked Q/O weights (1 for a dense attention)."""
        return max(1, self.attn_experts)

    @property
    def n_kv_banks(self) -> int:
        """Leading dimension of the stacked K/V weights (1 when shared or dense)."""
        return 1 if self.attn_shared_kv else self.n_attn_banks

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a stored dict, naming unknown keys instead of silently dropping them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def dense(self) -> ModelConfig:
        """The dense configuration with the same shapes (what each expert was branched from)."""
        mixture_fields = ("n_experts", "ffn_top_k", "ffn_renormalize", "ffn_gate_scale", "attn_experts",
                          "attn_shared_kv", "attn_routing", "attn_top_k", "router_init", "router_init_std",
                          "lb_loss_coef", "z_loss_coef")
        defaults = ModelConfig()
        values = self.to_dict()
        values.update({name: getattr(defaults, name) for name in mixture_fields})
        return ModelConfig(**values)
