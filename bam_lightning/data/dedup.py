"""Near-duplicate groups, so that close variants of a document never straddle the train/val split.

Licence texts, for example, come in many near-identical versions (BSD with another name, GPL with
an extra clause); if one is trained on and its twin validated on, validation measures memory.
Each document becomes a set of normalised word 5-shingles; a MinHash signature estimates the
Jaccard similarity of two sets, LSH banding proposes candidate pairs, and pairs whose estimated
similarity reaches the threshold are joined (transitively) into one group.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

SHINGLE_WORDS = 5
NUM_HASHES = 128
BANDS = 32  # 32 bands of 4 rows: a pair at Jaccard 0.5 becomes a candidate with p > 0.87
JACCARD_THRESHOLD = 0.5
SHINGLE_BLOCK = 1 << 15  # shingles hashed per vectorised step: [block, NUM_HASHES] uint64 = 32 MiB
_PRIME = (1 << 31) - 1  # a Mersenne prime: (a*x + b) with a, b, x < 2**31 fits in uint64
_WORD = re.compile(r"\w+")


def shingle_hashes(text: str) -> np.ndarray:
    """32-bit hashes of the document's lower-cased word 5-shingles (punctuation and spacing
    ignored, so re-wrapped or re-punctuated copies still match)."""
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE_WORDS:
        shingles = [" ".join(words)]
    else:
        shingles = [" ".join(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)]
    return np.unique(np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64))


def minhash_signatures(documents: Sequence[str], seed: int = 0) -> np.ndarray:
    """[n_documents, NUM_HASHES] MinHash signatures with universal hashes (a*x + b) mod p.

    The products are taken for many documents' shingles at once (about SHINGLE_BLOCK shingles a
    step, so memory stays bounded) and reduced per document; values are below 2**31 and stored
    as uint32 (half the memory of a million documents' signatures)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    signatures = np.empty((len(documents), NUM_HASHES), dtype=np.uint32)
    first = 0
    while first < len(documents):
        hashes, counts, total = [], [], 0
        while first + len(counts) < len(documents) and total < SHINGLE_BLOCK:
            hashes.append(shingle_hashes(documents[first + len(counts)]) % _PRIME)
            counts.append(len(hashes[-1]))
            total += counts[-1]
        joined = np.concatenate(hashes)
        # the modulo must wrap (a, b up to p): without it every hash would pick the same shingle
        products = (joined[:, None] * a[None, :] + b[None, :]) % _PRIME
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        signatures[first:first + len(counts)] = np.minimum.reduceat(products, starts, axis=0)
        first += len(counts)
    return signatures


def _band_candidates(band: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of one band: documents whose rows in it are equal. Per bucket (members in
    index order m0, m1, ...) the pairs (m0, mk) and (mk, mk+1): enough to join a bucket, linear
    in its size."""
    n = len(band)
    order = np.lexsort((np.arange(n),) + tuple(band[:, c] for c in range(band.shape[1] - 1, -1, -1)))
    ordered = band[order]
    same_as_previous = np.zeros(n, dtype=bool)
    same_as_previous[1:] = (ordered[1:] == ordered[:-1]).all(axis=1)
    bucket_start = np.maximum.accumulate(np.where(same_as_previous, 0, np.arange(n)))
    members = np.flatnonzero(same_as_previous)  # every member but the first of its bucket
    first_pairs = (order[bucket_start[members]], order[members])
    chained = members[members + 1 < n]
    chained = chained[same_as_previous[chained + 1]]  # the next one is in the same bucket
    chain_pairs = (order[chained], order[chained + 1])
    return (np.concatenate([first_pairs[0], chain_pairs[0]]), np.concatenate([first_pairs[1], chain_pairs[1]]))


def near_duplicate_groups(documents: Sequence[str], threshold: float = JACCARD_THRESHOLD) -> list[int]:
    """A group id per document; documents whose estimated shingle Jaccard similarity reaches
    `threshold` share one (and so, transitively, do their other near-duplicates). Ids number the
    groups in order of their first document. Linear in the documents: each band is sorted
    (vectorised), and only pairs that share a band are compared."""
    parent = list(range(len(documents)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    signatures = minhash_signatures(documents)
    rows = NUM_HASHES // BANDS
    for band in range(BANDS):
        left, right = _band_candidates(signatures[:, band * rows:(band + 1) * rows])
        for start in range(0, len(left), 1 << 16):  # bounded memory per comparison step
            i, j = left[start:start + (1 << 16)], right[start:start + (1 << 16)]
            similar = (signatures[i] == signatures[j]).mean(axis=1) >= threshold
            for x, y in zip(i[similar].tolist(), j[similar].tolist(), strict=True):
                parent[root(x)] = root(y)
    roots = [root(i) for i in range(len(documents))]
    first_of = {r: n for n, r in enumerate(dict.fromkeys(roots))}
    return [first_of[r] for r in roots]
