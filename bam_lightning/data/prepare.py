"""From domains to tokenized litdata datasets on disk, once per distinct setting.

Layout of a prepared data dir (the manifest is written last, so its presence means "complete";
the whole tree is built under a temporary name and renamed into place):

    <data_dir>/manifest.json                 settings, tokenizer, documents/bytes/tokens per split
    <data_dir>/tokenizer.json                only for the BPE tokenizer
    <data_dir>/<domain>/{train,val}/         written by `litdata.optimize` with its TokensLoader:
        index.json, chunk-*.bin              every document's tokens, each EOS-ended, in order
        documents.npy                        ours, beside litdata's files: int64 offsets in the
                                             split's token sequence, document k is [o[k], o[k+1])

litdata stores and reads the tokens (`StreamingDataset` + `TokensLoader(block_size)`, random
access by window); which window is read when stays ours (stream.py), so the training stream is a
pure function of (order seed, sample index). litdata keeps whole documents in a chunk and numbers
windows chunk by chunk (a chunk's last partial window is never read), so window w starts at
`window_starts(chunk_tokens, block)[w]` in the split's token sequence; the manifest records each
split's chunk sizes. Formats 1 (litdata, before the stream was ours) and 2 (flat `.npy` arrays)
are never read: the format number is part of the settings, so old data dirs hash elsewhere or
are refused.

The default data dir is `<cache>/prepared/<hash of the settings>`: the sources (built-in corpus
ids, or user files with their sizes and modification times), tokenizer, byte cap, split, seed
and chunk size. `seq_len`, the validation token cap and the optimize worker count (the data is
the same for any) are not part of it.

Memory is bounded by a block, not the corpus: the sources are read as streams twice (sizes and
the byte cap, then into a spool file of the kept documents in the staging folder while their
MinHash signatures go to disk band by band); the split, the BPE training and the optimize workers
read the spool back by document. What stays in memory is a block of texts or tokens plus tens of
bytes per document (byte offsets, group ids, split indices, one band of signatures while grouping).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from bam_lightning.data.corpora import (
    BUILTIN,
    DomainDocuments,
    builtin_corpus_id,
    resolve_files,
    seeded_order,
)
from bam_lightning.data.dedup import JACCARD_THRESHOLD, SHINGLE_WORDS, SignatureBands, group_ids
from bam_lightning.data.tokenizer import TextTokenizer, build_tokenizer, load_tokenizer
from bam_lightning.errors import UserError

PREPARED_FORMAT_VERSION = 3  # 1: litdata, our reading order not yet ours; 2: flat .npy arrays
MANIFEST_FILE = "manifest.json"
DOCUMENTS_FILE = "documents.npy"
CHUNK_BYTES = 1 << 22  # 4 MiB of tokens per litdata chunk file
TOKENIZE_BLOCK = 4096  # documents encoded per tokenizer call
GROUP_BYTES = 1 << 16  # text per optimize input: a message per range, not per document; many for balance


# --- settings and the data dir ----------------------------------------------------------------


def source_identity(domain: str, source: str | list[str], max_bytes: int) -> Any:
    """What the content of a domain depends on: a built-in corpus id, or each file's path,
    size and modification time (so an edited file gets freshly prepared data)."""
    if source == BUILTIN:
        return builtin_corpus_id(domain, max_bytes)
    return [
        [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
        for path in resolve_files(domain, source)
    ]


def prepare_settings(
    domains: dict[str, str | list[str]],
    tokenizer: str,
    bpe_vocab_size: int,
    val_fraction: float,
    max_bytes_per_domain: int,
    seed: int,
    text_fields: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Everything the prepared data depends on, as plain JSON values (not the optimize worker
    count: the data is the same for any, see `write_token_dataset`)."""
    settings = {
        "format": PREPARED_FORMAT_VERSION,
        "sources": {d: source_identity(d, s, max_bytes_per_domain) for d, s in domains.items()},
        "tokenizer": tokenizer,
        "bpe_vocab_size": bpe_vocab_size if tokenizer == "bpe" else None,
        "val_fraction": val_fraction,
        "max_bytes_per_domain": max_bytes_per_domain,
        "seed": seed,
        "chunk_bytes": CHUNK_BYTES,  # where litdata's chunks end decides which windows exist
        # near-duplicates stay on one side of the split (see dedup.py)
        "near_duplicates": {"shingle_words": SHINGLE_WORDS, "jaccard": JACCARD_THRESHOLD},
    }
    if text_fields:  # only when set, so data prepared before the option keeps its hash
        settings["text_fields"] = dict(sorted(text_fields.items()))
    if tokenizer not in ("byte", "bpe"):  # a tokenizer file: prepared data follows its contents
        from bam_lightning.data.hf_tokenizer import HFTokenizer, find_tokenizer_json

        path = find_tokenizer_json(tokenizer)
        settings["tokenizer_fingerprint"] = HFTokenizer(path).fingerprint if path else None
    return json.loads(json.dumps(settings))  # tuples -> lists, as a manifest reads back


