"""Preparation with several litdata.optimize workers, and the streamed preparation's parts that
must give exactly what the in-memory versions gave (so prepared data keeps its bytes)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import finish, read_prepared_split, write_domains

from bam_lightning.data import prepare
from bam_lightning.data.corpora import load_documents, seeded_order
from bam_lightning.data.datamodule import BAMDataModule
from bam_lightning.data.dedup import SignatureBands, group_ids, near_duplicate_groups
from bam_lightning.data.prepare import settings_digest, split_arrays, split_indices

REPO = Path(__file__).resolve().parents[1]
BAM = str(Path(sys.executable).with_name("bam"))


def list_split(n_documents, val_fraction, seed, groups=None):
    """The split as it was written before it was vectorised: a dict of member lists, a list of
    groups shuffled by random.Random(seed)."""
    groups = list(range(n_documents)) if groups is None else list(groups)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = list(members)
    random.Random(seed).shuffle(order)
    target = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    val: list[int] = []
    for group in order[:-1]:
        if len(val) >= target:
            break
        if len(val) + len(members[group]) > target and val:
            continue
        val.extend(members[group])
    held = set(val)
    return [i for i in range(n_documents) if i not in held], val


def test_vectorised_split_and_shuffle_match_the_list_versions():
    rng = random.Random(5)
    for trial in range(300):
        n = rng.randint(2, 80)
        labels = rng.sample(range(1000), rng.randint(2, n))  # any ids, not only 0..G-1
        groups = [rng.choice(labels) for _ in range(n)] if trial % 3 else None
        if groups is not None and len(set(groups)) < 2:
            continue
        fraction, seed = rng.choice([0.05, 0.2, 0.5, 0.9]), rng.randint(0, 10**6)
        expected = list_split(n, fraction, seed, groups)
        assert split_indices(n, fraction, seed, groups) == expected, trial
        train, val = split_arrays(n, fraction, seed, None if groups is None else np.asarray(groups))
        assert (train.tolist(), val.tolist()) == expected, trial
        reference = list(range(n))
        random.Random(seed).shuffle(reference)
        assert list(seeded_order(n, seed)) == reference


def test_signatures_on_disk_group_like_the_in_memory_grouping(tmp_path):
    rng = random.Random(2)
    words = [f"w{i}" for i in range(60)]  # small vocabulary: partial overlaps, big buckets
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for source in range(0, 300, 7):
        copy = documents[source].split()
        copy[rng.randrange(len(copy))] = "changed"
        documents.append(" ".join(copy))
    bands = SignatureBands(tmp_path / "signatures", len(documents))
    bands.write(iter(documents))
    for threshold in (0.3, 0.5, 0.9):
        expected = near_duplicate_groups(documents, threshold)
        assert group_ids(len(documents), bands.band, threshold).tolist() == expected
        assert len(set(expected)) < len(documents)  # something was grouped


def tree(folder):
    """Every file's bytes under `folder`, litdata's `updated_at` stamp and the timing left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            content = json.loads(path.read_text()) if path.suffix == ".json" else path.read_bytes()
            if path.name in ("index.json", "manifest.json"):
                content.pop("updated_at", None), content.pop("prepare_seconds", None)
            files[str(path.relative_to(folder))] = content
    return files


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_two_workers_prepare_exactly_what_one_prepares(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "GROUP_BYTES", 1500)  # several inputs per split, so both workers tokenize
    workers_used = []
    original = prepare._optimize
    monkeypatch.setattr(prepare, "_optimize", lambda *args: workers_used.append(args[-1]) or original(*args))
    domains = write_domains(tmp_path)
    prepared = {}
    for workers in (1, 2):
        data = BAMDataModule(domains=domains, tokenizer=tokenizer, bpe_vocab_size=300, val_fraction=0.25,
                             prepare_workers=workers, data_dir=str(tmp_path / f"workers{workers}"))
        data.prepare_data()
        data.setup("fit")
        prepared[workers] = data
        assert max(workers_used) == (1 if tokenizer == "byte" else workers)  # bytes need no tokenizing
    assert BAMDataModule(domains=domains, prepare_workers=2)._settings() == BAMDataModule(domains=domains)._settings()
    one, two = prepared[1].data_dir, prepared[2].data_dir
    assert tree(one) == tree(two)  # every chunk, index, offsets file and tokenizer
    dtype = prepared[2].manifest["token_dtype"]
    for domain, source in domains.items():
        documents = load_documents(domain, source)
        train, val = split_indices(len(documents), 0.25, 1234, near_duplicate_groups(documents))
        for split, indices in (("train", train), ("val", val)):
            tokens, _, offsets = read_prepared_split(two / domain / split, dtype)
            assert len(offsets) == len(indices) + 1 and offsets[-1] == len(tokens)
            if tokenizer == "byte":  # an independent reference: the documents' bytes, EOS-ended
                expected = b"".join(documents[i].encode() + b"\0" for i in indices)
                reference = np.frombuffer(expected, dtype=np.uint8).astype(dtype)
                reference[np.cumsum([len(documents[i].encode()) + 1 for i in indices]) - 1] = 256
                assert np.array_equal(tokens, reference)
            else:
                bpe = prepared[2].tokenizer
                for k, i in enumerate(indices):
                    assert tokens[offsets[k]:offsets[k + 1]].tolist() == bpe.encode(documents[i]) + [bpe.eos_id]


