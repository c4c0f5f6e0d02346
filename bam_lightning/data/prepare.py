"""From domains to tokenized litdata datasets on disk, once per distinct setting.

Layout of a prepared data dir (the manifest is written last, so its presence means "complete";
the whole tree is built under a temporary name and renamed into place):

    <data_dir>/manifest.json            settings, tokenizer, documents/bytes/tokens per split
    <data_dir>/tokenizer.json           only for the BPE tokenizer
    <data_dir>/<domain>/{train,val}/    litdata chunks: one token array per document, EOS-ended

The default data dir is `<cache>/prepared/<hash of the settings>`: the sources (built-in corpus
ids, or user files with their sizes and modification times), tokenizer, byte cap, split and
seed. `seq_len` and the validation token cap are read-time choices and not part of it.
"""

from __future__ import annotations

import hashlib
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
from bam_lightning.data.tokenizer import TextTokenizer, build_tokenizer

PREPARED_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CHUNK_BYTES = 1 << 22  # 4 MiB of tokens per litdata chunk file
GROUP_TOKENS = 1 << 20  # token arrays handed to the optimize worker per message


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
    }
    if tokenizer not in ("byte", "bpe"):  # a tokenizer file: prepared data follows its contents
        from bam_lightning.data.hf_tokenizer import HFTokenizer, find_tokenizer_json

        path = find_tokenizer_json(tokenizer)
        settings["tokenizer_fingerprint"] = HFTokenizer(path).fingerprint if path else None
    return json.loads(json.dumps(settings))  # tuples -> lists, as a manifest reads back


def default_data_dir(settings: dict[str, Any], cache_dir: Path) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / "prepared" / digest


def read_manifest(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_reusable(data_dir: Path, settings: dict[str, Any]) -> bool:
    """True if `data_dir` holds data prepared with exactly these settings; False if it is
    missing or empty; an error if it holds something else."""
    manifest = read_manifest(data_dir)
    if manifest is not None:
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


def split_indices(n_documents: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out whole documents, chosen by a seeded shuffle (never a contiguous tail).

    At least one document goes to each side. Train indices come back sorted; validation ones
    in shuffled order, so a token cap on validation reads a random sample of documents.
    """
    if n_documents < 2:
        raise ValueError(f"need at least 2 documents to split, got {n_documents}")
    order = list(range(n_documents))
    random.Random(seed).shuffle(order)
    n_val = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    return sorted(order[n_val:]), order[:n_val]


# --- tokenizing into litdata chunks -----------------------------------------------------------


def yield_token_arrays(arrays: list[np.ndarray]) -> Iterator[np.ndarray]:
    """litdata.optimize item function (top level, so worker processes can import it)."""
    yield from arrays


def tokenize_documents(
    tokenizer: TextTokenizer, documents: Sequence[str], dtype: str
) -> list[np.ndarray]:
    """One EOS-terminated token array per document; encoded in batches (in parallel for BPE)."""
    arrays = []
    for ids in tokenizer.encode_batch(documents):
        tokens = np.empty(len(ids) + 1, dtype=dtype)
        tokens[:-1] = ids
        tokens[-1] = tokenizer.eos_id
        arrays.append(tokens)
    return arrays


def _groups(arrays: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Hand arrays to litdata in groups of about GROUP_TOKENS, not one queue message each."""
    groups: list[list[np.ndarray]] = [[]]
    size = 0
    for array in arrays:
        if size >= GROUP_TOKENS:
            groups.append([])
            size = 0
        groups[-1].append(array)
        size += len(array)
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


def write_token_dataset(arrays: list[np.ndarray], output_dir: Path, staging_dir: Path) -> int:
    """Write token arrays as litdata chunks at `output_dir`; returns the number of tokens.

    One worker keeps the chunk layout, and so the shuffled reading order, identical on every
    run; it only copies bytes, the tokenizing is done by then.
    """
    from litdata import TokensLoader, optimize  # heavy import, only needed while preparing

    with _isolated_optimize(staging_dir):
        optimize(
            fn=yield_token_arrays,
            inputs=_groups(arrays),
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
    index = json.loads((output_dir / "index.json").read_text())
    return sum(chunk["dim"] for chunk in index["chunks"])


# --- the whole preparation --------------------------------------------------------------------


def load_all_documents(
    domains: dict[str, str | list[str]], max_bytes: int, seed: int, cache_dir: Path
) -> dict[str, list[str]]:
    """User files first: their errors should show before any built-in corpus is built."""
    ordered = sorted(domains, key=lambda domain: domains[domain] == BUILTIN)
    documents = {}
    for domain in ordered:
        started = time.perf_counter()
        documents[domain] = load_documents(domain, domains[domain], max_bytes, seed, cache_dir)
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
    for domain, docs in documents.items():
        train, val = split_indices(len(docs), val_fraction, seed)
        splits[domain] = {"train": [docs[i] for i in train], "val": [docs[i] for i in val]}

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
                arrays = tokenize_documents(tokenizer, docs, dtype)
                tokens = write_token_dataset(
                    arrays, staging / domain / split, staging / ".optimizer"
                )
                n_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
                summary[domain][split] = {
                    "documents": len(docs),
                    "bytes": n_bytes,
                    "tokens": tokens,
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
            "prepare_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        _publish(staging, data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_manifest(data_dir) or manifest


def _publish(staging: Path, data_dir: Path) -> None:
    """Rename the finished tree into place; if another process got there first, keep theirs."""
    if data_dir.is_dir() and not any(data_dir.iterdir()):
        data_dir.rmdir()
    try:
        staging.rename(data_dir)
    except OSError:
        if read_manifest(data_dir) is None:
            raise
