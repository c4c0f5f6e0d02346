"""The training stream as a pure function of (order seed, sample index), and the validation windows.

Resuming exactly is then a matter of one integer (samples trained so far): no per-worker reader
state to replay, and the stream is the same for any number of loader workers, because each
worker computes whole batches by index and the DataLoader hands them out in index order.

Sample i's domain is a seeded weighted draw (drawn in blocks of `BLOCK` samples, each block from
its own generator, so any block can be recomputed alone); sample i is then the j-th visit of its
domain, where j counts the earlier samples of that domain. Visit j reads window
`permutation_e[j mod n]` of the domain's split, where n is its number of windows and e = j // n
its pass: every window once per pass, in a fresh seeded order each pass.

The windows themselves are read by litdata (`StreamingDataset` with `TokensLoader(block_size)`,
random access `dataset[w]`), which maps the prepared chunks in place.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bam_lightning.data.prepare import read_document_offsets, window_starts

BLOCK = 4096  # samples whose domain draws come from one generator
MAPPED_CHUNKS = 64  # chunk files litdata keeps mapped per split (it remaps on every switch otherwise)


def open_windows(split_dir: Path, block: int):
    """litdata's reader over one prepared split: item w is window w (`block` tokens).

    Built lazily in each process that reads (a loader worker builds its own). Window counts come
    from the manifest (`window_starts`), never from `len()`: under DDP litdata's length counts
    one rank's share, while random access stays global."""
    from litdata import StreamingDataset, TokensLoader

    return StreamingDataset(
        str(split_dir), item_loader=TokensLoader(block_size=block), shuffle=False,
        max_pre_download=MAPPED_CHUNKS,
    )


def domain_key(name: str) -> int:
    """A stable number per domain name: a domain's window order does not depend on which other
    domains are trained beside it."""
    return zlib.crc32(name.encode())


