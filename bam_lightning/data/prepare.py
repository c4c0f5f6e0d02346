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
and chunk size. `seq_len` and the validation token cap are read-time choices and not part of it.
"""

from __future__ import annotations

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from bam_lightning.data.corpora import (
    BUILTIN,
    builtin_corpus_id,
    load_documents,
    resolve_files,
)
from bam_lightning.data.dedup import JACCARD_THRESHOLD, SHINGLE_WORDS, near_duplicate_groups
from bam_lightning.data.tokenizer import TextTokenizer, build_tokenizer

PREPARED_FORMAT_VERSION = 3  # 1: litdata, our reading order not yet ours; 2: flat .npy arrays
MANIFEST_FILE = "manifest.json"
DOCUMENTS_FILE = "documents.npy"
CHUNK_BYTES = 1 << 22  # 4 MiB of tokens per litdata chunk file
TOKENIZE_BLOCK = 4096  # documents encoded per tokenizer call
GROUP_TOKENS = 1 << 20  # tokens handed to the optimize worker per input (not one message per document)


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
    """Everything the prepared data depends on, as plain JSON values."""
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
            raise ValueError(
                f"data_dir {data_dir} holds data prepared by an older bam_lightning (format "
                f"{manifest['settings'].get('format')}, this version reads format "
                f"{PREPARED_FORMAT_VERSION}); delete it or choose another data_dir"
            )
        if manifest["settings"] != settings:
            raise ValueError(
                f"data_dir {data_dir} holds data prepared with other settings (sources, files, "
                "tokenizer, split or byte cap differ); delete it or choose another data_dir"
            )
        return True
    if data_dir.exists() and any(data_dir.iterdir()):
        raise ValueError(
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
    validation ones in shuffled order.
    """
    if n_documents < 2:
        raise ValueError(f"need at least 2 documents to split, got {n_documents}")
    groups = list(range(n_documents)) if groups is None else list(groups)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = list(members)
    random.Random(seed).shuffle(order)
    target = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    val: list[int] = []
    for group in order[:-1]:  # the last group always trains
        if len(val) >= target:
            break
        if len(val) + len(members[group]) > target and val:
            continue  # too big to fit: try a smaller group
        val.extend(members[group])
    if not val:
        raise ValueError(
            f"all {n_documents} documents are near-duplicates of each other: nothing can be held "
            "out that is not also trained on; add documents"
        )
    held = set(val)
    return [i for i in range(n_documents) if i not in held], val


# --- tokenizing into litdata chunks ------------------------------------------------------------


def tokenize_documents(
    tokenizer: TextTokenizer, documents: Sequence[str], dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """All documents' tokens, each EOS-terminated, joined; and the offset of each document
    (length n + 1). Encoded TOKENIZE_BLOCK documents at a time (in parallel for BPE), so the
    tokenizer's Python lists never hold more than a block: the result is `dtype` throughout."""
    blocks: list[np.ndarray] = []
    lengths = np.empty(len(documents), dtype=np.int64)
    for first in range(0, len(documents), TOKENIZE_BLOCK):
        encoded = tokenizer.encode_batch(documents[first:first + TOKENIZE_BLOCK])
        lengths[first:first + len(encoded)] = [len(ids) + 1 for ids in encoded]
        eos = [tokenizer.eos_id]
        blocks.append(np.fromiter(itertools.chain.from_iterable(ids + eos for ids in encoded), dtype=dtype,
                                  count=int(lengths[first:first + len(encoded)].sum())))
        del encoded
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(blocks) if blocks else np.empty(0, dtype=dtype)
    return tokens, offsets


def yield_token_arrays(arrays: list[np.ndarray]) -> Iterator[np.ndarray]:
    """litdata.optimize item function (top level, so worker processes can import it)."""
    yield from arrays


def _document_groups(tokens: np.ndarray, offsets: np.ndarray) -> list[list[np.ndarray]]:
    """Each document's tokens as one litdata item, handed over in groups of about GROUP_TOKENS."""
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
        if size >= GROUP_TOKENS:
            groups.append([])
            size = 0
        groups[-1].append(tokens[start:stop])
        size += int(stop - start)
    return groups


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


def write_token_dataset(
    tokens: np.ndarray, offsets: np.ndarray, output_dir: Path, staging_dir: Path
) -> list[int]:
    """Write one split with `litdata.optimize` (a TokensLoader dataset, a document per item) and
    its document offsets beside it; returns the tokens in each chunk, in order.

    One worker keeps the documents in order, so the chunks joined are exactly `tokens` and the
    offsets hold for them; it only copies bytes, the tokenizing is done by then.
    """
    from litdata import TokensLoader, optimize  # heavy import, only needed while preparing

    with _isolated_optimize(staging_dir):
        optimize(
            fn=yield_token_arrays,
            inputs=_document_groups(tokens, offsets),
            output_dir=str(output_dir),
            chunk_bytes=CHUNK_BYTES,
            item_loader=TokensLoader(),
            num_workers=1,
            keep_data_ordered=True,
            reorder_files=False,
            verbose=False,
            # fork: the worker starts in milliseconds; spawn re-imports torch, ~5 s a call.
            start_method="fork" if sys.platform == "linux" else "spawn",
        )
    chunk_tokens = [int(chunk["dim"]) for chunk in json.loads((output_dir / "index.json").read_text())["chunks"]]
    if sum(chunk_tokens) != len(tokens):
        raise RuntimeError(f"litdata wrote {sum(chunk_tokens)} tokens to {output_dir}, expected {len(tokens)}")
    np.save(output_dir / DOCUMENTS_FILE, offsets)
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
) -> dict[str, list[str]]:
    """User files first: their errors should show before any built-in corpus is built."""
    ordered = sorted(domains, key=lambda domain: domains[domain] == BUILTIN)
    documents = {}
    for domain in ordered:
        started = time.perf_counter()
        documents[domain] = load_documents(domain, domains[domain], max_bytes, seed, cache_dir,
                                           (text_fields or {}).get(domain, "text"))
        if len(documents[domain]) < 2:
            raise ValueError(
                f"domain {domain!r} has {len(documents[domain])} document(s) within "
                f"max_bytes_per_domain={max_bytes}; it needs at least 2 (one to validate on)"
            )
        megabytes = sum(len(d.encode("utf-8")) for d in documents[domain]) / 1e6
        rank_zero_info(
            f"[bam data] {domain}: {len(documents[domain])} documents, {megabytes:.1f} MB "
            f"({time.perf_counter() - started:.1f} s)"
        )
    return {domain: documents[domain] for domain in domains}


