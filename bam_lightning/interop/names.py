"""Where each of our GPT's dense tensors lives in each family's Hugging Face checkpoint and in GGUF.

One table per family serves import (theirs -> ours) and export (ours -> theirs). Our attention and
FFN weights carry a leading expert dimension of 1 for a dense model; theirs do not. GPT-NeoX
fuses q, k and v into one tensor, interleaved per head ([head, (q, k, v), head_dim] rows): our
wq, wk, wv (and their biases) name that tensor and the interop code slices or concatenates it.
"""

from __future__ import annotations

from bam_lightning.config import ModelConfig

# our per-layer suffix -> (Llama-style Hugging Face suffix, GGUF suffix); Llama, Mistral, Qwen2, Qwen3
LAYER_NAMES = {
    "norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "norm_ffn.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "attn.wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attn.wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attn.wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attn.wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "attn.bq": ("self_attn.q_proj.bias", "attn_q.bias"),
    "attn.bk": ("self_attn.k_proj.bias", "attn_k.bias"),
    "attn.bv": ("self_attn.v_proj.bias", "attn_v.bias"),
    "attn.bo": ("self_attn.o_proj.bias", "attn_output.bias"),
    "attn.q_norm": ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    "attn.k_norm": ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    "ffn.w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "ffn.w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "ffn.w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
    "ffn.b_gate": ("mlp.gate_proj.bias", "ffn_gate.bias"),
    "ffn.b_up": ("mlp.up_proj.bias", "ffn_up.bias"),
    "ffn.b_down": ("mlp.down_proj.bias", "ffn_down.bias"),
}
GLOBAL_NAMES = {
    "tok_emb.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm_f.weight": ("model.norm.weight", "output_norm.weight"),
    "lm_head.weight": ("lm_head.weight", "output.weight"),
}
# GPT-NeoX (Pythia): our suffix -> theirs under gpt_neox.layers.N.
NEOX_LAYER_NAMES = {
    "norm.weight": "input_layernorm.weight", "norm.bias": "input_layernorm.bias",
    "norm_ffn.weight": "post_attention_layernorm.weight", "norm_ffn.bias": "post_attention_layernorm.bias",
    "attn.wq": "attention.query_key_value.weight", "attn.wk": "attention.query_key_value.weight",
    "attn.wv": "attention.query_key_value.weight",
    "attn.bq": "attention.query_key_value.bias", "attn.bk": "attention.query_key_value.bias",
    "attn.bv": "attention.query_key_value.bias",
    "attn.wo": "attention.dense.weight", "attn.bo": "attention.dense.bias",
    "ffn.w_up": "mlp.dense_h_to_4h.weight", "ffn.b_up": "mlp.dense_h_to_4h.bias",
    "ffn.w_down": "mlp.dense_4h_to_h.weight", "ffn.b_down": "mlp.dense_4h_to_h.bias",
}
NEOX_GLOBAL_NAMES = {
    "tok_emb.weight": "gpt_neox.embed_in.weight", "norm_f.weight": "gpt_neox.final_layer_norm.weight",
    "norm_f.bias": "gpt_neox.final_layer_norm.bias", "lm_head.weight": "embed_out.weight",
}
NEOX_FUSED = {"attn.wq": 0, "attn.wk": 1, "attn.wv": 2, "attn.bq": 0, "attn.bk": 1, "attn.bv": 2}
HF, GGUF = 0, 1
# tensors some checkpoints carry that are derived, not weights: skipped on import
DERIVED_SUFFIXES = ("rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")


def our_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a GPT with `config` and its shape (a meta-device model)."""
    import torch

    from bam_lightning.model import GPT

    with torch.device("meta"):
        return {key: tuple(value.shape) for key, value in GPT(config).state_dict().items()}


def dense_name_map(config: ModelConfig, which: int = HF, family: str | None = None) -> dict[str, str]:
    """Our key -> their key for the dense model of `config` (`which`: HF or GGUF; `family`
    default: the one `config` is)."""
    family = family or family_of(config)
    names = {}
    for key in our_keys(config.dense()):
        if key.startswith("blocks."):
            _, layer, suffix = key.split(".", 2)
            if family == "gpt_neox":
                names[key] = f"gpt_neox.layers.{layer}.{NEOX_LAYER_NAMES[suffix]}"
            else:
                names[key] = ("model.layers.{}." if which == HF else "blk.{}.").format(layer) + LAYER_NAMES[suffix][which]
        else:
            names[key] = NEOX_GLOBAL_NAMES[key] if family == "gpt_neox" else GLOBAL_NAMES[key][which]
    return names


def fused_part(our_key: str, family: str) -> int | None:
    """Which third (q 0, k 1, v 2) of a fused per-head query_key_value tensor `our_key` is."""
    return NEOX_FUSED.get(our_key.split(".", 2)[-1]) if family == "gpt_neox" else None


def is_banked(our_key: str) -> bool:
    """Our attention/FFN tensors are stacked [experts, ...]; a dense one has experts = 1."""
    return (".attn." in our_key or ".ffn." in our_key) and not our_key.endswith("router.weight")


def family_of(config: ModelConfig) -> str:
    """The Hugging Face family whose architecture `config` is (the family a seed came from: each
    family's import sets a distinct combination of fields); "bam" when none is."""
    if config.block_layout == "parallel" and not config.parallel_ffn_norm:
        return "bam"
    if config.ffn_activation != "swiglu":
        neox = (config.norm == "layernorm" and config.norm_bias and config.ffn_bias and not config.qk_norm
                and config.qkv_bias == config.attn_out_bias and config.n_kv_head == config.n_head
                and config.sliding_window is None and config.rope_scaling is None)
        return "gpt_neox" if neox else "bam"
    llama_like = (config.block_layout == "sequential" and config.norm == "rmsnorm"
                  and config.rotary_dim == config.head_dim and config.rope_scaling_type in (None, "llama3", "linear"))
    if not llama_like:
        return "bam"
    if config.qk_norm:
        ok = config.qkv_bias == config.attn_out_bias and not config.ffn_bias and config.sliding_window is None
        return "qwen3" if ok else "bam"
    if config.qkv_bias and not config.attn_out_bias:
        return "qwen2" if not config.ffn_bias and config.sliding_window is None else "bam"
    if config.qkv_bias != config.attn_out_bias:
        return "bam"
    if config.sliding_window is not None:
        return "mistral" if not (config.qkv_bias or config.ffn_bias) else "bam"
    return "llama"
