"""Exact and near-duplicate document removal across all inputs of one prepare run.

Exact: sha256 of the normalized text. Near: MinHash signatures of word 5-gram shingles
(datasketch), bucketed by LSH for a Jaccard threshold; the first document of a cluster (in
input order) is kept, later ones are dropped. Both keep their state in memory: fine for the
millions of documents one prepare run handles, not for a whole web crawl.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_TOKEN = re.compile(r"\w+")
_SCHEME = MinHash(num_perm=1).scheme     # hash scheme of this datasketch version's MinHash


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class ExactDedup:
    def __init__(self):
        self._seen: set[bytes] = set()

    def is_duplicate(self, text_digest: bytes) -> bool:
        """True if this digest was seen before; otherwise remembers it."""
        if text_digest in self._seen:
            return True
        self._seen.add(text_digest)
        return False


def shingles(text: str, n: int) -> list[bytes]:
    """Word n-grams of the lower-cased text (whole text if shorter than n words)."""
    words = _TOKEN.findall(text.lower())
    if len(words) < n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


class NearDedup:
    """MinHash-LSH near-duplicate detector with Jaccard `threshold` on word `ngram` shingles."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"near-dedup threshold {threshold}: must lie in (0, 1)")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._count = 0

    def signature(self, text: str) -> np.ndarray | None:
        """MinHash values of the text's shingles (computed in worker processes by prepare);
        None for a text without words, whose one shingle (b"") every such text would share."""
        if not _TOKEN.search(text):
            return None
        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(shingles(text, self.ngram))
        return m.hashvalues

    def is_duplicate(self, signature: np.ndarray | None) -> bool:
        """True if the document is near an earlier one; otherwise remembers it. A text without
        words (signature None) is never a near duplicate (exact dedup still sees it)."""
        if signature is None:
            return False
        sig = LeanMinHash(seed=self.seed, hashvalues=signature, scheme=_SCHEME)
        if self._lsh.query(sig):
            return True
        self._lsh.insert(str(self._count), sig, check_duplication=False)
        self._count += 1
        return False


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    """Exact Jaccard similarity of two texts' shingle sets (reference for tests and tuning)."""
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / max(1, len(sa | sb)) if (sa or sb) else 1.0