def settings_digest(settings: dict[str, Any]) -> str:
    """The prepared data's identity: it names the default data dir, and `bam pipeline` puts it
    into every stage's fingerprint (a changed source file retrains the stages that read it)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def default_data_dir(settings: dict[str, Any], cache_dir: Path) -> Path:
    return cache_dir / "prepared" / settings_digest(settings)


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_reusable(data_dir: Path, settings: dict[str, Any]) -> bool:
    """True if `data_dir` holds data prepared with exactly these settings; False if it is
    missing or empty; an error if it holds something else."""
    manifest = read_manifest(data_dir)
    if manifest is not None:
        if manifest["settings"].get("format") != PREPARED_FORMAT_VERSION:
            raise UserError(
                f"data_dir {data_dir} holds data prepared by an older bam_lightning (format "
                f"{manifest['settings'].get('format')}, this version reads format "
                f"{PREPARED_FORMAT_VERSION}); delete it or choose another data_dir"
            )
        if manifest["settings"] != settings:
            raise UserError(
                f"data_dir {data_dir} holds data prepared with other settings (sources, files, "
                "tokenizer, split or byte cap differ); delete it or choose another data_dir"
            )
        return True
    if data_dir.exists() and any(data_dir.iterdir()):
        raise UserError(
            f"data_dir {data_dir} is not empty and has no {MANIFEST_FILE}, so it is not prepared "
            "data; delete it or choose another data_dir"
        )
    return False


# --- split ------------------------------------------------------------------------------------


def split_indices(
    n_documents: int, val_fraction: float, seed: int, groups: Sequence[int] | None = None
) -> tuple[list[int], list[int]]:
    """Hold out whole documents, chosen by a seeded shuffle (never a contiguous tail).

    `groups` (a group id per document, e.g. near-duplicates) keeps each group on one side: groups
    are shuffled and held out whole until the validation share is reached. At least one document
    goes to each side when there are two groups or more. Train indices come back sorted;
    validation ones in shuffled order. (Lists; `split_arrays` gives the same as arrays.)
    """
    train, val = split_arrays(n_documents, val_fraction, seed, groups)
    return train.tolist(), val.tolist()


def split_arrays(
    n_documents: int, val_fraction: float, seed: int, groups: Sequence[int] | np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`split_indices` as int64 arrays, in tens of bytes per document: groups are numbered in
    order of their first document and shuffled with `random.Random(seed)` (as a list of them
    would be), members are found through one stable sort instead of a dict of lists."""
    if n_documents < 2:
        raise UserError(f"need at least 2 documents to split, got {n_documents}")
    if groups is None:
        dense = np.arange(n_documents, dtype=np.int64)
    else:
        unique, first, inverse = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
        rank = np.empty(len(unique), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(unique))
        dense = rank[inverse.reshape(-1)]
    n_groups = int(dense.max()) + 1
    by_group = np.argsort(dense, kind="stable")  # members of each group, in index order
    sizes = np.bincount(dense, minlength=n_groups)
    starts = (np.cumsum(sizes) - sizes).tolist()
    sizes_list = sizes.tolist()
    order = seeded_order(n_groups, seed)
    target = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    held_groups, held = [], 0
    for position in range(n_groups - 1):  # the last group always trains
        if held >= target:
            break
        group = order[position]
        if held + sizes_list[group] > target and held:
            continue  # too big to fit: try a smaller group
        held_groups.append(group)
        held += sizes_list[group]
    if not held_groups:
        raise UserError(
            f"all {n_documents} documents are near-duplicates of each other: nothing can be held "
            "out that is not also trained on; add documents"
        )
    val = np.concatenate([by_group[starts[g]:starts[g] + sizes_list[g]] for g in held_groups])
    in_val = np.zeros(n_documents, dtype=bool)
    in_val[val] = True
    return np.flatnonzero(~in_val).astype(np.int64), val.astype(np.int64)


