"""UpcyclingCallback: build the mixture from dense checkpoints at the start of the first fit.

A thin adapter around `bam_lightning.upcycle`: read and validate the dense sources, build the
mixture, load it into `pl_module.model` once, and never on resume (the checkpoint already holds
the trained mixture, and the sources need not exist any more). The sources are memory-mapped and streamed
into the model's own tensors, so peak memory stays about one mixture. Under FSDP2
(`ModelParallelStrategy`) every rank builds the full mixture from the sources and
`load_model_weights` keeps its shard, so it gets the same weights as a single process.

When: Lightning tells a resume apart (`trainer.ckpt_path`) only once it restores the checkpoint,
and under `ModelParallelStrategy` that happens *after* `on_fit_start`. So the mixture is built at
the first hook after every restore point and before any forward: `on_sanity_check_start` (the
step-0 validation already sees the mixture), else `on_train_start`. A bad source still fails
before the first training step, with the file and key in the message.

Provenance (which source became which expert) is the callback's state, saved in
`checkpoint["callbacks"]["UpcyclingCallback"]["upcycled_from"]` and restored on resume.

Function preservation: a mixture of a *pretrained* seed should start where the seed is. With the
paper's gate (softmax, top-1, no renormalisation) every FFN output is scaled by p_top ~ 1/E, and
over many layers that wrecks a pretrained model (SmolLM2 x4: LM loss 4.31 -> 14.5 at
initialisation); `ffn_gate_scale: E` or `ffn_renormalize: true` keeps it (4.31). So at the first
validation after upcycling (the step-0 one: `num_sanity_val_steps: -1`) the seed itself is run
on the same batches and both losses are logged side by side: a "function preservation" line in
the log and `upcycling/{seed,mixture}_val_loss` in TensorBoard.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.tensor import DTensor

from bam_lightning.checkpoint import load_model_weights, read_checkpoint
from bam_lightning.config import ModelConfig
from bam_lightning.lit import BaseLM, batch_tokens
from bam_lightning.upcycle import METHODS, read_sources, upcycle_from_checkpoints


class UpcyclingCallback(L.Callback):
    def __init__(self, sources: list[str], method: str = "bam", seed_index: int = 0, router_seed: int = 0,
                 check_function_preservation: bool = True):
        """
        Args:
            sources: dense checkpoint paths (`.ckpt` or `.safetensors`) in expert order; expert j
                comes from sources[j]. The seed is one of them.
            method: bam (Expert-KV), bam_shared_kv, btx or sparse.
            seed_index: which source is the seed (sparse copies it; parameter-matched BTX copies
                its FFN into the extra experts).
            router_seed: seeds the routers' random initialisation.
            check_function_preservation: at the step-0 validation, also run the seed (one dense
                model more in memory, once) and log its loss next to the mixture's.
        """
        if method not in METHODS:  # fail when the recipe is parsed, not at the first step
            raise ValueError(f"unknown upcycling method {method!r}; choose one of {list(METHODS)}")
        self.sources = [str(s) for s in sources]
        self.method = method
        self.seed_index = seed_index
        self.router_seed = router_seed
        self.provenance: dict[str, Any] | None = None
        self.check_function_preservation = check_function_preservation
        self.function_preservation: dict[str, float] | None = None
        self._seed_model: torch.nn.Module | None = None
        self._seed_losses: dict[int, list[float]] = {}  # dataloader -> [loss * tokens, tokens]
        self._pending = False  # True from setup until this fit has decided whether to upcycle

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, BaseLM) or not pl_module.config.is_moe:
            raise ValueError(f"UpcyclingCallback needs a mixture module (MoELM), got {type(pl_module).__name__}")
        if pl_module.hparams.get("init_from"):
            raise ValueError(f"UpcyclingCallback and init_from={pl_module.hparams.init_from!r} would both "
                             "initialise the model; use one")
        self._pending = self.provenance is None  # once per callback: a second fit() continues training

    def check_sources(self, moe_config: ModelConfig, tokenizer: str | None = None) -> None:
        """Every source is readable, fits `moe_config` and holds the final step of its fit (see
        `SourceCheckpoint.check_final`). `bam fit` calls this before it writes anything."""
        for source in read_sources(self.sources, moe_config, self.method, seed_index=self.seed_index,
                                   tokenizer=tokenizer):
            source.check_final("UpcyclingCallback (init_args.sources)")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._upcycle_unless_resumed(trainer, pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._upcycle_unless_resumed(trainer, pl_module)

    def _upcycle_unless_resumed(self, trainer: L.Trainer, pl_module: BaseLM) -> None:
        if not self._pending:
            return
        self._pending = False
        if trainer.ckpt_path is not None:
            return
        self.check_sources(pl_module.config, pl_module.tokenizer_fingerprint)
        model = pl_module.model
        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        with torch.no_grad():
            # unsharded: stream the mixture straight into the model's own tensors (peak memory
            # about one mixture); sharded: build the full tensors, then scatter each rank's shard
            state, self.provenance = upcycle_from_checkpoints(
                self.sources, pl_module.config, self.method, seed_index=self.seed_index,
                router_seed=self.router_seed, tokenizer=pl_module.tokenizer_fingerprint,
                out=None if sharded else model.state_dict())
        if sharded:
            load_model_weights(model, state)
        elif self.check_function_preservation:
            self._load_seed(pl_module)

    # ----- function preservation -----
    def _load_seed(self, pl_module: BaseLM) -> None:
        from bam_lightning.model import GPT

        source = read_checkpoint(self.sources[self.seed_index])
        with torch.device("meta"):
            seed = GPT(source.config)
        seed.load_state_dict(source.state_dict, assign=True)
        self._seed_model = seed.to(device=pl_module.device, dtype=next(pl_module.model.parameters()).dtype).eval()
        self._seed_losses = {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._seed_model is None:
            return
        batch = batch_tokens(batch)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            logits, _ = self._seed_model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        tokens = batch[:, 1:].numel()
        total = self._seed_losses.setdefault(dataloader_idx, [0.0, 0])
        total[0] += loss.item() * tokens
        total[1] += tokens

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._seed_model is None:
            return
        self._seed_model = None  # once: the first validation after upcycling
        if trainer.global_step != 0 or not self._seed_losses:
            rank_zero_info("[bam upcycling] function preservation not measured: the first validation came "
                           "after training started (set num_sanity_val_steps: -1 for a step-0 validation)")
            return
        seed_loss = sum(s / n for s, n in self._seed_losses.values()) / len(self._seed_losses)
        mixture_metrics = pl_module.initial_val_metrics if trainer.sanity_checking else trainer.callback_metrics
        domain_losses = [float(v) for k, v in mixture_metrics.items()
                         if k.startswith("val/") and k.endswith("/loss") and k != "val/avg/loss"]
        if not domain_losses:
            return
        mixture_loss = sum(domain_losses) / len(domain_losses)  # val/avg/loss: the mean over domains
        self.function_preservation = {"seed_val_loss": seed_loss, "mixture_val_loss": mixture_loss,
                                      "gap": mixture_loss - seed_loss}
        rank_zero_info(f"[bam upcycling] function preservation: mixture val/avg/loss {mixture_loss:.4f} at "
                       f"initialisation vs seed {seed_loss:.4f} ({mixture_loss - seed_loss:+.4f})")
        if mixture_loss - seed_loss > 0.5:
            config = pl_module.config
            rank_zero_warn(f"the upcycled mixture starts {mixture_loss - seed_loss:.2f} nats above its seed: with "
                           f"ffn_top_k={config.ffn_top_k} and ffn_renormalize={config.ffn_renormalize} every FFN "
                           f"output is scaled by its gate; for a pretrained seed set ffn_gate_scale: "
                           f"{config.n_experts} or ffn_renormalize: true (README, 'Pretrained seeds')")
        for logger in trainer.loggers:
            logger.log_metrics({f"upcycling/{k}": v for k, v in self.function_preservation.items()},
                               step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"upcycled_from": self.provenance, "function_preservation": self.function_preservation}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.provenance = state_dict.get("upcycled_from")
        self.function_preservation = state_dict.get("function_preservation")