class TrainStream:
    """(domain, window) of every training sample, for given window counts and weights."""

    def __init__(self, names: list[str], window_counts: list[int], weights: list[float], order_seed: int):
        if min(window_counts) < 1:
            raise ValueError(f"every trained domain needs at least one window, got {window_counts}")
        self.names, self.window_counts, self.order_seed = list(names), list(window_counts), order_seed
        total = float(sum(weights))
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / total)
        self._counts_before = [np.zeros(len(names), dtype=np.int64)]  # visits before block b
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        self._block_visits: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def block_domains(self, block: int) -> np.ndarray:
        """The domain index of each of block `block`'s samples."""
        uniform = np.random.default_rng([self.order_seed, block]).random(BLOCK)
        return np.minimum(np.searchsorted(self.cumulative, uniform, side="right"), len(self.names) - 1)

    def counts_before(self, block: int) -> np.ndarray:
        while len(self._counts_before) <= block:
            done = len(self._counts_before) - 1
            visits = np.bincount(self.block_domains(done), minlength=len(self.names))
            self._counts_before.append(self._counts_before[-1] + visits)
        return self._counts_before[block]

    def block_visits(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and visit number j of every sample of block `block` (the last two blocks
        are kept: consecutive batches mostly fall in the same block)."""
        if block not in self._block_visits:
            drawn = self.block_domains(block)
            rank = np.empty(BLOCK, dtype=np.int64)
            for d in range(len(self.names)):
                mask = drawn == d
                rank[mask] = np.arange(int(mask.sum()))
            rank += self.counts_before(block)[drawn]
            if len(self._block_visits) >= 2:
                self._block_visits.pop(next(iter(self._block_visits)))
            self._block_visits[block] = (drawn, rank)
        return self._block_visits[block]

    def visits(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Domain index and visit number j of samples start..stop-1."""
        domains, visits = [], []
        for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            drawn, rank = self.block_visits(block)
            lo, hi = max(start, block * BLOCK) - block * BLOCK, min(stop, (block + 1) * BLOCK) - block * BLOCK
            domains.append(drawn[lo:hi])
            visits.append(rank[lo:hi])
        return np.concatenate(domains), np.concatenate(visits)

    def window(self, domain: int, visit: int) -> int:
        """Which window of `domain`'s split its `visit`-th sample reads."""
        n = self.window_counts[domain]
        key = (domain, visit // n)
        if key not in self._permutations:
            if len(self._permutations) > 4 * len(self.names):
                self._permutations.clear()
            generator = np.random.default_rng([self.order_seed, domain_key(self.names[domain]), key[1]])
            self._permutations[key] = generator.permutation(n)
        return int(self._permutations[key][visit % n])

    def samples(self, start: int, stop: int) -> list[tuple[int, int]]:
        """(domain index, window index) of samples start..stop-1."""
        domains, visits = self.visits(start, stop)
        return [(int(d), self.window(int(d), int(j))) for d, j in zip(domains, visits, strict=True)]


class TrainBatchesByIndex(Dataset):
    """Map-style dataset whose item k is the k-th training batch (LongTensor[B, L + 1]).

    litdata's readers are opened lazily in each process, so workers never receive a copy."""

    def __init__(self, split_dirs: list[Path], stream: TrainStream, batch_size: int, block: int):
        self.split_dirs, self.stream, self.batch_size, self.block = split_dirs, stream, batch_size, block
        self._windows: list | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_windows": None}

    def __getitem__(self, batch_index: int) -> torch.Tensor:
        if self._windows is None:
            self._windows = [open_windows(d, self.block) for d in self.split_dirs]
        start = batch_index * self.batch_size
        rows = [np.asarray(self._windows[d][w]) for d, w in self.stream.samples(start, start + self.batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def __len__(self) -> int:  # only so that a DataLoader accepts it; indices come from a range
        return 1 << 62


def validation_windows(n_windows: int, cap: int) -> np.ndarray:
    """`cap` window indices spread evenly over all `n_windows` (all of them if fewer): the split's
    documents are in shuffled order, so evenly spaced windows sample across every document."""
    count = min(n_windows, cap)
    return (np.arange(count, dtype=np.int64) * n_windows) // count


class ValidationWindows(Dataset):
    """Evenly spread windows of one validation split; each item is {"tokens": [L + 1],
    "documents": [L]}, the document of every target token (for per-document results)."""

    def __init__(self, split_dir: Path, block: int, cap_windows: int, chunk_tokens: list[int]):
        self.split_dir, self.block = split_dir, block
        self.offsets = read_document_offsets(split_dir)
        self.n_documents = len(self.offsets) - 1
        self.starts = window_starts(chunk_tokens, block)  # of every window, in the token sequence
        self.windows = validation_windows(len(self.starts), cap_windows)
        self._reader = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._reader is None:
            self._reader = open_windows(self.split_dir, self.block)
        window = int(self.windows[index])
        tokens = torch.from_numpy(np.asarray(self._reader[window]).astype(np.int64))
        start = int(self.starts[window])
        positions = np.arange(start + 1, start + self.block)
        documents = np.searchsorted(self.offsets, positions, side="right") - 1
        return {"tokens": tokens, "documents": torch.from_numpy(documents.astype(np.int64))}


def rank_batches(n_windows: int, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    """Rank `rank`'s validation batches, as window numbers: a contiguous share of the windows
    (shares differ by at most one window; no window is scored twice, unlike Lightning's
    DistributedSampler, which repeats windows to even the shares), cut into as many batches as
    the largest share needs, on every rank. Every rank runs the same number of forwards because
    a sharded model (FSDP2) gathers its weights in each one. Batches hold up to `batch_size`
    windows; a shorter share is cut finer, and an empty batch (a rank with too few windows) is
    padding: a forward on a dummy window that scores nothing."""
    most = -(-n_windows // world)
    count = max(1, -(-most // batch_size))
    mine = np.arange(rank * n_windows // world, (rank + 1) * n_windows // world, dtype=np.int64)
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    while len(batches) < count:
        sizes = [len(b) for b in batches]
        big = int(np.argmax(sizes)) if sizes else -1
        if big < 0 or sizes[big] < 2:
            batches.append(mine[:0])
        else:
            half = sizes[big] // 2
            batches[big:big + 1] = [batches[big][:half], batches[big][half:]]
    return batches


class ValidationBatches(Dataset):
    """Item k is batch k of one rank's share of a validation split: {"tokens": [b, L + 1],
    "documents": [b, L]}. A padding batch is one window of token 0 whose documents are -1
    (the module scores no target with a negative document)."""

    def __init__(self, windows: ValidationWindows, batches: list[np.ndarray]):
        self.windows, self.batches = windows, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rows = [self.windows[int(w)] for w in self.batches[index]]
        if not rows:
            block = self.windows.block
            return {"tokens": torch.zeros(1, block, dtype=torch.int64),
                    "documents": torch.full((1, block - 1), -1, dtype=torch.int64)}
        return {key: torch.stack([row[key] for row in rows]) for key in ("tokens", "documents")}


class ValidationLoader:
    """One domain's validation batches for one rank. Not a DataLoader on purpose: Lightning would
    replace a DataLoader's sampler with a DistributedSampler (which repeats windows); it leaves
    other iterables alone. `dataset` is the domain's whole window list (all ranks)."""

    def __init__(self, windows: ValidationWindows, batch_size: int, rank: int, world: int, num_workers: int):
        self.dataset = windows
        self.batches = ValidationBatches(windows, rank_batches(len(windows), batch_size, rank, world))
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        loader = DataLoader(self.batches, batch_size=None, sampler=range(len(self.batches)),
                            num_workers=self.num_workers)
        return iter(loader)
