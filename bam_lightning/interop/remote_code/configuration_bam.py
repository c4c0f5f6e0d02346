"""Configuration of a BAM / BTX mixture exported by bam_lightning (loaded with trust_remote_code=True).

The fields are bam_lightning's ModelConfig; the standard names transformers reads (hidden size,
layer and head counts) are set from them so that `generate()` can build its cache.
This file and modeling_bam.py need only torch and transformers.
"""

try:
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _BaseConfig


class BamConfig(_BaseConfig):
    model_type = "bam"

    def __init__(self, vocab_size=257, n_layer=4, d_model=128, n_head=4, n_kv_head=None, d_ff=None,
                 max_seq_len=128, rope_base=10000.0, tie_embeddings=False, norm="rmsnorm", norm_eps=1e-5,
                 block_layout="parallel", n_experts=0, ffn_top_k=1, ffn_renormalize=False, ffn_gate_scale=1.0,
                 attn_experts=0, attn_shared_kv=False, attn_routing="soft", attn_top_k=1, head_dim=None,
                 rotary_dim=None, rope_scaling_bam=None, sliding_window_bam=None, qkv_bias=False, attn_out_bias=False,
                 qk_norm=False, ffn_activation="swiglu", ffn_bias=False, norm_bias=False, parallel_ffn_norm=False,
                 **kwargs):
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.d_model = d_model
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        self.d_ff = d_ff
        self.max_seq_len = max_seq_len
        self.rope_base = rope_base
        self.tie_embeddings = tie_embeddings
        self.norm = norm
        self.norm_eps = norm_eps
        self.block_layout = block_layout
        self.n_experts = n_experts
        self.ffn_top_k = ffn_top_k
        self.ffn_renormalize = ffn_renormalize
        self.ffn_gate_scale = ffn_gate_scale
        self.attn_experts = attn_experts
        self.attn_shared_kv = attn_shared_kv
        self.attn_routing = attn_routing
        self.attn_top_k = attn_top_k
        # other families' fields (bam_lightning's ModelConfig; the defaults are the original model)
        self.rotary_dim = rotary_dim
        self.rope_scaling_bam = rope_scaling_bam  # ModelConfig.rope_scaling (transformers owns `rope_scaling`)
        self.sliding_window_bam = sliding_window_bam  # not `sliding_window`: generate() would drop old keys
        self.qkv_bias = qkv_bias
        self.attn_out_bias = attn_out_bias
        self.qk_norm = qk_norm
        self.ffn_activation = ffn_activation
        self.ffn_bias = ffn_bias
        self.norm_bias = norm_bias
        self.parallel_ffn_norm = parallel_ffn_norm
        # the names transformers' generation and cache code read
        self.num_hidden_layers = n_layer
        self.hidden_size = d_model
        self.num_attention_heads = n_head
        self.num_key_value_heads = self.n_kv_head
        self.head_dim = head_dim or d_model // n_head
        self.rotary_dim = rotary_dim or self.head_dim
        self.max_position_embeddings = max_seq_len
        self.intermediate_size = d_ff
        # the embedding is tied inside the model itself, not by transformers' tying machinery
        kwargs["tie_word_embeddings"] = False
        self.use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
