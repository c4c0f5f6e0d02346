"""LightningModules: a dense seed module and a mixture module sharing one base.

The base owns everything both need: the next-token loss, per-domain validation metrics
(`val/<domain>/loss|ppl|bpb` plus `val/avg/...`), AdamW with warm-up + cosine, FSDP2 sharding
and the checkpoint contract (the model config and tokenizer travel inside every checkpoint).
The mixture module only adds the router losses and their statistics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.aggregation import MeanMetric

from bam_lightning.config import ModelConfig
from bam_lightning.flops import training_flops_per_token
from bam_lightning.model import GPT, RouterStats

CHECKPOINT_KEY = "bam_lightning"  # our own section of a Lightning checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # the second names an imported model's EOS


class BaseLM(L.LightningModule):
    """Shared training/validation logic; subclasses say whether the config must be a mixture."""

    expects_moe: bool | None = None  # None: either kind

    def __init__(
        self,
        config: ModelConfig,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        init_from: str | None = None,
        activation_checkpointing: bool = False,
    ):
        """
        Args:
            config: the model's shape and mixture layout.
            lr: peak learning rate after warm-up.
            min_lr_ratio: the cosine schedule ends at `lr * min_lr_ratio` at `trainer.max_steps`.
            warmup_steps: linear warm-up steps from 0 to `lr`.
            weight_decay: AdamW decay for matrices (never for norms or the token embedding).
            betas: AdamW betas.
            init_from: a checkpoint of the same kind and shape to start from (continued
                pre-training of a branch); applied once at the start of a fresh fit, never on resume.
            activation_checkpointing: recompute each block's activations in the backward pass
                (large models on GPUs); changes memory and speed, never the result.
        """
        super().__init__()
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        self._check_kind(config, source="model.config")
        self.config = config
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = config.to_dict()  # plain dict: checkpoints load without pickles
        self.model = GPT(config)
        self.model.activation_checkpointing = activation_checkpointing
        self.val_domain_names: list[str] = []
        self.bytes_per_token: dict[str, float] = {}
        self.tokenizer_fingerprint: str | None = None
        self.tokenizer_files: dict[str, str] = {}  # name -> text of a non-byte tokenizer, for `bam generate`
        self.val_loss = nn.ModuleDict()
        self.initial_val_metrics: dict[str, float] = {}
        self._init_from_done = False

    # ----- kind checks -----
    def _check_kind(self, config: ModelConfig, source: str) -> None:
        if self.expects_moe is True and not config.is_moe:
            raise ValueError(f"{source}: {type(self).__name__} needs a mixture config "
                             "(n_experts > 0 or attn_experts > 0); use DenseLM for dense models")
        if self.expects_moe is False and config.is_moe:
            raise ValueError(f"{source}: DenseLM got a mixture config (n_experts={config.n_experts}, "
                             f"attn_experts={config.attn_experts}); use MoELM for mixtures")

    # ----- set-up -----
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "vocab_size"):
            if datamodule.vocab_size > self.config.vocab_size:
                raise ValueError(
                    f"model.config.vocab_size ({self.config.vocab_size}) is smaller than the "
                    f"tokenizer's vocabulary ({datamodule.vocab_size}, {datamodule.tokenizer_fingerprint})")
            self.val_domain_names = list(datamodule.val_domain_names)
            self.bytes_per_token = dict(datamodule.bytes_per_token)
            self.tokenizer_fingerprint = datamodule.tokenizer_fingerprint
            if self.tokenizer_fingerprint != "byte":  # bytes need no file
                path = getattr(getattr(datamodule, "tokenizer", None), "path", None)
                self.tokenizer_files = {name: (Path(path).parent / name).read_bytes().decode("utf-8")
                                        for name in TOKENIZER_FILES if path and (Path(path).parent / name).is_file()}
        for name in self.val_domain_names:
            if name not in self.val_loss:
                self.val_loss[name] = MeanMetric()

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: shard each block, then the root. Idempotent,
        because Lightning calls it again for validate/test on an already sharded module."""
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.model.parameters()):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    # ----- forward and losses -----
    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[RouterStats]]:
        return self.model(idx)

    def lm_loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[RouterStats]]:
        """Mean next-token cross entropy over a [B, T+1] token block, in float32."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, stats = self.model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return loss, stats

    def aux_loss(self, stats: list[RouterStats], prefix: str) -> torch.Tensor | None:
        """Router losses to add to the LM loss (none for a dense model)."""
        return None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, stats = self.lm_loss(batch)
        self.log("train/lm_loss", loss, prog_bar=True)
        aux = self.aux_loss(stats, prefix="train")
        total = loss if aux is None else loss + aux
        self.log("train/loss", total)
        return total

    def validation_step(self, batch: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        domain = self._domain(dataloader_idx)
        loss, stats = self.lm_loss(batch)
        self.val_loss[domain].update(loss, weight=batch[:, 1:].numel())
        self.log_val_router_stats(domain, stats, batch)

    def log_val_router_stats(self, domain: str, stats: list[RouterStats], batch: torch.Tensor) -> None:
        """Hook for the mixture module (which attention expert each domain uses)."""

    def _domain(self, dataloader_idx: int) -> str:
        if not self.val_domain_names:  # plain dataloaders without a BAMDataModule
            self.val_domain_names = [f"domain{i}" for i in range(len(self.trainer.val_dataloaders or [0]))]
            for name in self.val_domain_names:
                self.val_loss[name] = MeanMetric().to(self.device)
        return self.val_domain_names[dataloader_idx]

    def on_validation_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        for domain in self.val_domain_names:
            if self.val_loss[domain].update_count == 0:
                continue
            loss = self.val_loss[domain].compute().item()
            self.val_loss[domain].reset()
            metrics[f"val/{domain}/loss"] = loss
            metrics[f"val/{domain}/ppl"] = math.exp(loss)
            if domain in self.bytes_per_token:
                metrics[f"val/{domain}/bpb"] = loss / math.log(2) / self.bytes_per_token[domain]
        for name in ("loss", "ppl", "bpb"):
            values = [v for k, v in metrics.items() if k.endswith(f"/{name}")]
            if values and len(values) == len(self.val_domain_names):
                metrics[f"val/avg/{name}"] = sum(values) / len(values)
        if self.trainer.sanity_checking:
            # Lightning drops sanity-check metrics; a full pre-training validation (recipes set
            # num_sanity_val_steps: -1) is the step-0 point of every curve, so log it ourselves.
            self.initial_val_metrics = metrics
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
        else:
            self.log_dict(metrics, sync_dist=False)

    # ----- optimisation -----
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            is_embedding = name.startswith("tok_emb.")
            (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        total = self._total_steps()
        warmup, floor = max(0, self.hparams.warmup_steps), self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    # ----- throughput (read by Lightning's ThroughputMonitor) -----
    @property
    def flops_per_batch(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "seq_len"):
            return None
        seq_len, batch_size = datamodule.seq_len, datamodule.batch_size
        return training_flops_per_token(self.config, seq_len) * seq_len * batch_size

    # ----- checkpoints -----
    def on_validation_start(self) -> None:
        self._maybe_init_from()  # the step-0 validation must already see the source's weights

    def on_train_start(self) -> None:
        self._maybe_init_from()

    def _maybe_init_from(self) -> None:
        """Load `init_from` once, at the start of a fresh fit. Not in `on_fit_start`: under
        ModelParallelStrategy the resume checkpoint is restored after that hook, so only here
        does `trainer.ckpt_path` tell a fresh fit from a resume."""
        if (not self.hparams.init_from or self._init_from_done or self.trainer.ckpt_path is not None
                or self.trainer.state.fn != "fit"):
            return
        from bam_lightning.checkpoint import load_model_weights, read_checkpoint

        source = read_checkpoint(self.hparams.init_from)
        source.check_compatible(self.config, "model.config", self.tokenizer_fingerprint)
        load_model_weights(self.model, source.state_dict)
        self._init_from_done = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(CHECKPOINT_KEY, {}).update({
            "kind": "moe" if self.config.is_moe else "dense",
            "tokenizer": self.tokenizer_fingerprint,
            "tokenizer_files": self.tokenizer_files,
            "val_domains": self.val_domain_names,
            "initial_val_metrics": self.initial_val_metrics,
        })

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from bam_lightning.checkpoint import describe_config_mismatch

        stored = checkpoint.get("hyper_parameters", {}).get("config")
        if stored is not None:
            if not isinstance(stored, ModelConfig):
                stored = ModelConfig.from_dict(dict(stored), "checkpoint hyper_parameters.config")
            problem = describe_config_mismatch(stored, self.config)
            if problem:
                raise ValueError(f"checkpoint does not match model.config: {problem}")
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        self.initial_val_metrics = dict(meta.get("initial_val_metrics", {}))
        ours, theirs = self.tokenizer_fingerprint, meta.get("tokenizer")
        if ours and theirs and ours != theirs:
            raise ValueError(f"checkpoint was trained with tokenizer {theirs!r} but the data uses {ours!r}")


class DenseLM(BaseLM):
    """A dense seed or a continued-pre-training branch of it."""

    expects_moe = False


class MoELM(BaseLM):
    """A BAM / BTX / sparse-upcycled mixture: adds router losses and their statistics."""

    expects_moe = True

    def aux_loss(self, stats: list[RouterStats], prefix: str) -> torch.Tensor | None:
        cfg = self.config
        lb_layers = [s.lb_loss for s in stats if s.lb_loss is not None]
        if not lb_layers:
            return None
        lb_total = torch.stack(lb_layers).sum()
        z_total = torch.stack([s.z_loss for s in stats if s.z_loss is not None]).sum()
        logs = {f"{prefix}/router/lb_loss": lb_total, f"{prefix}/router/z_loss": z_total}
        for layer, s in enumerate(stats):
            if s.lb_loss is None:
                continue
            fractions = s.expert_fraction
            logs[f"{prefix}/router/layer{layer}/lb_loss"] = s.lb_loss
            logs[f"{prefix}/router/layer{layer}/z_loss"] = s.z_loss
            logs[f"{prefix}/router/layer{layer}/imbalance"] = fractions.max() / fractions.mean()
            for e, fraction in enumerate(fractions):
                logs[f"{prefix}/router/layer{layer}/expert{e}_fraction"] = fraction
            if s.attn_gate_mean is not None:
                for e, gate in enumerate(s.attn_gate_mean):
                    logs[f"{prefix}/attn_gate/layer{layer}/expert{e}"] = gate
        self.log_dict({k: v.detach() for k, v in logs.items()})
        return cfg.lb_loss_coef * lb_total + cfg.z_loss_coef * z_total

    def log_val_router_stats(self, domain: str, stats: list[RouterStats], batch: torch.Tensor) -> None:
        logs = {}
        for layer, s in enumerate(stats):
            if s.attn_gate_mean is not None:
                for e, gate in enumerate(s.attn_gate_mean):
                    logs[f"val/{domain}/attn_gate/layer{layer}/expert{e}"] = gate
            if s.expert_fraction is not None:
                for e, fraction in enumerate(s.expert_fraction):
                    logs[f"val/{domain}/ffn_load/layer{layer}/expert{e}"] = fraction
        if logs:
            self.log_dict(logs, add_dataloader_idx=False, batch_size=batch.shape[0])