def prepare(
    data_dir: Path,
    documents: dict[str, list[str]],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Split, train the tokenizer if asked, tokenize and write every domain and split; then the
    manifest; then rename the finished tree to `data_dir`. Returns the manifest."""
    started = time.perf_counter()
    val_fraction, seed = settings["val_fraction"], settings["seed"]
    splits: dict[str, dict[str, list[str]]] = {}
    near_duplicates: dict[str, dict[str, int]] = {}
    for domain, docs in documents.items():
        dedup_started = time.perf_counter()
        groups = near_duplicate_groups(docs, settings["near_duplicates"]["jaccard"])
        try:
            train, val = split_indices(len(docs), val_fraction, seed, groups)
        except ValueError as error:
            raise ValueError(f"domain {domain!r}: {error}") from None
        splits[domain] = {"train": [docs[i] for i in train], "val": [docs[i] for i in val]}
        near_duplicates[domain] = _near_duplicate_summary(groups, len(docs), val_fraction, seed, val)
        rank_zero_info(
            f"[bam data] {domain}: {near_duplicates[domain]['documents_in_groups']} documents in "
            f"{near_duplicates[domain]['groups']} near-duplicate groups; an ungrouped split would "
            f"have validated on {near_duplicates[domain]['val_leaks_without_grouping']} documents with "
            f"a near-duplicate in training ({time.perf_counter() - dedup_started:.1f} s)"
        )

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = data_dir.parent / f".{data_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        train_texts = [doc for domain in splits.values() for doc in domain["train"]]
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
        summary: dict[str, dict[str, Any]] = {}
        for domain, by_split in splits.items():
            summary[domain] = {}
            for split, docs in by_split.items():
                split_started = time.perf_counter()
                chunk_tokens = write_token_dataset(
                    *tokenize_documents(tokenizer, docs, dtype), staging / domain / split,
                    staging / ".optimizer",
                )
                tokens = sum(chunk_tokens)
                n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
                summary[domain][split] = {
                    "documents": len(docs),
                    "bytes": n_bytes,
                    "tokens": tokens,
                    "chunk_tokens": chunk_tokens,
                }
                rank_zero_info(
                    f"[bam data] {domain}/{split}: {len(docs)} documents, {n_bytes / 1e6:.2f} MB "
                    f"-> {tokens:,} tokens ({time.perf_counter() - split_started:.1f} s)"
                )
        shutil.rmtree(staging / ".optimizer", ignore_errors=True)
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
    groups: list[int], n_documents: int, val_fraction: float, seed: int, val: list[int]
) -> dict[str, int]:
    """What the grouping changed: how many validation documents a plain per-document split
    would have had with a near-duplicate on the training side (now 0 by construction).

    Linear in the documents: a plain-split validation document leaks when its group has more
    members than the plain split held out of it (one pass to count, one to compare)."""
    dense = np.unique(np.asarray(groups, dtype=np.int64), return_inverse=True)[1].reshape(-1)
    sizes = np.bincount(dense, minlength=1)
    leaks = 0
    if int(np.count_nonzero(sizes)) < n_documents:
        _, plain_val = split_indices(n_documents, val_fraction, seed)
        held_groups = dense[np.asarray(plain_val, dtype=np.int64)]
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
