"""`BAMDataModule`: weighted multi-domain training stream and one validation set per domain.

Training mixes one shuffled litdata stream per domain by `train_weights` (an expert's recipe
gives its own domain weight 1 and the rest 0; the mixture gives them all weight). Validation
reads the first `val_tokens_per_domain` tokens of each held-out domain split, in a fixed order,
so every model is scored on exactly the same tokens.

Batches are `LongTensor[batch_size, seq_len + 1]`: the model takes inputs `[:, :-1]` and
targets `[:, 1:]`. Documents are joined by the tokenizer's EOS id, so windows cross them.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bam_lightning.data.corpora import BUILTIN, BUILTIN_DOMAINS, default_cache_dir
from bam_lightning.data.hf_tokenizer import find_tokenizer_json
from bam_lightning.data.prepare import (
    check_reusable,
    default_data_dir,
    load_all_documents,
    prepare,
    prepare_settings,
    read_manifest,
)
from bam_lightning.data.tokenizer import TOKENIZER_FILE, load_tokenizer

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # it becomes a folder and a metric name


def collate_tokens(blocks: list[np.ndarray]) -> torch.Tensor:
    """Stack token blocks (stored as uint16/uint32) into one int64 batch."""
    return torch.from_numpy(np.stack(blocks).astype(np.int64))


class FirstBlocks(Dataset):
    """The first `n_blocks` windows of a non-shuffled `StreamingDataset`, as a map-style dataset:
    a fixed, cheap validation set that Lightning can shard over ranks like any other."""

    def __init__(self, dataset: Any, n_blocks: int):
        self.dataset = dataset
        self.n_blocks = n_blocks

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> np.ndarray:
        return self.dataset[index]


class TrainBatches:
    """Iterates the training `StreamingDataLoader` and keeps the loader's state after each batch
    it hands out. Lightning fetches one batch ahead of the one it trains on, so the loader's own
    state at checkpoint time is one batch too far; the data module records instead the state
    after the batch that was actually used (see `BAMDataModule.on_before_batch_transfer`)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.states_after: deque[dict[str, Any]] = deque()

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.states_after.clear()
        for batch in self.loader:
            self.states_after.append(self.loader.state_dict())
            yield batch


