"""Where each of our GPT's dense tensors lives in a Hugging Face Llama checkpoint and in a GGUF file.

One table serves import (theirs -> ours) and export (ours -> theirs). Our attention and FFN
weights carry a leading expert dimension of 1 for a dense model; theirs do not.
"""

from __future__ import annotations

# our per-layer suffix -> (Hugging Face Llama suffix, GGUF suffix)
LAYER_NAMES = {
    "norm.weight": ("input_layernorm.weight", "attn_norm.weight"),
    "norm_ffn.weight": ("post_attention_layernorm.weight", "ffn_norm.weight"),
    "attn.wq": ("self_attn.q_proj.weight", "attn_q.weight"),
    "attn.wk": ("self_attn.k_proj.weight", "attn_k.weight"),
    "attn.wv": ("self_attn.v_proj.weight", "attn_v.weight"),
    "attn.wo": ("self_attn.o_proj.weight", "attn_output.weight"),
    "ffn.w_gate": ("mlp.gate_proj.weight", "ffn_gate.weight"),
    "ffn.w_up": ("mlp.up_proj.weight", "ffn_up.weight"),
    "ffn.w_down": ("mlp.down_proj.weight", "ffn_down.weight"),
}
GLOBAL_NAMES = {
    "tok_emb.weight": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm_f.weight": ("model.norm.weight", "output_norm.weight"),
    "lm_head.weight": ("lm_head.weight", "output.weight"),
}
HF, GGUF = 0, 1


def dense_name_map(n_layer: int, tied: bool, which: int) -> dict[str, str]:
    """Our key -> their key for a dense sequential Llama (`which`: HF or GGUF)."""
    names = {ours: theirs[which] for ours, theirs in GLOBAL_NAMES.items() if not (tied and ours == "lm_head.weight")}
    layer_prefix = "model.layers.{}." if which == HF else "blk.{}."
    for i in range(n_layer):
        for ours, theirs in LAYER_NAMES.items():
            names[f"blocks.{i}.{ours}"] = layer_prefix.format(i) + theirs[which]
    return names


def is_banked(our_key: str) -> bool:
    """Our attention/FFN weights are stacked [experts, ...]; a dense one has experts = 1."""
    return ".attn.w" in our_key or ".ffn.w_" in our_key
