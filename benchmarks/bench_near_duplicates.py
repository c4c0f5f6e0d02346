"""What near-duplicate grouping does to the built-in corpora's train/validation split.

For each domain (at the recipes' byte cap and split): how many documents fall in near-duplicate
groups, how many validation documents a plain per-document split would have had with a
near-duplicate on the training side (the grouped split has none by construction), how many
documents the grouped split validates on, and the time the grouping takes.

    .venv/bin/python benchmarks/bench_near_duplicates.py [--domains legal code] [--max-bytes 8000000]
"""

from __future__ import annotations

import argparse
import time

from bam_lightning.data.corpora import BUILTIN_DOMAINS, default_cache_dir, load_documents
from bam_lightning.data.dedup import JACCARD_THRESHOLD, near_duplicate_groups
from bam_lightning.data.prepare import _near_duplicate_summary, split_indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=list(BUILTIN_DOMAINS))
    parser.add_argument("--max-bytes", type=int, default=8_000_000, help="data.max_bytes_per_domain")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="data.val_fraction")
    parser.add_argument("--seed", type=int, default=1234, help="data.seed")
    args = parser.parse_args()
    print(f"Jaccard threshold {JACCARD_THRESHOLD} on word 5-shingles")
    print("| domain | documents | MB | in groups | groups | val docs | val leaks without grouping | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for domain in args.domains:
        documents = load_documents(domain, "builtin", args.max_bytes, args.seed, default_cache_dir())
        started = time.perf_counter()
        groups = near_duplicate_groups(documents)
        seconds = time.perf_counter() - started
        _, val = split_indices(len(documents), args.val_fraction, args.seed, groups)
        s = _near_duplicate_summary(groups, len(documents), args.val_fraction, args.seed, val)
        megabytes = sum(len(d.encode()) for d in documents) / 1e6
        print(f"| {domain} | {len(documents)} | {megabytes:.1f} | {s['documents_in_groups']} | {s['groups']} | "
              f"{s['val_documents']} | {s['val_leaks_without_grouping']} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
