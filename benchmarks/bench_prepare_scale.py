"""Data preparation at 10k, 100k and 1M documents: time and peak memory per document.

Each size's corpus is written once (a synthetic domain as one `.jsonl.zst` file: short documents
of random words, 1% of them near-duplicates of another); then, for each worker count, a fresh
process runs what `BAMDataModule.prepare_data` runs: read (streamed), near-duplicate grouping,
split, tokenizing (bytes, or `--tokenizer bpe`: a BPE trained first) by `litdata.optimize` workers and the write. Peak RSS is measured for the
preparing process (`RUSAGE_SELF`) and for its largest litdata worker (`RUSAGE_CHILDREN`: forked,
so it starts with the parent's pages); "over base" is the main process's peak minus its RSS
after the imports, before preparing. Linear preparation shows as flat time per document; memory
bounded by a block shows as a peak that barely moves with the corpus (plus the stated tens of
bytes per document). Growth columns are each row over the same worker count's previous size,
per 10x documents.

    .venv/bin/python benchmarks/bench_prepare_scale.py [--sizes 10000 100000 1000000] [--workers 1 2] [--limit-s 900]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [f"w{i:04d}" for i in range(5000)]


def write_corpus(path: Path, n_documents: int, seed: int = 0) -> int:
    """`n_documents` JSON lines of 20-40 random words (~150-300 bytes); every 100th document is a
    copy of an earlier one with one word changed. Returns the bytes of text."""
    import zstandard

    rng = random.Random(seed)
    total = 0
    with path.open("wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        kept: list[str] = []
        for index in range(n_documents):
            if index % 100 == 99 and kept:
                words = rng.choice(kept).split()
                words[rng.randrange(len(words))] = "changed"
                text = " ".join(words)
            else:
                text = " ".join(rng.choices(WORDS, k=rng.randint(20, 40)))
                if len(kept) < 1000:
                    kept.append(text)
            total += len(text)
            out.write((json.dumps({"text": text}) + "\n").encode())
    return total


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def one_size(corpus: Path, workers: int, tokenizer: str = "byte") -> dict:
    """Runs in its own process: prepare the corpus; time and peak RSS (main, workers)."""
    from bam_lightning.data.prepare import load_all_documents, prepare, prepare_settings

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        base = current_rss()
        domains = {"synthetic": str(corpus)}
        settings = prepare_settings(domains, tokenizer, 4096, 0.05, 10**12, 1234)
        started = time.perf_counter()
        documents = load_all_documents(domains, 10**12, 1234, root / "cache")
        read = time.perf_counter() - started
        prepare(root / "prepared", documents, settings, workers)
        seconds = time.perf_counter() - started
        manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # litdata's workers
    return {"documents": len(documents["synthetic"]), "read_s": read, "prepare_s": seconds, "base_rss": base,
            "peak_self": peak_self, "peak_children": peak_children,
            "near_duplicates": manifest["near_duplicates"]["synthetic"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--limit-s", type=float, default=900, help="stop a size after this many seconds")
    parser.add_argument("--tokenizer", default="byte", choices=["byte", "bpe"], help="bpe: trained (4096), then tokenized")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # the child process: corpus, workers, tokenizer
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(Path(args.one[0]), int(args.one[1]), args.one[2])))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}, tokenizer {args.tokenizer}")
    print("| documents | workers | MB text | prepare s | us/document | peak RSS main MB (over base) | "
          "peak RSS worker MB | bytes/document over base | time growth per 10x | main peak growth per 10x | "
          "near-dup groups |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    previous: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            corpus = Path(folder) / f"corpus-{size}.jsonl.zst"
            n_bytes = write_corpus(corpus, size)
            for workers in args.workers:
                try:
                    run = subprocess.run([sys.executable, __file__, "--one", str(corpus), str(workers), args.tokenizer],
                                         capture_output=True, text=True, timeout=args.limit_s)
                except subprocess.TimeoutExpired:
                    print(f"| {size:,} | {workers} | | did not finish in {args.limit_s:.0f} s | | | | | | | |")
                    continue
                if run.returncode != 0:
                    print(f"| {size:,} | {workers} | | failed: {run.stderr.strip().splitlines()[-1]} | | | | | | | |")
                    continue
                row = json.loads(run.stdout.strip().splitlines()[-1])
                growth = ("", "")
                if workers in previous:
                    before = previous[workers]
                    factor = size / before["documents"] / 10
                    growth = (f"{row['prepare_s'] / before['prepare_s'] / factor:.2f}x",
                              f"{row['peak_self'] / before['peak_self']:.2f}x")
                over = row["peak_self"] - row["base_rss"]
                print(f"| {size:,} | {workers} | {n_bytes / 1e6:.0f} | {row['prepare_s']:.1f} | "
                      f"{row['prepare_s'] / size * 1e6:.0f} | {row['peak_self'] / 2**20:.0f} ({over / 2**20:.0f}) | "
                      f"{row['peak_children'] / 2**20:.0f} | {over / size:.0f} | {growth[0]} | {growth[1]} | "
                      f"{row['near_duplicates']['groups']} |", flush=True)
                previous[workers] = row


if __name__ == "__main__":
    main()
