"""Data preparation at 10k, 100k and 1M documents: time and peak memory per document.

Each size runs in a fresh process (peak RSS is per process): it writes a synthetic domain as one
`.jsonl.zst` file (short documents of random words, 1% of them near-duplicates of another), then
runs what `BAMDataModule.prepare_data` runs: read, near-duplicate grouping, split, byte
tokenizing and the litdata write. Linear preparation shows as flat time per document and
memory per document that falls (fixed costs spread out) or stays flat; the growth column is each
row's time (and peak memory) over the previous row's, per 10x documents.

    .venv/bin/python benchmarks/bench_prepare_scale.py [--sizes 10000 100000 1000000] [--limit-s 600]
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


def one_size(n_documents: int) -> dict:
    """Runs in its own process: generate, then prepare; time and peak RSS of each part."""
    from bam_lightning.data.prepare import load_all_documents, prepare, prepare_settings

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        corpus = root / "corpus.jsonl.zst"
        started = time.perf_counter()
        n_bytes = write_corpus(corpus, n_documents)
        generated = time.perf_counter() - started
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        domains = {"synthetic": str(corpus)}
        settings = prepare_settings(domains, "byte", 4096, 0.05, 10**12, 1234)
        started = time.perf_counter()
        documents = load_all_documents(domains, 10**12, 1234, root / "cache")
        read = time.perf_counter() - started
        prepare(root / "prepared", documents, settings)
        seconds = time.perf_counter() - started
        manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # litdata's worker
    return {"documents": n_documents, "bytes": n_bytes, "generate_s": generated, "read_s": read,
            "prepare_s": seconds, "peak_rss": max(peak_self, peak_children), "rss_before": rss_before * 1024,
            "near_duplicates": manifest["near_duplicates"]["synthetic"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--limit-s", type=float, default=900, help="stop a size after this many seconds")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    print("| documents | MB text | prepare s | us/document | peak RSS MB | KB/document | time growth per 10x | "
          "memory growth per 10x | near-dup groups |")
    print("|---|---|---|---|---|---|---|---|---|")
    previous = None
    for size in args.sizes:
        try:
            run = subprocess.run([sys.executable, __file__, "--one", str(size)], capture_output=True, text=True,
                                 timeout=args.limit_s)
        except subprocess.TimeoutExpired:
            print(f"| {size:,} | | did not finish in {args.limit_s:.0f} s | | | | | | |")
            break
        if run.returncode != 0:
            print(f"| {size:,} | | failed: {run.stderr.strip().splitlines()[-1]} | | | | | | |")
            break
        row = json.loads(run.stdout.strip().splitlines()[-1])
        growth = ("", "")
        if previous:
            factor = row["documents"] / previous["documents"] / 10
            growth = (f"{row['prepare_s'] / previous['prepare_s'] / factor:.1f}x",
                      f"{row['peak_rss'] / previous['peak_rss'] / factor:.1f}x")
        print(f"| {size:,} | {row['bytes'] / 1e6:.0f} | {row['prepare_s']:.1f} | "
              f"{row['prepare_s'] / size * 1e6:.0f} | {row['peak_rss'] / 2**20:.0f} | "
              f"{row['peak_rss'] / size / 1024:.2f} | {growth[0]} | {growth[1]} | "
              f"{row['near_duplicates']['groups']} |", flush=True)
        previous = row


if __name__ == "__main__":
    main()