# --- tokenizing into litdata chunks ------------------------------------------------------------


class TextSpool:
    """A domain's kept documents as UTF-8 bytes in one file of the staging folder, with each
    document's byte offset (8 bytes per document in memory): the splits, the BPE training and the
    optimize workers read documents back from it by index, in any order, without holding them."""

    def __init__(self, path: Path, n_documents: int):
        self.path = Path(path)
        self.offsets = np.zeros(n_documents + 1, dtype=np.int64)

    def write_through(self, documents: Iterable[str]) -> Iterator[str]:
        """Yields `documents` as they are written (so one read of the source serves the spool and
        the MinHash signatures)."""
        count = 0
        with self.path.open("wb", buffering=1 << 20) as file:
            for count, text in enumerate(documents, start=1):
                if count == len(self.offsets):
                    raise RuntimeError(f"{self.path}: more documents than the {count - 1} counted before "
                                       "(a source changed while it was prepared?)")
                data = text.encode("utf-8")
                file.write(data)
                self.offsets[count] = self.offsets[count - 1] + len(data)
                yield text
        if count != len(self.offsets) - 1:
            raise RuntimeError(f"{self.path}: {count} documents written, expected {len(self.offsets) - 1} "
                               "(a source changed while it was prepared?)")
        np.save(self.path.with_suffix(".offsets.npy"), self.offsets)

    def sizes(self, indices: np.ndarray) -> np.ndarray:
        return self.offsets[indices + 1] - self.offsets[indices]

    def texts(self, indices: np.ndarray) -> Iterator[str]:
        yield from (data.decode("utf-8") for data in read_spool(self.path, self.offsets, indices))


def read_spool(path: Path, offsets: np.ndarray, indices: np.ndarray) -> Iterator[bytes]:
    """The UTF-8 bytes of documents `indices` of a spool (sequential reads when they are sorted)."""
    with Path(path).open("rb", buffering=1 << 20) as file:
        position = -1
        for index in indices.tolist():
            start, stop = int(offsets[index]), int(offsets[index + 1])
            if start != position:
                file.seek(start)
            yield file.read(stop - start)
            position = stop


class TrainingTexts:
    """Every domain's training documents, in order, readable more than once (the BPE trainer's
    input, streamed from the spools)."""

    def __init__(self, parts: list[tuple[TextSpool, np.ndarray]]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(indices) for _, indices in self.parts)

    def __iter__(self) -> Iterator[str]:
        for spool, indices in self.parts:
            yield from spool.texts(indices)


_WORKER_TOKENIZERS: dict[str, TextTokenizer] = {}


