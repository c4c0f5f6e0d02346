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
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from bam_lightning.checkpoint import load_model_weights
from bam_lightning.config import ModelConfig
from bam_lightning.lit import BaseLM
from bam_lightning.upcycle import METHODS, read_sources, upcycle_from_checkpoints


class UpcyclingCallback(L.Callback):
    def __init__(self, sources: list[str], method: str = "bam", seed_index: int = 0, router_seed: int = 0):
        """
        Args:
            sources: dense checkpoint paths (`.ckpt` or `.safetensors`) in expert order; expert j
                comes from sources[j]. The seed is one of them.
            method: bam (Expert-KV), bam_shared_kv, btx or sparse.
            seed_index: which source is the seed (sparse copies it; parameter-matched BTX copies
                its FFN into the extra experts).
            router_seed: seeds the routers' random initialisation.
        """
        if method not in METHODS:  # fail when the recipe is parsed, not at the first step
            raise ValueError(f"unknown upcycling method {method!r}; choose one of {list(METHODS)}")
        self.sources = [str(s) for s in sources]
        self.method = method
        self.seed_index = seed_index
        self.router_seed = router_seed
        self.provenance: dict[str, Any] | None = None
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

    def state_dict(self) -> dict[str, Any]:
        return {"upcycled_from": self.provenance}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.provenance = state_dict.get("upcycled_from")
