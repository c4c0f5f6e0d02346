"""LightningModules: a dense seed module and a mixture module sharing one base.

The base owns everything both need: the next-token loss, per-domain validation metrics
(`val/<domain>/loss|ppl|bpb` plus `val/avg/...`), AdamW with warm-up + cosine, FSDP2 sharding
and the checkpoint contract (the model config and tokenizer travel inside every checkpoint, and
every fit ends with its final state saved, marked `final`, so the next stage never starts from an
older step). The mixture module only adds the router losses and their statistics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from bam_lightning.config import ModelConfig
from bam_lightning.errors import UserError
from bam_lightning.flops import forward_flops_per_token, training_flops_per_token
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
        fused_adamw: bool | None = None,
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
            fused_adamw: AdamW's fused single-kernel step. None (default): wherever torch has the
                kernel for the parameters' device and no 16-bit gradient scaler must unscale before
                clipping; the foreach step otherwise. Same update up to float rounding, several
                times faster on large models (benchmarks/bench_optimizer.py).
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
        self.tokenizer_fingerprint: str | None = None
        self.token_bytes: torch.Tensor | None = None  # UTF-8 bytes per token id, for bpb
        self.val_documents: dict[str, int] = {}  # validation documents per domain
        self.val_sums = nn.ModuleDict()
        self.val_document_stats: dict[str, dict[str, list]] = {}  # of the last full validation
        self.tokenizer_files: dict[str, str] = {}  # name -> text of a non-byte tokenizer, for `bam generate`
        self.initial_val_metrics: dict[str, float] = {}
        self._init_from_done = False
        self.validated_step: int | None = None  # global step of the last (non-sanity) validation
        self._saved_state: tuple[int, int | None, bool] | None = None  # what the last checkpoint held
        self._saving_final = False
        check_optimizer_settings(lr, min_lr_ratio, warmup_steps, weight_decay, betas)

    # ----- kind checks -----
    def _check_kind(self, config: ModelConfig, source: str) -> None:
        if self.expects_moe is True and not config.is_moe:
            raise UserError(f"{source}: {type(self).__name__} needs a mixture config "
                             "(n_experts > 0 or attn_experts > 0); use DenseLM for dense models")
        if self.expects_moe is False and config.is_moe:
            raise UserError(f"{source}: DenseLM got a mixture config (n_experts={config.n_experts}, "
                             f"attn_experts={config.attn_experts}); use MoELM for mixtures")

    # ----- set-up -----
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "vocab_size"):
            if datamodule.vocab_size > self.config.vocab_size:
                raise UserError(
                    f"model.config.vocab_size ({self.config.vocab_size}) is smaller than the "
                    f"tokenizer's vocabulary ({datamodule.vocab_size}, {datamodule.tokenizer_fingerprint})")
            check_seq_len(datamodule, self.config)
            self.val_domain_names = list(datamodule.val_domain_names)
            self.token_bytes = torch.from_numpy(datamodule.token_byte_lengths())
            self.val_documents = dict(datamodule.val_document_counts)
            self.tokenizer_fingerprint = datamodule.tokenizer_fingerprint
            if self.tokenizer_fingerprint != "byte":  # bytes need no file
                path = getattr(getattr(datamodule, "tokenizer", None), "path", None)
                self.tokenizer_files = {name: (Path(path).parent / name).read_bytes().decode("utf-8")
                                        for name in TOKENIZER_FILES if path and (Path(path).parent / name).is_file()}
        for name in self.val_domain_names:
            self._add_val_metrics(name)

    def _add_val_metrics(self, domain: str) -> None:
        """The metric states one validation domain sums over the ranks. Every rank makes them
        for every domain, also a rank that scores no window there, because their sums are
        collectives that every rank must join."""
        if domain not in self.val_sums:
            self.val_sums[domain] = DocumentSums(self.val_documents.get(domain, 1)).to(self.device)

    def on_fit_start(self) -> None:
        """Name the FFN and attention kernels in the training log: a fallback to the per-expert
        loop (float64, fp32 on a GPU, an older torch) is correct but slower, and must not pass
        unnoticed; which attention kernel runs depends on device, dtype and sequence length."""
        from lightning.pytorch.utilities import rank_zero_info

        from bam_lightning.model.ffn import ffn_kernel
        from bam_lightning.model.short_attention import training_attention_kernel

        precision = str(self.trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else self.dtype
        where = f"({dtype} on {self.device.type})"
        rank_zero_info(f"FFN expert matmuls: {ffn_kernel(self.device, dtype)} {where}")
        rank_zero_info(f"Attention in training: {training_attention_kernel(self.device, dtype)} {where}")

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

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Sum each target token's loss (and its bytes) into its validation document. Targets of
        a negative document are padding (a rank with fewer windows than another still runs the
        forward, see `rank_batches`) and count nowhere."""
        domain = self._domain(dataloader_idx)
        tokens = batch_tokens(batch)
        if isinstance(batch, dict):  # BAMDataModule: tokens plus the document of every target
            documents = batch["documents"]
        else:  # a plain token batch: one anonymous document
            documents = torch.zeros_like(tokens[:, 1:])
        targets = tokens[:, 1:]
        logits, stats = self.model(tokens[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
        n_bytes = None
        if self.token_bytes is not None:
            self.token_bytes = self.token_bytes.to(targets.device)
            n_bytes = self.token_bytes[targets.flatten()]
        real = documents.flatten() >= 0
        if not bool(real.all()):
            losses, n_bytes = losses[real], None if n_bytes is None else n_bytes[real]
        self.val_sums[domain].update(documents.flatten()[real], losses, n_bytes)
        if bool(real.any()):  # a batch is either all padding or all windows
            self.log_val_router_stats(domain, stats, tokens)

    def log_val_router_stats(self, domain: str, stats: list[RouterStats], batch: torch.Tensor) -> None:
        """Hook for the mixture module (which attention expert each domain uses)."""

    def val_router_metrics(self, domain: str) -> dict[str, float]:
        """Hook for the mixture module: its routing statistics of this validation, over all ranks."""
        return {}

    def _domain(self, dataloader_idx: int) -> str:
        if not self.val_domain_names:  # plain dataloaders without a BAMDataModule
            self.val_domain_names = [f"domain{i}" for i in range(len(self.trainer.val_dataloaders or [0]))]
            for name in self.val_domain_names:
                self._add_val_metrics(name)
        return self.val_domain_names[dataloader_idx]

    def on_validation_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        routing: dict[str, float] = {}
        documents: dict[str, dict[str, list]] = {}
        for domain in self.val_domain_names:
            # Every rank computes every domain: the sums are collectives (a rank that scored no
            # window of the domain still joins them). What was scored is known after the sum.
            sums = self.val_sums[domain]
            if sums.update_count == 0:
                sums.update(*(torch.zeros(0, dtype=dtype, device=sums.device)
                              for dtype in (torch.int64, torch.float32, torch.float32)))
            per_document = sums.compute().double().cpu()  # [documents, (loss, tokens, bytes)]
            sums.reset()
            routing.update(self.val_router_metrics(domain))
            loss_sum, tokens, n_bytes = per_document.sum(0).tolist()
            if tokens == 0:  # not validated at all (no window on any rank)
                continue
            metrics[f"val/{domain}/loss"] = loss_sum / tokens
            metrics[f"val/{domain}/ppl"] = math.exp(loss_sum / tokens)
            if self.token_bytes is not None and n_bytes > 0:
                metrics[f"val/{domain}/bpb"] = loss_sum / math.log(2) / n_bytes
            scored = torch.nonzero(per_document[:, 1] > 0).flatten()
            documents[domain] = {"document": scored.tolist(),
                                 "loss_sum": per_document[scored, 0].tolist(),
                                 "tokens": per_document[scored, 1].long().tolist(),
                                 "bytes": per_document[scored, 2].long().tolist()}
        if not self.trainer.sanity_checking:
            self.val_document_stats = documents
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
            # Already global (the sums are reduced across ranks); syncing identical values keeps
            # Lightning from warning once per key on every validation of a multi-process run.
            self.log_dict({**metrics, **routing}, sync_dist=True)

    # ----- optimisation -----
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            is_embedding = name.startswith("tok_emb.")
            (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
        fused = self.hparams.get("fused_adamw")
        if fused is None:
            fused = self._fused_adamw_supported(decay + no_decay)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=bool(fused))
        if fused and self._grad_scaler() is None:
            # The flag tells a GradScaler that step() unscales by itself; with no scaler (fp32,
            # bf16-mixed) there is nothing to unscale, and left set it makes Lightning refuse
            # gradient clipping for a fused optimizer.
            optimizer._step_supports_amp_scaling = False
        total = self._total_steps()
        warmup, floor = max(0, self.hparams.warmup_steps), self.hparams.min_lr_ratio

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fused_adamw_supported(self, params: list[nn.Parameter]) -> bool:
        """Whether the fused AdamW kernel can take these parameters under this trainer: plain
        floating-point tensors on a device torch has the kernel for, and no fp16 gradient scaler
        (Lightning cannot clip gradients an optimizer unscales itself)."""
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        if not params or any(type(p.data) is not torch.Tensor or not p.is_floating_point() for p in params):
            return False  # e.g. FSDP2's DTensor shards: keep the path every strategy supports
        if len({p.device for p in params}) != 1 or params[0].device.type not in _get_fused_kernels_supported_devices():
            return False
        return self._grad_scaler() is None

    def _grad_scaler(self) -> Any:
        """The fp16 gradient scaler of this trainer's precision plugin (None under fp32 and bf16)."""
        trainer = getattr(self, "_trainer", None)
        return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) if trainer else None

    def _total_steps(self) -> int:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise UserError(f"trainer.max_steps is {self.trainer.max_steps} (no limit) and the training data "
                             "never ends: set trainer.max_steps (the learning-rate schedule ends there)")
        return int(steps)

    # ----- throughput (read by Lightning's ThroughputMonitor) -----
    @property
    def flops_per_batch(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "seq_len"):
            return None
        seq_len, batch_size = datamodule.seq_len, datamodule.batch_size
        # training is forward + backward (3 forwards); validation, test and predict are forward only
        per_token = training_flops_per_token if self.trainer.training else forward_flops_per_token
        return per_token(self.config, seq_len) * seq_len * batch_size

    # ----- checkpoints -----
    def on_validation_start(self) -> None:
        self._maybe_init_from()  # the step-0 validation must already see the source's weights
        if not self.trainer.sanity_checking:
            # set at the start: every checkpoint written after this point follows this validation
            self.validated_step = self.trainer.global_step

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
        source.check_final("model.init_from")
        load_model_weights(self.model, source.state_dict)
        self._init_from_done = True

    def on_train_end(self) -> None:
        """Save the final state to every `save_last` checkpoint (Lightning writes `last.ckpt` at
        the end of a fit only if it saved nothing during it), unless the last save already holds it."""
        trainer = self.trainer
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        if self._saved_state == (trainer.global_step, self.validated_step, True):
            return
        from lightning.pytorch.callbacks import ModelCheckpoint

        self._saving_final = True
        try:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                    path = callback.last_model_path or callback.format_checkpoint_name(
                        {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)},
                        callback.CHECKPOINT_NAME_LAST)
                    trainer.save_checkpoint(path, weights_only=callback.save_weights_only)
                    callback.last_model_path = path
        finally:
            self._saving_final = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self.trainer
        max_steps = int(trainer.max_steps)
        final = self._saving_final or 0 < max_steps <= trainer.global_step
        checkpoint.setdefault(CHECKPOINT_KEY, {}).update({
            "kind": "moe" if self.config.is_moe else "dense",
            "tokenizer": self.tokenizer_fingerprint,
            "tokenizer_files": self.tokenizer_files,
            "val_domains": self.val_domain_names,
            "initial_val_metrics": self.initial_val_metrics,
            # which step this is, of how many, and whether the fit ended here: the next stage
            # (`init_from`, UpcyclingCallback, the pipeline) refuses a checkpoint that is not final
            "global_step": int(trainer.global_step),
            "max_steps": max_steps,
            "final": bool(final),
            "validated_step": self.validated_step,
        })
        self._saved_state = (trainer.global_step, self.validated_step, bool(final))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from bam_lightning.checkpoint import describe_config_mismatch

        stored = checkpoint.get("hyper_parameters", {}).get("config")
        if stored is not None:
            if not isinstance(stored, ModelConfig):
                stored = ModelConfig.from_dict(dict(stored), "checkpoint hyper_parameters.config")
            problem = describe_config_mismatch(stored, self.config)
            if problem:
                raise UserError(f"checkpoint does not match model.config: {problem}")
        meta = checkpoint.get(CHECKPOINT_KEY, {})
        self.initial_val_metrics = dict(meta.get("initial_val_metrics", {}))
        self.validated_step = meta.get("validated_step")
        if "global_step" in meta:  # a fit resumed from its final checkpoint need not write it again
            self._saved_state = (meta["global_step"], self.validated_step, bool(meta.get("final")))
        ours, theirs = self.tokenizer_fingerprint, meta.get("tokenizer")
        if ours and theirs and ours != theirs:
            raise UserError(f"checkpoint was trained with tokenizer {theirs!r} but the data uses {ours!r}")


