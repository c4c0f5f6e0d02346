"""Prepares the same data with two versions of bam_lightning and compares the trees byte for byte.

    # in a checkout of the old version (PYTHONPATH puts it first) and of the new one:
    PYTHONPATH=/tmp/old .venv/bin/python benchmarks/check_prepare_identity.py prepare /tmp/ident/old
    .venv/bin/python benchmarks/check_prepare_identity.py prepare /tmp/ident/new [--workers 1]
    .venv/bin/python benchmarks/check_prepare_identity.py compare /tmp/ident/old /tmp/ident/new

Cases: the tiny study's data (four built-in domains, byte tokenizer, default cap), the data-module
test fixtures' user files (.txt folder + .jsonl) with the byte and the BPE tokenizer, and the same
files under a byte cap that drops documents. Every file is compared; `index.json` without
litdata's `updated_at` stamp, the manifest without `prepare_seconds`.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from pathlib import Path


def write_fixture_domains(root: Path, n_docs: int = 40) -> dict[str, str]:
    """tests/test_data_module.py's two domains (words in .txt files, digits in a .jsonl)."""
    domains = {"letters": str(root / "letters" / "*.txt"), "digits": str(root / "digits.jsonl")}
    if (root / "digits.jsonl").is_file():  # written once: file times are part of the data's identity
        return domains
    rng = random.Random(0)
    (root / "letters").mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = ("".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(500))
        (root / "letters" / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n")
    with open(root / "digits.jsonl", "w") as file:
        for _ in range(n_docs):
            file.write(json.dumps({"text": " ".join(str(rng.randint(0, 10**6)) for _ in range(150))}) + "\n")
    return domains


def write_synthetic(root: Path) -> str:
    """bench_prepare_scale.py's corpus (1% near-duplicates), 5000 documents, as .jsonl.zst."""
    path = root / "synthetic.jsonl.zst"
    if not path.is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_prepare_scale import write_corpus

        write_corpus(path, 5000)
    return str(path)


def prepare_all(out: Path, workers: int | None) -> None:
    import bam_lightning
    from bam_lightning.data.datamodule import BAMDataModule

    print("bam_lightning from", bam_lightning.__file__, flush=True)
    fixtures = write_fixture_domains(Path("/tmp/ident/fixtures"))
    extra = {} if workers is None else {"prepare_workers": workers}
    cases = {
        "tiny_study": {"domains": None, "tokenizer": "byte"},
        "fixtures_byte": {"domains": fixtures, "tokenizer": "byte"},
        "fixtures_bpe": {"domains": fixtures, "tokenizer": "bpe", "bpe_vocab_size": 400},
        "fixtures_capped": {"domains": fixtures, "tokenizer": "byte", "max_bytes_per_domain": 60_000},
        "synthetic_bpe": {"domains": {"synthetic": write_synthetic(Path("/tmp/ident/fixtures")), "math": "builtin"},
                          "tokenizer": "bpe", "bpe_vocab_size": 1000, "max_bytes_per_domain": 1_000_000},
    }
    for name, arguments in cases.items():
        started = time.perf_counter()
        BAMDataModule(data_dir=str(out / name), **arguments, **extra).prepare_data()
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)


def digest(path: Path) -> str:
    if path.name == "index.json":
        index = json.loads(path.read_text())
        index.pop("updated_at", None)
        return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
    if path.name == "manifest.json":
        manifest = json.loads(path.read_text())
        manifest.pop("prepare_seconds", None)
        return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(old: Path, new: Path) -> int:
    failures = 0
    for case in sorted(p.name for p in old.iterdir()):
        a = {p.relative_to(old / case): digest(p) for p in (old / case).rglob("*") if p.is_file()}
        b = {p.relative_to(new / case): digest(p) for p in (new / case).rglob("*") if p.is_file()}
        differ = sorted(str(k) for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        failures += bool(differ)
        print(f"{case}: {len(a)} files, {'IDENTICAL' if not differ else 'DIFFER: ' + ', '.join(differ[:10])}")
    return failures


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        workers = int(sys.argv[sys.argv.index("--workers") + 1]) if "--workers" in sys.argv else None
        prepare_all(Path(sys.argv[2]), workers)
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
