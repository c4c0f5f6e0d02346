"""Parameter and FLOP accounting from a ModelConfig alone (no model is built).

Per-layer inference FLOPs per token follow the paper's accounting (BAM_SPEC.md): QKV projections,
attention scores 2*E_attn*n_ctx*d, output projection, FFN 6*k*d*d_ff, and 2*N*d per router;
generalised to grouped-query and shared K/V. Training costs three forward passes (forward +
backward), the usual 6N rule's convention; validation costs one.

Tokens are counted per optimizer step in one place (`tokens_per_optimizer_step`), so the metrics
file, the pipeline's records, the report and the compute-matched step count agree on what one
step trains: batch x sequence x gradient accumulation x processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bam_lightning.config import ModelConfig


@dataclass(frozen=True)
class LayerFlops:
    qkv: int
    scores: int
    out: int
    ffn: int
    routers: int

    @property
    def total(self) -> int:
        return self.qkv + self.scores + self.out + self.ffn + self.routers


def layer_flops_per_token(config: ModelConfig, n_ctx: int) -> LayerFlops:
    d, hd = config.d_model, config.head_dim
    q_width = config.n_attn_banks * config.n_head * hd
    kv_width = config.n_kv_banks * config.n_kv_head * hd
    ffn_experts_per_token = config.ffn_top_k if config.n_experts else 1
    return LayerFlops(
        qkv=2 * d * (q_width + 2 * kv_width),
        scores=2 * config.n_attn_banks * n_ctx * d,
        out=2 * q_width * d,
        ffn=6 * ffn_experts_per_token * d * config.d_ff,
        routers=2 * d * (config.attn_experts + config.n_experts),
    )


def forward_flops_per_token(config: ModelConfig, n_ctx: int) -> int:
    """All layers plus the LM head (the embedding lookup costs no FLOPs)."""
    return config.n_layer * layer_flops_per_token(config, n_ctx).total + 2 * config.d_model * config.vocab_size


def training_flops_per_token(config: ModelConfig, n_ctx: int) -> int:
    return 3 * forward_flops_per_token(config, n_ctx)


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters, matching `GPT(config).num_parameters()` for total.

    Soft-routed attention experts are all active; of the FFN experts only the top-k are.
    """
    d, hd, f = config.d_model, config.head_dim, config.d_ff
    q_side = 2 * config.n_head * hd * d + config.qkv_bias * config.n_head * hd + config.attn_out_bias * d
    kv_side = 2 * config.n_kv_head * hd * d + config.qkv_bias * 2 * config.n_kv_head * hd
    attn = (config.n_attn_banks * (q_side + config.qk_norm * hd) + config.n_kv_banks * (kv_side + config.qk_norm * hd)
            + config.attn_experts * d)
    gated = config.ffn_activation == "swiglu"
    one_ffn = (3 if gated else 2) * d * f + config.ffn_bias * ((2 if gated else 1) * f + d)
    one_norm = d * (2 if config.norm_bias else 1)
    norms = one_norm * (1 if config.block_layout == "parallel" and not config.parallel_ffn_norm else 2)
    ffn_total = config.n_ffn_banks * one_ffn + config.n_experts * d
    ffn_active = (config.ffn_top_k if config.n_experts else 1) * one_ffn + config.n_experts * d
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2) + one_norm  # + final norm
    total = embeddings + config.n_layer * (attn + ffn_total + norms)
    active = embeddings + config.n_layer * (attn + ffn_active + norms)
    return total, active


def tokens_per_optimizer_step(batch_size: int, seq_len: int, accumulate_grad_batches: int = 1,
                              devices: int = 1, num_nodes: int = 1) -> int:
    """Tokens one optimizer step trains on: every micro-batch of every process counts."""
    values = {"batch_size": batch_size, "seq_len": seq_len, "accumulate_grad_batches": accumulate_grad_batches,
              "devices": devices, "num_nodes": num_nodes}
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return batch_size * seq_len * accumulate_grad_batches * devices * num_nodes


def trainer_tokens_per_step(trainer: Any, batch_size: int, seq_len: int) -> int:
    """`tokens_per_optimizer_step` for a running Lightning trainer (world size = devices x nodes)."""
    return tokens_per_optimizer_step(batch_size, seq_len, int(trainer.accumulate_grad_batches),
                                     devices=int(trainer.world_size))


def recipe_tokens_per_step(recipe: dict[str, Any], source: str = "recipe") -> int:
    """`tokens_per_optimizer_step` from a `bam fit` recipe's data and trainer sections (the
    DataModule's and Trainer's defaults where a field is absent)."""
    data, trainer = recipe.get("data") or {}, recipe.get("trainer") or {}
    return tokens_per_optimizer_step(
        int(data.get("batch_size", 32)), int(data.get("seq_len", 128)),
        int(trainer.get("accumulate_grad_batches", 1)),
        devices=recipe_device_count(trainer.get("devices", 1), source), num_nodes=int(trainer.get("num_nodes", 1)))


def recipe_device_count(devices: Any, source: str = "recipe") -> int:
    """A recipe's `trainer.devices` as a process count; "auto" and -1 depend on the machine, so a
    step count derived from them would change with it."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)
    except (TypeError, ValueError):
        count = -1
    if count < 1:
        raise ValueError(f"{source}: trainer.devices is {devices!r}; token and compute-matched step counts "
                         "need an explicit number of devices (e.g. 1 or 8)")
    return count