def tokenize_documents(spec: dict[str, Any], bounds: tuple[int, int]) -> Iterator[np.ndarray]:
    """litdata.optimize item function (top level, so worker processes can import it): the split's
    documents `bounds[0]:bounds[1]` read from the spool and tokenized, each EOS-ended, one item
    each. Bytes skip the decode/encode round trip: their tokens are the spool's bytes."""
    offsets = np.load(spec["offsets"], mmap_mode="r")
    indices = np.array(np.load(spec["indices"], mmap_mode="r")[bounds[0]:bounds[1]])
    dtype, eos = spec["dtype"], spec["eos_id"]
    documents = read_spool(spec["spool"], offsets, indices)
    if spec["tokenizer"] == "byte":
        for data in documents:
            tokens = np.empty(len(data) + 1, dtype=dtype)
            tokens[:-1] = np.frombuffer(data, dtype=np.uint8)
            tokens[-1] = eos
            yield tokens
        return
    if spec["tokenizer"] not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[spec["tokenizer"]] = load_tokenizer(spec["tokenizer"])
    tokenizer = _WORKER_TOKENIZERS[spec["tokenizer"]]
    while block := [data.decode("utf-8") for data in itertools.islice(documents, TOKENIZE_BLOCK)]:
        for ids in tokenizer.encode_batch(block):
            tokens = np.empty(len(ids) + 1, dtype=dtype)
            tokens[:-1] = ids
            tokens[-1] = eos
            yield tokens


