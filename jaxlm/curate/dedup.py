"""Exact and near-duplicate detection (MinHash LSH), in pieces both engines compose.

A document's key is (relative path, line) (line 0 for a whole file); among duplicates the
smallest key is kept, so the result does not depend on the order documents arrive in.

Near duplicates: a MinHash signature of each document's word shingles (datasketch; shingles stop
at sentence ends and blank lines, never at a single line break, so re-wrapped copies and
reordered paragraphs keep theirs), split into `bands` bands of `rows` rows (datasketch's
optimal split for the threshold); documents sharing a band are candidates, and a candidate
pair is a duplicate when the signatures agree on at least
`threshold` of their positions (the MinHash estimate of the Jaccard similarity). Duplicate pairs
join clusters (connected components); each cluster keeps its smallest key. Grouping happens per
band (a dict here, a GroupByKey in Beam), never in one global index.
"""

from __future__ import annotations

import base64
import collections
import re
from typing import Iterable, Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from jaxlm.curate.rules import WORD, dedup_hash
from jaxlm.curate.settings import DedupConfig

# Where shingles stop: a sentence's end (. ! ? and closing quotes/brackets, then whitespace) or a
# blank line. Single line breaks are spaces: rewrapping moves them; sentences stay.
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")

DocKey = tuple[str, int]  # (path relative to the inputs' common folder, line; 0: whole file)


def format_key(key: DocKey) -> str:
  """"dir/file.txt" or "dir/file.jsonl:12", as the text_files corpus names documents."""
  return f"{key[0]}:{key[1]}" if key[1] else key[0]


def exact_hash(text: str) -> str:
  """Hash of the lower-cased text with whitespace collapsed."""
  return dedup_hash(text)


def band_shape(config: DedupConfig) -> tuple[int, int]:
  """(bands, rows per band) minimizing false positives + negatives at the threshold."""
  lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
  return lsh.b, lsh.r


class Signer:
  """MinHash signatures of word shingles; the permutations are drawn once (from the seed)."""

  def __init__(self, config: DedupConfig):
    self.config = config
    # "affine32": datasketch 2's permutation scheme (named, so signatures stay comparable).
    self._permutations = MinHash(num_perm=config.num_perm, seed=config.seed,
                                 scheme="affine32").permutations

  def __call__(self, text: str) -> np.ndarray:
    """[num_perm] uint32 signature of the set of `shingle_words`-word shingles of `text`.

    Shingles run over the words of each sentence (SENTENCE_END), wherever its line breaks
    fall: a copy whose lines were wrapped differently (the commonest web duplicate after
    boilerplate) has the same shingles, and so has one with its paragraphs reordered (the
    earlier within-line shingles lost the first). A sentence shorter than a shingle is one.
    Measured per kind of copy: jaxlm/curate/dedup_study.py.
    """
    n = self.config.shingle_words
    shingles = set()
    for sentence in SENTENCE_END.split(text.lower()):
      words = WORD.findall(sentence)
      shingles.update(" ".join(words[i:i + n]).encode("utf-8")
                      for i in range(max(1, len(words) - n + 1)) if words)
    minhash = MinHash(num_perm=self.config.num_perm, seed=self.config.seed,
                      permutations=self._permutations, scheme="affine32")
    minhash.update_batch(sorted(shingles) or [b""])
    return minhash.hashvalues.astype(np.uint32)


def encode_signature(signature: np.ndarray) -> str:
  return base64.b64encode(signature.astype("<u4").tobytes()).decode("ascii")


def decode_signature(text: str) -> np.ndarray:
  return np.frombuffer(base64.b64decode(text), dtype="<u4")


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
  """One hashable key per band: its index and its rows' values."""
  return [band.to_bytes(2, "big") + signature[band * rows:(band + 1) * rows].astype(">u4").tobytes()
          for band in range(bands)]


def bucket_pairs(members: Sequence[tuple[DocKey, np.ndarray]], threshold: float
                 ) -> list[tuple[DocKey, DocKey]]:
  """The duplicate pairs (smaller key first) among documents that share a band."""
  members = sorted(members, key=lambda m: m[0])
  if len(members) < 2:
    return []
  signatures = np.stack([s for _, s in members])  # [members, num_perm]
  pairs = []
  for i in range(len(members) - 1):
    agreement = (signatures[i + 1:] == signatures[i]).mean(axis=1)
    pairs.extend((members[i][0], members[i + 1 + j][0])
                 for j in np.flatnonzero(agreement >= threshold))
  return pairs


def cluster_roots(pairs: Iterable[tuple[DocKey, DocKey]]) -> dict[DocKey, DocKey]:
  """{member: smallest key of its cluster} for every document in a duplicate pair (union-find
  over the pairs: connected components)."""
  parent: dict[DocKey, DocKey] = {}

  def root(key: DocKey) -> DocKey:
    parent.setdefault(key, key)
    while parent[key] != key:
      parent[key] = parent[parent[key]]
      key = parent[key]
    return key

  for a, b in pairs:
    ra, rb = root(a), root(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  return {key: root(key) for key in list(parent)}


def size_histogram(roots: dict[DocKey, DocKey]) -> dict[str, int]:
  """{cluster size: number of clusters} (sizes as strings, for JSON)."""
  sizes = collections.Counter(roots.values())
  return {str(size): count for size, count in sorted(collections.Counter(sizes.values()).items())}


def near_duplicates(signatures: dict[DocKey, np.ndarray], config: DedupConfig
                    ) -> dict[DocKey, DocKey]:
  """{member: root} of the near-duplicate clusters of `signatures`, grouped per band in memory
  (the one-machine engine; Beam groups with GroupByKey)."""
  bands, rows = band_shape(config)
  buckets: dict[bytes, list[tuple[DocKey, np.ndarray]]] = collections.defaultdict(list)
  for key, signature in signatures.items():
    for band in band_keys(signature, bands, rows):
      buckets[band].append((key, signature))
  pairs = {pair for members in buckets.values() if len(members) > 1
           for pair in bucket_pairs(members, config.threshold)}
  return cluster_roots(sorted(pairs))