class DocumentSums(Metric):
    """Per validation document: summed target-token loss, token count and byte count (float64,
    summed over ranks), so domain metrics are exact token-weighted means and the report can
    resample documents."""

    full_state_update = False

    def __init__(self, n_documents: int):
        super().__init__()
        self.add_state("sums", torch.zeros(max(1, n_documents), 3, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, documents: torch.Tensor, losses: torch.Tensor, n_bytes: torch.Tensor | None) -> None:
        values = torch.stack([losses.double(), torch.ones_like(losses, dtype=torch.float64),
                              torch.zeros_like(losses, dtype=torch.float64) if n_bytes is None
                              else n_bytes.double()], dim=1)
        self.sums.index_add_(0, documents.to(self.sums.device), values)

    def compute(self) -> torch.Tensor:
        return self.sums


class RouterMeans(Metric):
    """Per layer: summed attention gates and top-1 FFN shares, weighted by each batch's tokens,
    and the tokens (float64, summed over ranks), so the means weight every window alike however
    the windows were batched and shared out."""

    full_state_update = False

    def __init__(self, n_layer: int, attn_experts: int, n_experts: int):
        super().__init__()
        for name, width in (("gate", attn_experts), ("load", n_experts)):
            self.add_state(name, torch.zeros(n_layer, max(1, width), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{name}_tokens", torch.zeros(n_layer, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: list[RouterStats], n_tokens: int) -> None:
        for layer, s in enumerate(stats):
            for name, value in (("gate", s.attn_gate_mean), ("load", s.expert_fraction)):
                if value is not None:
                    getattr(self, name)[layer, :value.numel()] += value.detach().double().to(self.gate.device) * n_tokens
                    getattr(self, f"{name}_tokens")[layer] += n_tokens

    def compute(self) -> tuple[torch.Tensor, ...]:
        return self.gate, self.gate_tokens, self.load, self.load_tokens


class DenseLM(BaseLM):
    """A dense seed or a continued-pre-training branch of it."""

    expects_moe = False


class MoELM(BaseLM):
    """A BAM / BTX / sparse-upcycled mixture: adds router losses and their statistics."""

    expects_moe = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.val_router = nn.ModuleDict()  # domain -> RouterMeans of the running validation

    def _add_val_metrics(self, domain: str) -> None:
        super()._add_val_metrics(domain)
        if domain not in self.val_router:
            cfg = self.config
            self.val_router[domain] = RouterMeans(cfg.n_layer, cfg.attn_experts, cfg.n_experts).to(self.device)

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
        self.val_router[domain].update(stats, batch.shape[0] * (batch.shape[1] - 1))

    def val_router_metrics(self, domain: str) -> dict[str, float]:
        """Token-weighted means over every rank's windows (the same for any number of ranks);
        `val/<domain>/attn_gate/layer<l>/expert<e>` and `val/<domain>/ffn_load/...`."""
        means = self.val_router[domain]
        if means.update_count == 0:  # this rank scored no window: it still joins the sums
            means.update([], 0)
        n_layer = self.config.n_layer  # torchmetrics squeezes one-element results: restore the shapes
        gate, gate_tokens, load, load_tokens = (t.double().cpu().reshape(n_layer, -1) for t in means.compute())
        gate_tokens, load_tokens = gate_tokens[:, 0], load_tokens[:, 0]
        means.reset()
        logs = {}
        for kind, values, tokens in (("attn_gate", gate, gate_tokens), ("ffn_load", load, load_tokens)):
            for layer in range(len(tokens)):
                if tokens[layer] > 0:
                    for e, value in enumerate((values[layer] / tokens[layer]).tolist()):
                        logs[f"val/{domain}/{kind}/layer{layer}/expert{e}"] = value
        return logs


def check_optimizer_settings(lr: float, min_lr_ratio: float, warmup_steps: int, weight_decay: float,
                             betas: tuple[float, float]) -> None:
    """Refuse what AdamW or the schedule would refuse, when the recipe is read (before a run
    writes anything), naming the recipe key."""
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise UserError(f"model.init_args.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if warmup_steps < 0:
        raise UserError(f"model.init_args.warmup_steps must be >= 0, got {warmup_steps}")
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    except (ValueError, TypeError) as error:
        raise UserError(f"model.init_args (lr={lr!r}, betas={betas!r}, weight_decay={weight_decay!r}): "
                         f"AdamW refuses it: {error}") from error


def batch_tokens(batch: Any) -> torch.Tensor:
    """The [B, T+1] token windows of a batch: BAMDataModule's validation batches are dicts that
    also carry each target's document; training batches and plain loaders give the tensor."""
    return batch["tokens"] if isinstance(batch, dict) else batch


def check_seq_len(datamodule: Any, config: ModelConfig) -> None:
    """Training windows must fit the model's context; otherwise the first forward fails far from the cause."""
    seq_len = getattr(datamodule, "seq_len", None)
    if seq_len is not None and seq_len > config.max_seq_len:
        raise UserError(f"data.seq_len ({seq_len}) is longer than model.init_args.config.max_seq_len "
                         f"({config.max_seq_len}); shorten the first or raise the second")