def input_ranges(sizes: np.ndarray) -> list[tuple[int, int]]:
    """Documents cut into consecutive ranges of about GROUP_BYTES bytes and at most
    TOKENIZE_BLOCK documents: the optimize inputs (a range, not one message per document)."""
    ends = np.cumsum(sizes)
    cuts = np.flatnonzero(np.diff(ends // GROUP_BYTES)) + 1
    cuts = np.union1d(cuts, np.arange(TOKENIZE_BLOCK, len(sizes), TOKENIZE_BLOCK))
    bounds = [0, *cuts.tolist(), len(sizes)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def chunk_document_tokens(split_dir: Path, itemsize: int) -> tuple[list[int], np.ndarray]:
    """The tokens in each chunk and in each document (item), read back from the chunk headers:
    a uint32 item count, then count + 1 uint32 byte offsets of the items."""
    index = json.loads((split_dir / "index.json").read_text())
    chunk_tokens, lengths = [], []
    for chunk in index["chunks"]:
        with (split_dir / chunk["filename"]).open("rb") as file:
            count = int(np.frombuffer(file.read(4), dtype=np.uint32)[0])
            item_offsets = np.frombuffer(file.read(4 * (count + 1)), dtype=np.uint32).astype(np.int64)
        lengths.append(np.diff(item_offsets) // itemsize)
        chunk_tokens.append(int(chunk["dim"]))
    return chunk_tokens, np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)


@contextmanager
def _isolated_optimize(staging_dir: Path) -> Iterator[None]:
    """Undo what `litdata.optimize` does to the calling (training) process.

    It stages files in `$TMPDIR/chunks`, shared by every run, and wipes it first: give each run
    its own folder. It reseeds `random`, numpy and torch: restore their states, so a run that
    prepares data trains exactly like one that reuses it. It installs a SIGINT handler that
    exits with status 0: restore the previous one, so Ctrl-C still stops training normally.
    """
    environment = {
        "DATA_OPTIMIZER_CACHE_FOLDER": str(staging_dir / "chunks"),
        "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(staging_dir / "data"),
        "TOKENIZERS_PARALLELISM": "false",  # else `tokenizers` warns in the forked worker
    }
    saved_environment = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    sigint_handler = signal.getsignal(signal.SIGINT)
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        signal.signal(signal.SIGINT, sigint_handler)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def copy_documents(spec: dict[str, Any], position: int) -> Iterator[np.ndarray]:
    """litdata.optimize item function: the documents (items) of chunk `position` of an already
    tokenized split, in order (the single-worker rewrite after parallel tokenizing)."""
    raw = (Path(spec["source"]) / spec["files"][position]).read_bytes()
    count = int(np.frombuffer(raw, dtype=np.uint32, count=1)[0])
    bounds = np.frombuffer(raw, dtype=np.uint32, count=count + 1, offset=4).tolist()
    itemsize = np.dtype(spec["dtype"]).itemsize
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        yield np.frombuffer(raw, dtype=spec["dtype"], count=(stop - start) // itemsize, offset=start)


def _optimize(fn: Any, inputs: list[Any], output_dir: Path, staging_dir: Path, workers: int) -> None:
    """`litdata.optimize` into TokensLoader chunks, documents in input order (`keep_data_ordered`:
    worker k takes the k-th contiguous share of the inputs, and the chunks are listed worker by
    worker, so the order never depends on timing)."""
    from litdata import TokensLoader, optimize  # heavy import, only needed while preparing

    with _isolated_optimize(staging_dir):
        optimize(
            fn=fn,
            inputs=inputs,
            output_dir=str(output_dir),
            chunk_bytes=CHUNK_BYTES,
            item_loader=TokensLoader(),
            num_workers=workers,
            keep_data_ordered=True,
            reorder_files=False,
            verbose=False,
            # fork: a worker starts in milliseconds; spawn re-imports torch, ~5 s a call.
            start_method="fork" if sys.platform == "linux" else "spawn",
        )


def write_token_dataset(
    spool: TextSpool, indices: np.ndarray, tokenizer: dict[str, Any], output_dir: Path,
    staging_dir: Path, workers: int = 1,
) -> list[int]:
    """Write one split (documents `indices` of `spool`, in that order) with `litdata.optimize`
    (a TokensLoader dataset, a document per item), its workers tokenizing; then the document
    offsets beside it, read back from the chunk headers. Returns the tokens in each chunk.

    One worker writes the chunks as it tokenizes. Several workers each tokenize a contiguous
    share of the documents into chunks of their own (in the staging folder), and one more
    single-worker pass copies those documents, in order, into the split's chunks: each worker
    ends its own last chunk, so only this rewrite gives the chunk ends (and files) of one worker.
    The prepared data is the same for any worker count, which is why `prepare_workers` is not
    part of the data's settings; the rewrite copies bytes (about 25M tokens/s here)."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    indices_path = staging_dir / f"{output_dir.parent.name}-{output_dir.name}.indices.npy"
    np.save(indices_path, indices)
    inputs = input_ranges(spool.sizes(indices))
    spec = {**tokenizer, "spool": str(spool.path), "offsets": str(spool.path.with_suffix(".offsets.npy")),
            "indices": str(indices_path)}
    workers = max(1, min(workers, len(inputs)))
    if workers == 1:
        _optimize(functools.partial(tokenize_documents, spec), inputs, output_dir, staging_dir, 1)
    else:
        tokenized = staging_dir / f"{output_dir.parent.name}-{output_dir.name}.tokenized"
        _optimize(functools.partial(tokenize_documents, spec), inputs, tokenized, staging_dir, workers)
        files = [chunk["filename"] for chunk in json.loads((tokenized / "index.json").read_text())["chunks"]]
        copy = {"source": str(tokenized), "files": files, "dtype": tokenizer["dtype"]}
        _optimize(functools.partial(copy_documents, copy), list(range(len(files))), output_dir, staging_dir, 1)
        shutil.rmtree(tokenized)
        rank_zero_info(f"[bam data] {output_dir.parent.name}/{output_dir.name}: tokenized by {workers} optimize "
                       f"workers ({len(files)} chunks), rewritten in order as one worker's chunks")
    chunk_tokens, lengths = chunk_document_tokens(output_dir, np.dtype(tokenizer["dtype"]).itemsize)
    if len(lengths) != len(indices) or int(lengths.sum()) != sum(chunk_tokens):
        raise RuntimeError(f"litdata wrote {len(lengths)} documents ({sum(chunk_tokens)} tokens) to "
                           f"{output_dir}, expected {len(indices)} documents")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(output_dir / DOCUMENTS_FILE, offsets)
    indices_path.unlink()
    return chunk_tokens


def window_starts(chunk_tokens: Sequence[int], block: int) -> np.ndarray:
    """Where each window of `block` tokens starts in the split's token sequence, in litdata's
    TokensLoader numbering: chunk by chunk, whole windows only."""
    chunk_starts = np.concatenate([[0], np.cumsum(chunk_tokens)[:-1]]).astype(np.int64)
    return np.concatenate([
        start + block * np.arange(n // block, dtype=np.int64)
        for start, n in zip(chunk_starts, chunk_tokens, strict=True)
    ])


def read_document_offsets(split_dir: Path) -> np.ndarray:
    """Document k of a prepared split is tokens [o[k], o[k+1]) of its token sequence."""
    return np.load(split_dir / DOCUMENTS_FILE)


# --- the whole preparation --------------------------------------------------------------------


def load_all_documents(
    domains: dict[str, str | list[str]], max_bytes: int, seed: int, cache_dir: Path,
    text_fields: dict[str, str] | None = None,
) -> dict[str, DomainDocuments]:
    """Every domain's documents as a stream, each source read through once (`DomainDocuments
    .scan`: sizes and the byte cap). User files first: their errors should show before any
    built-in corpus is built."""
    ordered = sorted(domains, key=lambda domain: domains[domain] == BUILTIN)
    documents = {}
    for domain in ordered:
        started = time.perf_counter()
        documents[domain] = DomainDocuments(domain, domains[domain], max_bytes, seed, cache_dir,
                                            (text_fields or {}).get(domain, "text")).scan()
        if len(documents[domain]) < 2:
            raise UserError(
                f"domain {domain!r} has {len(documents[domain])} document(s) within "
                f"max_bytes_per_domain={max_bytes}; it needs at least 2 (one to validate on)"
            )
        rank_zero_info(
            f"[bam data] {domain}: {len(documents[domain])} documents, "
            f"{documents[domain].kept_bytes / 1e6:.1f} MB ({time.perf_counter() - started:.1f} s)"
        )
    return {domain: documents[domain] for domain in domains}


def prepare(
    data_dir: Path,
    documents: Mapping[str, Collection[str]],
    settings: dict[str, Any],
    workers: int = 1,
) -> dict[str, Any]:
    """Split, train the tokenizer if asked, tokenize and write every domain and split; then the
    manifest; then rename the finished tree to `data_dir`. Returns the manifest.

    Streamed: each domain's documents are read once more (a `DomainDocuments`, or a list) into
    a spool file in the staging folder while their MinHash signatures go to disk; everything
    after reads the spool. Memory: a block of texts or tokens (TOKENIZE_BLOCK documents,
    SHINGLE_BLOCK shingles, a 4 MiB chunk per optimize worker) plus tens of bytes per document
    (offsets, group ids, split indices; see docs)."""
    started = time.perf_counter()
    val_fraction, seed = settings["val_fraction"], settings["seed"]
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = data_dir.parent / f".{data_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    work = staging / ".work"
    work.mkdir()
    try:
        splits: dict[str, tuple[TextSpool, dict[str, np.ndarray]]] = {}
        near_duplicates: dict[str, dict[str, int]] = {}
        for number, (domain, docs) in enumerate(documents.items()):
            dedup_started = time.perf_counter()
            spool = TextSpool(work / f"{number}.spool", len(docs))
            bands = SignatureBands(work / f"{number}.signatures", len(docs))
            bands.write(spool.write_through(docs))
            groups = group_ids(len(docs), bands.band, settings["near_duplicates"]["jaccard"])
            bands.path.unlink()
            try:
                train, val = split_arrays(len(docs), val_fraction, seed, groups)
            except ValueError as error:
                raise UserError(f"domain {domain!r}: {error}") from None
            splits[domain] = (spool, {"train": train, "val": val})
            near_duplicates[domain] = _near_duplicate_summary(groups, len(docs), val_fraction, seed, val)
            del groups
            rank_zero_info(
                f"[bam data] {domain}: {near_duplicates[domain]['documents_in_groups']} documents in "
                f"{near_duplicates[domain]['groups']} near-duplicate groups; an ungrouped split would "
                f"have validated on {near_duplicates[domain]['val_leaks_without_grouping']} documents with "
                f"a near-duplicate in training ({time.perf_counter() - dedup_started:.1f} s)"
            )

        train_texts = TrainingTexts([(spool, by_split["train"]) for spool, by_split in splits.values()])
        tokenizer_started = time.perf_counter()
        tokenizer = build_tokenizer(
            settings["tokenizer"], train_texts, settings["bpe_vocab_size"], staging
        )
        if settings["tokenizer"] == "bpe":
            rank_zero_info(
                f"[bam data] trained a BPE tokenizer ({tokenizer.vocab_size} tokens) on the "
                f"training split in {time.perf_counter() - tokenizer_started:.1f} s"
            )
        dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
        tokenizer_spec = {"tokenizer": "byte" if settings["tokenizer"] == "byte" else str(staging),
                          "dtype": dtype, "eos_id": tokenizer.eos_id}
        if settings["tokenizer"] == "byte":  # the spool's bytes are the tokens: nothing to share out
            workers = 1
        summary: dict[str, dict[str, Any]] = {}
        for domain, (spool, by_split) in splits.items():
            summary[domain] = {}
            for split, indices in by_split.items():
                split_started = time.perf_counter()
                chunk_tokens = write_token_dataset(
                    spool, indices, tokenizer_spec, staging / domain / split, staging / ".optimizer", workers
                )
                tokens = sum(chunk_tokens)
                n_bytes = int(spool.sizes(indices).sum())
                summary[domain][split] = {
                    "documents": len(indices),
                    "bytes": n_bytes,
                    "tokens": tokens,
                    "chunk_tokens": chunk_tokens,
                }
                rank_zero_info(
                    f"[bam data] {domain}/{split}: {len(indices)} documents, {n_bytes / 1e6:.2f} MB "
                    f"-> {tokens:,} tokens ({time.perf_counter() - split_started:.1f} s)"
                )
        shutil.rmtree(staging / ".optimizer", ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        manifest = {
            "settings": settings,
            "tokenizer": {
                "kind": settings["tokenizer"],
                "fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
            },
            "token_dtype": dtype,
            "domains": summary,
            "near_duplicates": near_duplicates,
            "prepare_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _publish(staging, data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_manifest(data_dir) or manifest


def _near_duplicate_summary(
    groups: Sequence[int] | np.ndarray, n_documents: int, val_fraction: float, seed: int,
    val: Sequence[int] | np.ndarray,
) -> dict[str, int]:
    """What the grouping changed: how many validation documents a plain per-document split
    would have had with a near-duplicate on the training side (now 0 by construction).

    Linear in the documents: a plain-split validation document leaks when its group has more
    members than the plain split held out of it (one pass to count, one to compare)."""
    dense = np.unique(np.asarray(groups, dtype=np.int64), return_inverse=True)[1].reshape(-1)
    sizes = np.bincount(dense, minlength=1)
    leaks = 0
    if int(np.count_nonzero(sizes)) < n_documents:
        _, plain_val = split_arrays(n_documents, val_fraction, seed)
        held_groups = dense[plain_val]
        held = np.bincount(held_groups, minlength=len(sizes))
        leaks = int(np.count_nonzero(sizes[held_groups] > held[held_groups]))
    grouped = sizes[sizes > 1]
    return {
        "groups": int(len(grouped)),
        "documents_in_groups": int(grouped.sum()),
        "val_documents": len(val),
        "val_leaks_without_grouping": leaks,
    }


def _publish(staging: Path, data_dir: Path) -> None:
    """Rename the finished tree into place; if another process got there first, keep theirs."""
    if data_dir.is_dir() and not any(data_dir.iterdir()):
        data_dir.rmdir()
    try:
        staging.rename(data_dir)
    except OSError:
        if read_manifest(data_dir) is None:
            raise