class BAMDataModule(L.LightningDataModule):
    """Offline multi-domain language-modelling data for dense seeds, experts and mixtures.

    Args:
        domains: name -> "builtin" (one of code, legal, literature, math) or a path, folder,
            glob, or list of them, to `.txt` (a document per file) or `.jsonl` (a document per
            line, "text" field) files. None means the four built-in domains.
        train_weights: name -> sampling weight for training. None gives every domain the same
            weight; a domain left out of the dict is not trained on (weight 0).
        val_domains: domains with a validation loader, in this order. None means all domains.
        tokenizer: "byte" (UTF-8 bytes + EOS, 257 ids) or "bpe" (byte-level BPE trained on the
            training split of all domains), or the path of a pretrained model's tokenizer.json
            (or its folder, e.g. what `bam import-hf` writes): its vocabulary and EOS.
        bpe_vocab_size: vocabulary size for "bpe" (may come out smaller on tiny corpora).
        seq_len: tokens a model sees per window; batches hold `seq_len + 1` tokens.
        batch_size: windows per batch, for training and validation.
        val_fraction: share of each domain's documents held out (at least one document).
        val_tokens_per_domain: validation reads only this many tokens per domain (rounded down
            to whole windows, at least one window).
        max_bytes_per_domain: text per domain, chosen by a seeded shuffle of documents.
        data_dir: where prepared data goes; None: a folder under the cache dir named by a hash
            of every setting that changes the data, so settings never collide and are reused.
        seed: seeds the byte cap, the split, and the training stream's shuffling and mixing.
        order_seed: seeds only the training stream's shuffling and mixing (None: `seed`), so a
            repeat with another data order keeps the same documents and validation set.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        domains: dict[str, str | list[str]] | None = None,
        train_weights: dict[str, float] | None = None,
        val_domains: list[str] | None = None,
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        val_tokens_per_domain: int = 65536,
        max_bytes_per_domain: int = 8_000_000,
        data_dir: str | None = None,
        seed: int = 1234,
        order_seed: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.domains = (
            dict(domains) if domains is not None else dict.fromkeys(BUILTIN_DOMAINS, BUILTIN)
        )
        _check_arguments(
            self.domains,
            tokenizer,
            bpe_vocab_size,
            seq_len,
            batch_size,
            val_fraction,
            val_tokens_per_domain,
            max_bytes_per_domain,
            num_workers,
        )
        self.train_weights = _normalised_weights(self.domains, train_weights)
        self.val_domain_names: list[str] = _checked_val_domains(self.domains, val_domains)
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.val_tokens_per_domain = val_tokens_per_domain
        self.max_bytes_per_domain = max_bytes_per_domain
        self.data_dir_argument = data_dir
        self.seed = seed
        self.order_seed = seed if order_seed is None else order_seed
        self.num_workers = num_workers

        # Known after setup() (data_dir after prepare_data(); vocab_size at once for bytes).
        self.data_dir: Path | None = None
        self.manifest: dict[str, Any] | None = None
        self.vocab_size: int | None = 257 if tokenizer == "byte" else None
        self.tokenizer_fingerprint: str | None = "byte" if tokenizer == "byte" else None
        self.bytes_per_token: dict[str, float] = {}
        self.train_token_counts: dict[str, int] = {}
        self._train_batches: TrainBatches | None = None
        self._trained_state: dict[str, Any] | None = None  # loader state after the last used batch
        self._pending_train_state: dict[str, Any] | None = None

    # --- preparation --------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return prepare_settings(
            self.domains,
            self.tokenizer_kind,
            self.bpe_vocab_size,
            self.val_fraction,
            self.max_bytes_per_domain,
            self.seed,
        )

    def _resolve_data_dir(self, settings: dict[str, Any]) -> Path:
        if self.data_dir_argument is not None:
            return Path(self.data_dir_argument).expanduser()
        return default_data_dir(settings, default_cache_dir())

    def prepare_data(self) -> None:
        """Validate every source, then build what is missing. Runs once per node (rank 0)."""
        settings = self._settings()  # resolves user paths: missing files fail here
        data_dir = self.data_dir = self._resolve_data_dir(settings)
        if check_reusable(data_dir, settings):
            return
        documents = load_all_documents(
            self.domains, self.max_bytes_per_domain, self.seed, default_cache_dir()
        )
        prepare(data_dir, documents, settings)

    def setup(self, stage: str | None = None) -> None:
        settings = self._settings()
        data_dir = self._resolve_data_dir(settings)
        manifest = read_manifest(data_dir)
        if manifest is None:
            raise FileNotFoundError(f"no prepared data in {data_dir}: call prepare_data() first")
        if manifest["settings"] != settings:
            raise ValueError(
                f"{data_dir} holds data prepared with other settings; run prepare_data()"
            )
        self.data_dir, self.manifest = data_dir, manifest
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]
        counts = manifest["domains"]
        self.train_token_counts = {d: counts[d]["train"]["tokens"] for d in self.domains}
        self.bytes_per_token = {
            d: counts[d]["val"]["bytes"] / counts[d]["val"]["tokens"] for d in self.domains
        }
        used = [(d, "train") for d in self.domains if self.train_weights[d] > 0]
        for domain, split in used + [(d, "val") for d in self.val_domain_names]:
            if counts[domain][split]["tokens"] < self.seq_len + 1:
                raise ValueError(
                    f"domain {domain!r}: the {split} split has {counts[domain][split]['tokens']} "
                    f"tokens, fewer than one window of seq_len + 1 = {self.seq_len + 1}"
                )

    @property
    def tokenizer(self):
        """The tokenizer the data was prepared with (after `setup()`)."""
        if self.data_dir is None:
            raise RuntimeError("call setup() first")
        return load_tokenizer(
            "byte" if self.tokenizer_kind == "byte" else str(self.data_dir / TOKENIZER_FILE)
        )

    # --- loaders ------------------------------------------------------------------------------

    def _split_dir(self, domain: str, split: str) -> str:
        assert self.data_dir is not None, "call setup() first"
        return str(self.data_dir / domain / split)

    def train_dataloader(self) -> TrainBatches:
        from litdata import (
            CombinedStreamingDataset,
            StreamingDataLoader,
            StreamingDataset,
            TokensLoader,
        )

        trained = [d for d in self.domains if self.train_weights[d] > 0]
        datasets = [
            StreamingDataset(
                self._split_dir(d, "train"),
                item_loader=TokensLoader(block_size=self.seq_len + 1),
                shuffle=True,
                seed=self.order_seed,
            )
            for d in trained
        ]
        # iterate_over_all=False: keep sampling by weight until one domain runs out (one "epoch").
        combined = CombinedStreamingDataset(
            datasets,
            seed=self.order_seed,
            iterate_over_all=False,
            weights=[self.train_weights[d] for d in trained],
        )
        loader = StreamingDataLoader(
            combined,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_tokens,
        )
        if self._pending_train_state is not None:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        self._train_batches, self._trained_state = TrainBatches(loader), None
        return self._train_batches

    def val_dataloader(self) -> list[DataLoader]:
        from litdata import StreamingDataset, TokensLoader

        block = self.seq_len + 1
        loaders = []
        for domain in self.val_domain_names:
            dataset = StreamingDataset(
                self._split_dir(domain, "val"), item_loader=TokensLoader(block_size=block)
            )
            index = json.loads(Path(self._split_dir(domain, "val"), "index.json").read_text())
            available = sum(chunk["dim"] // block for chunk in index["chunks"])
            n_blocks = min(available, max(1, self.val_tokens_per_domain // block))
            loaders.append(
                DataLoader(
                    FirstBlocks(dataset, n_blocks),
                    batch_size=self.batch_size,
                    num_workers=self.num_workers,
                    collate_fn=collate_tokens,
                )
            )
        return loaders

    # --- resuming -----------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this once per batch it is about to use: note the loader's state."""
        batches = self._train_batches
        if (
            self.trainer is not None
            and self.trainer.training
            and batches is not None
            and batches.states_after
        ):
            self._trained_state = batches.states_after.popleft()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position; Lightning stores it in checkpoints."""
        if self._trained_state is not None:  # inside a Trainer: after the last batch trained on
            return {"train_loader": self._trained_state}
        if self._train_batches is not None:  # iterated by hand: after the last batch yielded
            return {"train_loader": self._train_batches.loader.state_dict()}
        if self._pending_train_state is not None:
            return {"train_loader": self._pending_train_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it. Lightning calls this before
        it asks for the train loader, so the state waits for `train_dataloader()`."""
        state = state_dict.get("train_loader")
        if state is None:
            return
        if self._train_batches is not None:
            self._train_batches.loader.load_state_dict(state)
            self._trained_state = None
        else:
            self._pending_train_state = state