def test_bad_prepare_workers_is_named():
    with pytest.raises(ValueError, match=r"data.prepare_workers must be a whole number >= 1, got 0"):
        BAMDataModule(domains={"a": "a.txt"}, prepare_workers=0)


def test_a_failed_split_leaves_no_staging(tmp_path):
    (tmp_path / "same").mkdir()
    for i in range(3):
        (tmp_path / "same" / f"{i}.txt").write_text("the very same words in every single one of them\n")
    data = BAMDataModule(domains={"same": str(tmp_path / "same" / "*.txt")}, data_dir=str(tmp_path / "out" / "d"))
    with pytest.raises(ValueError, match="domain 'same': all 3 documents are near-duplicates"):
        data.prepare_data()
    assert list((tmp_path / "out").iterdir()) == []


def test_bam_fit_prepares_with_two_workers(tmp_path):
    """`data.prepare_workers` through the command line: two litdata workers tokenize, and the
    data is what one worker prepares (the same key, the same files)."""
    (tmp_path / "words").mkdir()
    for i in range(60):  # about 190 KB: several optimize inputs, so both workers get some
        (tmp_path / "words" / f"{i}.txt").write_text(" ".join(f"word{(i * j) % 97}" for j in range(450)))
    domains = {"words": str(tmp_path / "words" / "*.txt")}
    command = [BAM, "fit", "--config", str(REPO / "recipes" / "tiny" / "seed.yaml"),
               "--data.domains", json.dumps(domains), "--data.train_weights", "null", "--data.tokenizer", "bpe",
               "--data.bpe_vocab_size", "300", "--model.init_args.config.vocab_size", "300",
               "--data.prepare_workers", "2", "--data.seq_len", "16", "--data.batch_size", "2",
               "--data.val_tokens_per_domain", "64", "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0",
               "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "BAM_CACHE_DIR": str(tmp_path / "cache")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    returncode, output = finish(process, timeout=240)
    assert returncode == 0, output[-3000:]
    assert "words/train: tokenized by 2 optimize workers" in output
    (manifest_path,) = (tmp_path / "cache" / "prepared").glob("*/manifest.json")
    reference = BAMDataModule(domains=domains, tokenizer="bpe", bpe_vocab_size=300, data_dir=str(tmp_path / "one"))
    reference.prepare_data()
    assert settings_digest(reference._settings()) == manifest_path.parent.name  # the same key
    assert tree(manifest_path.parent) == tree(tmp_path / "one")
