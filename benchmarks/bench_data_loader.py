"""Training-loader speed: batches/s of `BAMDataModule.train_dataloader()` at 0 and 2 workers.

Four synthetic domains (seeded random words, `--mb` MB each, byte tokenizer) are prepared once
in a temporary cache; then each worker count iterates `--batches` batches of
batch x (seq_len + 1) tokens after a short warm-up (worker start-up included in neither).

    .venv/bin/python benchmarks/bench_data_loader.py [--batches 400] [--batch-size 32] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import tempfile
import time
from pathlib import Path

from bam_lightning.data import BAMDataModule


def write_domains(root: Path, megabytes: float) -> dict[str, str]:
    rng = random.Random(0)
    domains = {}
    for d in range(4):
        folder = root / f"domain{d}"
        folder.mkdir()
        letters = "abcdefghijklmnopqrstuvwxyz"[d * 6:d * 6 + 8]
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(2000)]
        written, i = 0, 0
        while written < megabytes * 1e6:
            text = " ".join(rng.choices(words, k=rng.randint(200, 4000)))
            (folder / f"{i}.txt").write_text(text)
            written, i = written + len(text), i + 1
        domains[f"domain{d}"] = str(folder / "*.txt")
    return domains


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400, help="timed batches per worker count")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text per domain")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["BAM_CACHE_DIR"] = str(root / "cache")
        domains = write_domains(root, args.mb)
        started = time.perf_counter()
        BAMDataModule(domains=domains, seq_len=args.seq_len).prepare_data()
        print(f"prepared 4 x {args.mb} MB in {time.perf_counter() - started:.1f} s (load {os.getloadavg()[0]:.2f})")
        print("| workers | batches/s | tokens/s |")
        print("|---|---|---|")
        for workers in args.workers:
            data = BAMDataModule(domains=domains, seq_len=args.seq_len, batch_size=args.batch_size,
                                 num_workers=workers)
            data.setup("fit")
            batches = itertools.chain.from_iterable(iter(data.train_dataloader()) for _ in itertools.count())
            for _ in itertools.islice(batches, args.warmup):
                pass
            started = time.perf_counter()
            for batch in itertools.islice(batches, args.batches):
                assert batch.shape == (args.batch_size, args.seq_len + 1)
            rate = args.batches / (time.perf_counter() - started)
            print(f"| {workers} | {rate:.0f} | {rate * batch.numel():,.0f} |")
        print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
