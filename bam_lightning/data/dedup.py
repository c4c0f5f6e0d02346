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
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

SHINGLE_WORDS = 5
NUM_HASHES = 128
BANDS = 32  # 32 bands of 4 rows: a pair at Jaccard 0.5 becomes a candidate with p > 0.87
JACCARD_THRESHOLD = 0.5
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
    """[n_documents, NUM_HASHES] MinHash signatures with universal hashes (a*x + b) mod p."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    # values are below 2**31: stored as uint32, half the memory of a million documents' signatures
    signatures = np.empty((len(documents), NUM_HASHES), dtype=np.uint32)
    for row, text in enumerate(documents):
        hashes = shingle_hashes(text) % _PRIME
        # the modulo must wrap (a, b up to p): without it every hash would pick the same shingle
        signatures[row] = ((hashes[:, None] * a[None, :] + b[None, :]) % _PRIME).min(axis=0)
    return signatures


def near_duplicate_groups(documents: Sequence[str], threshold: float = JACCARD_THRESHOLD) -> list[int]:
    """A group id per document; documents whose estimated shingle Jaccard similarity reaches
    `threshold` share one (and so, transitively, do their other near-duplicates)."""
    parent = list(range(len(documents)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    signatures = minhash_signatures(documents)
    rows = NUM_HASHES // BANDS
    candidates: set[tuple[int, int]] = set()
    for band in range(BANDS):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, key in enumerate(signatures[:, band * rows:(band + 1) * rows]):
            buckets[key.tobytes()].append(i)
        for members in buckets.values():
            candidates.update((members[0], other) for other in members[1:])
            candidates.update((members[j], members[j + 1]) for j in range(1, len(members) - 1))
    for i, j in candidates:
        if np.mean(signatures[i] == signatures[j]) >= threshold:
            parent[root(i)] = root(j)
    roots = [root(i) for i in range(len(documents))]
    first_of = {r: n for n, r in enumerate(dict.fromkeys(roots))}
    return [first_of[r] for r in roots]
