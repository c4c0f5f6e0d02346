"""Near-duplicate groups, so that close variants of a document never straddle the train/val split.

Licence texts, for example, come in many near-identical versions (BSD with another name, GPL with
an extra clause); if one is trained on and its twin validated on, validation measures memory.
Each document becomes a set of normalised word 5-shingles; a MinHash signature estimates the
Jaccard similarity of two sets, LSH banding proposes candidate pairs, and pairs whose estimated
similarity reaches the threshold are joined (transitively) into one group.
"""

from __future__ import annotations

import itertools
import re
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

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


def minhash_blocks(documents: Iterable[str], seed: int = 0) -> Iterator[np.ndarray]:
    """[m, NUM_HASHES] MinHash signatures of the next m documents, block after block, with
    universal hashes (a*x + b) mod p.

    The products are taken for many documents' shingles at once (about SHINGLE_BLOCK shingles a
    step, so memory stays bounded) and reduced per document, so a signature does not depend on
    the blocking; values are below 2**31 and stored as uint32."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    b = rng.integers(0, _PRIME, size=NUM_HASHES, dtype=np.uint64)
    hashes: list[np.ndarray] = []
    total = 0
    for document in itertools.chain(documents, [None]):
        if document is not None:
            hashes.append(shingle_hashes(document) % _PRIME)
            total += len(hashes[-1])
        if hashes and (total >= SHINGLE_BLOCK or document is None):
            counts = [len(h) for h in hashes]
            # the modulo must wrap (a, b up to p): without it every hash would pick the same shingle
            products = (np.concatenate(hashes)[:, None] * a[None, :] + b[None, :]) % _PRIME
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            yield np.minimum.reduceat(products, starts, axis=0).astype(np.uint32)
            hashes, total = [], 0


def minhash_signatures(documents: Iterable[str], seed: int = 0) -> np.ndarray:
    """[n_documents, NUM_HASHES] MinHash signatures (see `minhash_blocks`), in memory."""
    blocks = list(minhash_blocks(documents, seed))
    return np.concatenate(blocks) if blocks else np.empty((0, NUM_HASHES), dtype=np.uint32)


class SignatureBands:
    """MinHash signatures on disk, band-major ([BANDS, n, rows] uint32), written block by block
    and read one band at a time: grouping a million documents holds 16 bytes per document of one
    band in memory, never the [n, 128] matrix (512 bytes per document)."""

    def __init__(self, path: Path, n_documents: int):
        self.path, self.n = Path(path), n_documents
        self.rows = NUM_HASHES // BANDS
        self._written = 0
        with self.path.open("wb") as file:
            file.truncate(BANDS * n_documents * self.rows * 4)

    def write(self, documents: Iterable[str]) -> None:
        """The signatures of `documents` (exactly n of them, in order)."""
        with self.path.open("r+b") as file:
            for block in minhash_blocks(documents):
                bands = block.reshape(len(block), BANDS, self.rows)
                for band in range(BANDS):
                    file.seek((band * self.n + self._written) * self.rows * 4)
                    file.write(np.ascontiguousarray(bands[:, band]).tobytes())
                self._written += len(block)
        if self._written != self.n:
            raise RuntimeError(f"{self.path}: {self._written} signatures written, expected {self.n}")

    def band(self, band: int) -> np.ndarray:
        return np.fromfile(self.path, dtype=np.uint32, count=self.n * self.rows,
                           offset=band * self.n * self.rows * 4).reshape(self.n, self.rows)


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
    """A group id per document (see `group_ids`), for documents in memory."""
    signatures = minhash_signatures(documents)
    rows = NUM_HASHES // BANDS
    return group_ids(len(documents), lambda band: signatures[:, band * rows:(band + 1) * rows],
                     threshold).tolist()


def group_ids(n_documents: int, band_of: Callable[[int], np.ndarray],
              threshold: float = JACCARD_THRESHOLD) -> np.ndarray:
    """A group id per document; documents whose estimated shingle Jaccard similarity reaches
    `threshold` share one (and so, transitively, do their other near-duplicates). Ids number the
    groups in order of their first document. `band_of(b)` gives band b's [n, rows] signature
    columns.

    Linear in the documents: each band is sorted (vectorised), and only pairs that share a band
    are compared. The candidate pairs of all bands are gathered first (deduplicated), then their
    similarity is counted band by band, so a single band is in memory at a time; the groups are
    the connected components of the similar pairs, whatever order they are found in."""
    n = n_documents
    keys = np.empty(0, dtype=np.int64)  # pair (i < j) as i * n + j
    for band in range(BANDS):
        left, right = _band_candidates(band_of(band))
        keys = np.union1d(keys, np.minimum(left, right) * n + np.maximum(left, right))
    left, right = keys // max(n, 1), keys % max(n, 1)
    equal = np.zeros(len(keys), dtype=np.int64)
    for band in range(BANDS):
        signatures = band_of(band)
        for start in range(0, len(keys), 1 << 16):  # bounded memory per comparison step
            i, j = left[start:start + (1 << 16)], right[start:start + (1 << 16)]
            equal[start:start + len(i)] += (signatures[i] == signatures[j]).sum(axis=1)
    similar = equal / NUM_HASHES >= threshold  # the fraction of equal hashes, as np.mean gives it
    parent = array("q", range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for x, y in zip(left[similar].tolist(), right[similar].tolist(), strict=True):
        parent[root(x)] = root(y)
    roots = np.frombuffer(parent, dtype=np.int64).copy()
    while True:  # pointer jumping: every document's root, vectorised
        jumped = roots[roots]
        if np.array_equal(jumped, roots):
            break
        roots = jumped
    unique, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(unique), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(unique))
    return rank[inverse.reshape(-1)]
