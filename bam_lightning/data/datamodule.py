"""`BAMDataModule`: weighted multi-domain training stream and one validation set per domain.

Training mixes the domains by `train_weights` (an expert's recipe gives its own domain weight 1
and the rest 0; the mixture gives them all weight) in a stream that is a pure function of the
order seed and the sample index (see stream.py): a checkpoint stores one number, the samples
trained, and resuming (also a resumed run, with any number of workers) continues the very same
stream; `num_workers` changes the speed only. Validation scores `val_tokens_per_domain` tokens
per domain in windows spread evenly over the whole held-out split, the same for every model, and
keeps per-document sums so the report can bootstrap over validation documents. With several
processes each rank scores a contiguous share of those windows, each window exactly once, so every
validation number is the same for any number of processes (see `rank_batches` in stream.py).

Batches are `LongTensor[batch_size, seq_len + 1]`: the model takes inputs `[:, :-1]` and
targets `[:, 1:]`. Documents are joined by the tokenizer's EOS id, so windows cross them.
The prepared splits are litdata datasets, and litdata reads the windows (see prepare.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from bam_lightning.data.corpora import BUILTIN, BUILTIN_DOMAINS, default_cache_dir
from bam_lightning.data.hf_tokenizer import find_tokenizer_json
from bam_lightning.data.prepare import (
    check_reusable,
    default_data_dir,
    load_all_documents,
    prepare,
    prepare_settings,
    read_manifest,
    window_starts,
)
from bam_lightning.data.stream import (
    TrainBatchesByIndex,
    TrainStream,
    ValidationLoader,
    ValidationWindows,
)
from bam_lightning.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from bam_lightning.errors import UserError

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # it becomes a folder and a metric name


STATE_VERSION = 2  # 1: litdata loader state (not resumable exactly; refused)


class TrainBatches:
    """The training batches from the data module's current position to the end of the epoch.

    An epoch is `epoch_batches` batches (every trained window once, on average); the stream
    itself runs on across epochs. With several processes, global batch g goes to rank
    g mod world_size, so the global stream is the same for any number of processes: step s of a
    run on N processes trains global batches N*s .. N*s + N-1, which are, in rank order, the
    samples of batch s of a 1-process run with N times the batch size. DDP averages the ranks'
    gradients, so a dense model trains as that run does up to float rounding of the reduction
    (tests/test_training_processes.py). A mixture's load-balancing loss is computed per rank from
    that rank's routing fractions, as in any data-parallel MoE, so it is the average of N
    half-batch losses rather than the full batch's. The position advances as batches are handed
    out; Lightning fetches one batch ahead of the one it trains on, so the data module also counts
    the batches actually trained (see `BAMDataModule.on_before_batch_transfer`)."""

    def __init__(self, datamodule: BAMDataModule, dataset: TrainBatchesByIndex, epoch_batches: int):
        self.datamodule, self.dataset, self.epoch_batches = datamodule, dataset, epoch_batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        data = self.datamodule
        rank, world = data.rank_and_world()
        first = data.position_batches()  # global: batch g goes to rank g mod world
        if first % world:
            raise UserError(
                f"cannot resume: the checkpoint's stream position ({first} batches) is not a "
                f"multiple of this run's {world} processes (trainer devices x num_nodes)"
            )
        epoch = max(world, self.epoch_batches // world * world)
        last = (first // epoch + 1) * epoch
        data._iteration_start, data._yielded, data._trained = first, first, None
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=range(first + rank, last, world),
            num_workers=data.num_workers,
        )
        for batch in loader:
            data._yielded += world
            yield batch


class BAMDataModule(L.LightningDataModule):
    """Offline multi-domain language-modelling data for dense seeds, experts and mixtures.

    Args:
        domains: name -> "builtin" (one of code, legal, literature, math) or a path, folder,
            glob, or list of them, to `.txt` (a document per file), `.jsonl` / `.jsonl.gz` /
            `.jsonl.zst` (a document per line, "text" field), `.parquet` / `.arrow` (a document
            per row, "text" column) files or Hugging Face `save_to_disk` folders. A folder is
            read whole; a file in it of another type is an error (hidden files are skipped).
            None means the four built-in domains.
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
        val_tokens_per_domain: validation scores this many tokens per domain (rounded down
            to whole windows, at least one window), in windows spread evenly over the split.
        max_bytes_per_domain: text per domain, chosen by a seeded shuffle of documents.
        data_dir: where prepared data goes; None: a folder under the cache dir named by a hash
            of every setting that changes the data, so settings never collide and are reused.
        seed: seeds the byte cap, the split, and the training stream's shuffling and mixing.
        order_seed: seeds only the training stream's shuffling and mixing (None: `seed`), so a
            repeat with another data order keeps the same documents and validation set.
        num_workers: DataLoader worker processes (speed only: the stream does not depend on it).
        text_fields: domain -> the JSON field or Parquet/Arrow column holding its documents
            (None, or a domain left out: "text").
        prepare_workers: `litdata.optimize` worker processes that tokenize the documents while
            the data is prepared, for "bpe" or a tokenizer.json ("byte" needs no tokenizing: one
            worker copies the bytes). Speed only: the prepared data is the same for any count.
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
        text_fields: dict[str, str] | None = None,
        prepare_workers: int = 1,
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
            prepare_workers,
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
        for name, field in (text_fields or {}).items():
            if name not in self.domains or not isinstance(field, str) or not field:
                raise UserError(f"text_fields[{name!r}] = {field!r}: give a known domain "
                                 f"({', '.join(self.domains)}) and a non-empty field name")
        self.text_fields = dict(text_fields) if text_fields else None
        self.prepare_workers = prepare_workers

        # Known after setup() (data_dir after prepare_data(); vocab_size at once for bytes).
        self.data_dir: Path | None = None
        self.manifest: dict[str, Any] | None = None
        self.vocab_size: int | None = 257 if tokenizer == "byte" else None
        self.tokenizer_fingerprint: str | None = "byte" if tokenizer == "byte" else None
        self.train_token_counts: dict[str, int] = {}
        self.chunk_tokens: dict[tuple[str, str], list[int]] = {}  # (domain, split) -> litdata chunk sizes
        self.val_document_counts: dict[str, int] = {}
        # Stream position, in batches: handed out, trained (in a Trainer), restored (on resume).
        self._yielded: int | None = None
        self._trained: int | None = None
        self._restored: int = 0
        self._iteration_start: int = 0

    # --- preparation --------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return prepare_settings(
            self.domains,
            self.tokenizer_kind,
            self.bpe_vocab_size,
            self.val_fraction,
            self.max_bytes_per_domain,
            self.seed,
            self.text_fields,
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
            self.domains, self.max_bytes_per_domain, self.seed, default_cache_dir(), self.text_fields
        )
        prepare(data_dir, documents, settings, self.prepare_workers)

    def setup(self, stage: str | None = None) -> None:
        settings = self._settings()
        data_dir = self._resolve_data_dir(settings)
        manifest = read_manifest(data_dir)
        if manifest is None:
            raise FileNotFoundError(f"no prepared data in {data_dir}: call prepare_data() first")
        if manifest["settings"] != settings:
            check_reusable(data_dir, settings)  # names an older format, if that is the cause
            raise UserError(
                f"{data_dir} holds data prepared with other settings; run prepare_data()"
            )
        self.data_dir, self.manifest = data_dir, manifest
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]
        counts = manifest["domains"]
        self.train_token_counts = {d: counts[d]["train"]["tokens"] for d in self.domains}
        self.val_document_counts = {d: counts[d]["val"]["documents"] for d in self.domains}
        self.chunk_tokens = {(d, s): counts[d][s]["chunk_tokens"] for d in self.domains for s in ("train", "val")}
        used = [(d, "train") for d in self.domains if self.train_weights[d] > 0]
        for domain, split in used + [(d, "val") for d in self.val_domain_names]:
            if len(window_starts(self.chunk_tokens[domain, split], self.seq_len + 1)) < 1:
                raise UserError(
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

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of every token id (after `setup()`): bpb counts the scored tokens' bytes."""
        return self.tokenizer.token_byte_lengths()

    # --- loaders ------------------------------------------------------------------------------

    def _split_dir(self, domain: str, split: str) -> Path:
        assert self.data_dir is not None, "call setup() first"
        return self.data_dir / domain / split

    def train_stream(self) -> TrainStream:
        """Which (domain, window) every training sample reads (after `setup()`)."""
        trained = [d for d in self.domains if self.train_weights[d] > 0]
        block = self.seq_len + 1
        return TrainStream(
            trained,
            [len(window_starts(self.chunk_tokens[d, "train"], block)) for d in trained],
            [self.train_weights[d] for d in trained],
            self.order_seed,
        )

    def train_dataloader(self) -> TrainBatches:
        stream = self.train_stream()
        dirs = [self._split_dir(d, "train") for d in stream.names]
        dataset = TrainBatchesByIndex(dirs, stream, self.batch_size, self.seq_len + 1)
        epoch_batches = max(1, sum(stream.window_counts) // self.batch_size)
        return TrainBatches(self, dataset, epoch_batches)

    def val_dataloader(self) -> list[ValidationLoader]:
        """One loader per validation domain. With several processes each rank scores its own
        contiguous share of the windows, every window exactly once (see `rank_batches`)."""
        block = self.seq_len + 1
        rank, world = self.rank_and_world()
        return [
            ValidationLoader(
                ValidationWindows(
                    self._split_dir(domain, "val"), block, max(1, self.val_tokens_per_domain // block),
                    self.chunk_tokens[domain, "val"],
                ),
                self.batch_size, rank, world, self.num_workers,
            )
            for domain in self.val_domain_names
        ]

    # --- resuming -----------------------------------------------------------------------------

    def position_batches(self) -> int:
        """Global batches of the stream used so far (all ranks): trained (inside a Trainer), else
        handed out (a loader iterated by hand), else restored from a checkpoint."""
        if self._trained is not None:
            return self._trained
        if self._yielded is not None:
            return self._yielded
        return self._restored

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this once per batch it is about to use: count the trained ones."""
        if self.trainer is not None and self.trainer.training and self._yielded is not None:
            start = self._iteration_start if self._trained is None else self._trained
            self._trained = start + self.rank_and_world()[1]
        return batch

    def rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of processes sharing the data: the data-parallel
        ones (under ModelParallelStrategy with tensor parallelism, the ranks of one tensor-parallel
        group read the same batches), else every process."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        try:
            kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
        except AssertionError:  # ModelParallelStrategy before its device mesh exists
            kwargs = None
        if kwargs and "rank" in kwargs and "num_replicas" in kwargs:
            return int(kwargs["rank"]), int(kwargs["num_replicas"])
        return trainer.global_rank, trainer.world_size

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position and what it depends on; Lightning stores it in checkpoints."""
        return {
            "version": STATE_VERSION,
            "batches": self.position_batches(),
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "order_seed": self.order_seed,
            "train_weights": dict(self.train_weights),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it (Lightning calls this before it
        asks for the train loader). The stream must be the same one: the same order seed,
        weights, window size and batch size."""
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION:
            raise UserError(
                "the checkpoint's data position was written by an older bam_lightning (litdata "
                "loader state), which cannot be resumed exactly; start this run again"
            )
        ours = self.state_dict()
        for key, field in (("order_seed", "data.order_seed"), ("train_weights", "data.train_weights"),
                           ("seq_len", "data.seq_len"), ("batch_size", "data.batch_size")):
            if state_dict[key] != ours[key]:
                raise UserError(
                    f"cannot resume the training stream: the checkpoint was trained with {field} = "
                    f"{state_dict[key]!r}, this run has {ours[key]!r}"
                )
        self._restored, self._yielded, self._trained = int(state_dict["batches"]), None, None


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
    prepare_workers: int,
) -> None:
    if not domains:
        raise UserError("domains is empty: give at least one domain")
    for name, source in domains.items():
        if not isinstance(name, str) or not _DOMAIN_NAME.match(name):
            raise UserError(f"domain name {name!r} must use only letters, digits, '_', '-' or '.'")
        if source == BUILTIN and name not in BUILTIN_DOMAINS:
            raise UserError(
                f"domains[{name!r}] = 'builtin', but there is no built-in {name!r} corpus; "
                f"built-ins are {', '.join(BUILTIN_DOMAINS)} (or give a path/glob)"
            )
        if not isinstance(source, (str, list)) or (
            isinstance(source, list) and not all(isinstance(s, str) for s in source)
        ):
            raise UserError(f"domains[{name!r}] must be 'builtin', a path/glob, or a list of them")
    if tokenizer not in ("byte", "bpe") and find_tokenizer_json(tokenizer) is None:
        raise UserError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}; or the path of a "
                         "pretrained model's tokenizer.json (or its folder)")
    if tokenizer == "bpe" and bpe_vocab_size <= 257:
        raise UserError(f"bpe_vocab_size must exceed 257 (bytes + EOS), got {bpe_vocab_size}")
    positive = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "val_tokens_per_domain": val_tokens_per_domain,
        "max_bytes_per_domain": max_bytes_per_domain,
    }
    for field, value in positive.items():
        if value < 1:
            raise UserError(f"{field} must be at least 1, got {value}")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers}")
    if isinstance(prepare_workers, bool) or not isinstance(prepare_workers, int) or prepare_workers < 1:
        raise UserError(f"data.prepare_workers must be a whole number >= 1, got {prepare_workers!r}")


def _normalised_weights(
    domains: dict[str, Any], weights: dict[str, float] | None
) -> dict[str, float]:
    if weights is None:
        return {domain: 1 / len(domains) for domain in domains}
    for name, weight in weights.items():
        if name not in domains:
            raise UserError(
                f"train_weights names unknown domain {name!r}; known domains: {', '.join(domains)}"
            )
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"train_weights[{name!r}] must be a finite number >= 0, got {weight}")
    total = sum(weights.values())
    if total <= 0:
        raise UserError(
            f"train_weights are all zero: {weights}; give at least one domain a positive weight"
        )
    return {domain: weights.get(domain, 0.0) / total for domain in domains}


def _checked_val_domains(domains: dict[str, Any], val_domains: list[str] | None) -> list[str]:
    if val_domains is None:
        return list(domains)
    if not val_domains:
        raise UserError("val_domains is empty; use None for all domains (or limit_val_batches=0)")
    for name in val_domains:
        if name not in domains:
            raise UserError(
                f"val_domains names unknown domain {name!r}; known domains: {', '.join(domains)}"
            )
    return list(val_domains)
