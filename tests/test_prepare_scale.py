"""Data preparation stays linear in the number of documents: the near-duplicate summary counts
per group instead of scanning every document for each validation document, and the grouping is
vectorised per band; both give exactly what the plain versions give."""

from __future__ import annotations

import random

import numpy as np

from bam_lightning.data.dedup import (
    _PRIME,
    BANDS,
    JACCARD_THRESHOLD,
    NUM_HASHES,
    minhash_signatures,
    near_duplicate_groups,
    shingle_hashes,
)
from bam_lightning.data.prepare import _near_duplicate_summary, split_indices


def brute_force_summary(groups, n_documents, val_fraction, seed, val):
    """The definition, written out: every pair of documents looked at."""
    _, plain_val = split_indices(n_documents, val_fraction, seed)
    held = set(plain_val)
    leaks = sum(1 for i in plain_val if any(groups[j] == groups[i] and j not in held for j in range(n_documents)))
    sizes = {g: groups.count(g) for g in set(groups)}
    return {"groups": sum(1 for size in sizes.values() if size > 1),
            "documents_in_groups": sum(size for size in sizes.values() if size > 1),
            "val_documents": len(val), "val_leaks_without_grouping": leaks}


def test_summary_matches_the_direct_scan_on_random_groupings():
    rng = random.Random(0)
    checked_leaks = 0
    for trial in range(200):
        n = rng.randint(2, 60)
        labels = rng.sample(range(1000), rng.randint(1, n))  # any ids, not only 0..G-1
        groups = [rng.choice(labels) for _ in range(n)]
        if len(set(groups)) < 2:
            continue
        fraction, seed = rng.choice([0.05, 0.2, 0.5]), rng.randint(0, 10**6)
        _, val = split_indices(n, fraction, seed, groups)
        expected = brute_force_summary(groups, n, fraction, seed, val)
        assert _near_duplicate_summary(groups, n, fraction, seed, val) == expected, trial
        checked_leaks += expected["val_leaks_without_grouping"] > 0
    assert checked_leaks > 20  # the leak count was exercised, not only zeros


def test_summary_of_a_small_corpus_with_planted_near_duplicates():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(500)]
    documents = [" ".join(rng.choice(words) for _ in range(80)) for _ in range(40)]
    for source in range(0, 40, 4):  # ten documents get a copy with one word changed
        copy = documents[source].split()
        copy[40] = "changed"
        documents.append(" ".join(copy))
    groups = near_duplicate_groups(documents)
    assert len(set(groups)) == 40
    _, val = split_indices(len(documents), 0.3, 7, groups)
    summary = _near_duplicate_summary(groups, len(documents), 0.3, 7, val)
    assert summary == brute_force_summary(groups, len(documents), 0.3, 7, val)
    assert summary["groups"] == 10 and summary["documents_in_groups"] == 20
    assert summary["val_leaks_without_grouping"] > 0


def reference_groups(documents, threshold=JACCARD_THRESHOLD):
    """The grouping written plainly (one document and one band bucket at a time, a dict of
    buckets): what the vectorised version must reproduce exactly."""
    rng = np.random.default_rng(0)
    a = rng.integers(1, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    signatures = np.array([(((shingle_hashes(t) % _PRIME)[:, None] * a[None, :] + b[None, :]) % _PRIME).min(axis=0)
                           for t in documents])
    parent = list(range(len(documents)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    rows = NUM_HASHES // BANDS
    for band in range(BANDS):
        buckets = {}
        for i, key in enumerate(signatures[:, band * rows:(band + 1) * rows]):
            buckets.setdefault(key.tobytes(), []).append(i)
        for members in buckets.values():
            pairs = [(members[0], m) for m in members[1:]] + list(zip(members[1:], members[2:], strict=False))
            for i, j in pairs:
                if np.mean(signatures[i] == signatures[j]) >= threshold:
                    parent[root(i)] = root(j)
    roots = [root(i) for i in range(len(documents))]
    first_of = {r: n for n, r in enumerate(dict.fromkeys(roots))}
    return signatures, [first_of[r] for r in roots]


def test_vectorised_grouping_matches_the_plain_one():
    rng = random.Random(2)
    words = [f"w{i}" for i in range(60)]  # a small vocabulary: many partial overlaps, big buckets
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(400)]
    for source in range(0, 400, 7):
        copy = documents[source].split()
        copy[rng.randrange(len(copy))] = "changed"
        documents.append(" ".join(copy))
    documents += ["", "one", "one", "two words"]  # shorter than a shingle
    signatures, expected = reference_groups(documents)
    assert np.array_equal(minhash_signatures(documents), signatures)
    groups = near_duplicate_groups(documents)
    assert groups == expected
    assert len(set(groups)) < len(documents) - 30  # many joined, and some buckets hold several
    for threshold in (0.3, 0.9):
        assert near_duplicate_groups(documents, threshold) == reference_groups(documents, threshold)[1]