# --- argument checks (cheap, at construction, so a bad recipe fails before any work) ----------


def _check_arguments(
    domains: dict[str, Any],
    tokenizer: str,
    bpe_vocab_size: int,
    seq_len: int,
    batch_size: int,
    val_fraction: float,
    val_tokens_per_domain: int,
    max_bytes_per_domain: int,
    num_workers: int,
) -> None:
    if not domains:
        raise ValueError("domains is empty: give at least one domain")
    for name, source in domains.items():
        if not isinstance(name, str) or not _DOMAIN_NAME.match(name):
            raise ValueError(f"domain name {name!r} must use only letters, digits, '_', '-' or '.'")
        if source == BUILTIN and name not in BUILTIN_DOMAINS:
            raise ValueError(
                f"domains[{name!r}] = 'builtin', but there is no built-in {name!r} corpus; "
                f"built-ins are {', '.join(BUILTIN_DOMAINS)} (or give a path/glob)"
            )
        if not isinstance(source, (str, list)) or (
            isinstance(source, list) and not all(isinstance(s, str) for s in source)
        ):
            raise ValueError(f"domains[{name!r}] must be 'builtin', a path/glob, or a list of them")
    if tokenizer not in ("byte", "bpe") and find_tokenizer_json(tokenizer) is None:
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}; or the path of a "
                         "pretrained model's tokenizer.json (or its folder)")
    if tokenizer == "bpe" and bpe_vocab_size <= 257:
        raise ValueError(f"bpe_vocab_size must exceed 257 (bytes + EOS), got {bpe_vocab_size}")
    positive = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "val_tokens_per_domain": val_tokens_per_domain,
        "max_bytes_per_domain": max_bytes_per_domain,
    }
    for field, value in positive.items():
        if value < 1:
            raise ValueError(f"{field} must be at least 1, got {value}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _normalised_weights(
    domains: dict[str, Any], weights: dict[str, float] | None
) -> dict[str, float]:
    if weights is None:
        return {domain: 1 / len(domains) for domain in domains}
    for name, weight in weights.items():
        if name not in domains:
            raise ValueError(
                f"train_weights names unknown domain {name!r}; known domains: {', '.join(domains)}"
            )
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"train_weights[{name!r}] must be a finite number >= 0, got {weight}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(
            f"train_weights are all zero: {weights}; give at least one domain a positive weight"
        )
    return {domain: weights.get(domain, 0.0) / total for domain in domains}


def _checked_val_domains(domains: dict[str, Any], val_domains: list[str] | None) -> list[str]:
    if val_domains is None:
        return list(domains)
    if not val_domains:
        raise ValueError("val_domains is empty; use None for all domains (or limit_val_batches=0)")
    for name in val_domains:
        if name not in domains:
            raise ValueError(
                f"val_domains names unknown domain {name!r}; known domains: {', '.join(domains)}"
            )
    return list(val_domains)
