"""FLOP accounting against a hand count and the paper's per-layer formulas."""

from bam_lightning import ModelConfig
from bam_lightning.flops import (
    forward_flops_per_token,
    layer_flops_per_token,
    training_flops_per_token,
)


def test_dense_layer_flops_match_a_hand_count():
    # d = 8, 2 heads of 4, d_ff = 16, context 10: every product counted as 2 FLOPs per MAC.
    config = ModelConfig(vocab_size=11, n_layer=3, d_model=8, n_head=2, d_ff=16, max_seq_len=10)
    layer = layer_flops_per_token(config, n_ctx=10)
    assert layer.qkv == 3 * 2 * 8 * 8  # three 8x8 projections
    assert layer.scores == 2 * 10 * 8  # paper's accounting: 2 * n_ctx * d
    assert layer.out == 2 * 8 * 8
    assert layer.ffn == 3 * 2 * 8 * 16  # gate, up, down
    assert layer.routers == 0
    assert forward_flops_per_token(config, 10) == 3 * (384 + 160 + 128 + 768) + 2 * 8 * 11
    assert training_flops_per_token(config, 10) == 3 * forward_flops_per_token(config, 10)


def test_mixture_layer_flops_follow_the_papers_formulas():
    d, d_ff, n, ctx = 64, 128, 4, 32
    base = dict(vocab_size=50, n_layer=2, d_model=d, n_head=4, d_ff=d_ff)
    bam = layer_flops_per_token(ModelConfig(**base, n_experts=n, attn_experts=n), ctx)
    btx = layer_flops_per_token(ModelConfig(**base, n_experts=n), ctx)
    shared = layer_flops_per_token(ModelConfig(**base, n_experts=n, attn_experts=n, attn_shared_kv=True), ctx)
    # BAM_SPEC: QKV 6*E*d^2, scores 2*E*n_ctx*d, output 2*E*d^2, FFN 6*k*d*d_ff, routers 2*N*d each
    assert (bam.qkv, bam.scores, bam.out, bam.ffn, bam.routers) == (
        6 * n * d * d, 2 * n * ctx * d, 2 * n * d * d, 6 * d * d_ff, 2 * 2 * n * d)
    assert (btx.qkv, btx.scores, btx.out, btx.ffn, btx.routers) == (6 * d * d, 2 * ctx * d, 2 * d * d, 6 * d * d_ff, 2 * n * d)
    assert shared.qkv == 2 * n * d * d + 4 * d * d  # own W_q per expert, one shared W_k and W_v
    top2 = layer_flops_per_token(ModelConfig(**base, n_experts=6, ffn_top_k=2), ctx)
    assert top2.ffn == 2 * 6 * d * d_ff
