"""Train/validation split by whole documents, chosen by a seeded hash of the document's index.

Document i (its position in the source's 'train' split) goes to validation iff

    splitmix64(i XOR SPLIT_SALT) / 2**64 < val_fraction

so about `val_fraction` of the documents, spread evenly over the source, are held out whole; no document is ever cut
between the two sides. The rule depends only on (index, val_fraction): not on the shuffle seed, the tokenizer or the
number of processes, so every run on a source evaluates on the same documents. The hash is vectorised (numpy,
chunked), and only the sorted validation indices are kept: training position k maps to document
`k + searchsorted(val - arange(len(val)), k, side='right')`, so a 365M-document source costs 5% of an int64 array.

If the hash leaves one side empty (tiny sources) the document with the smallest hash goes to validation (or the one
with the largest to training); with fewer than 2 documents no split exists and `DataError` says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.data.errors import DataError

SPLIT_SALT = 0x6D6F655F6A617821  # fixed: the split must not move when seeds or other settings change
_CHUNK = 1 << 22


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def doc_hash_unit(indices: np.ndarray) -> np.ndarray:
    """A uniform float64 in [0, 1) per document index (53 bits of its salted hash)."""
    h = splitmix64(np.asarray(indices, dtype=np.uint64) ^ np.uint64(SPLIT_SALT))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclasses.dataclass(frozen=True)
class DocSplit:
    """Which of `num_docs` documents are validation (sorted `val_indices`); all others are training."""

    num_docs: int
    val_indices: np.ndarray

    def __post_init__(self):
        gaps = self.val_indices - np.arange(len(self.val_indices), dtype=np.int64)
        object.__setattr__(self, "_gaps", gaps)

    @property
    def num_val(self) -> int:
        return int(len(self.val_indices))

    @property
    def num_train(self) -> int:
        return self.num_docs - self.num_val

    def train_doc(self, k: int) -> int:
        """Document index of the k-th training document (0 <= k < num_train)."""
        if not 0 <= k < self.num_train:
            raise IndexError(f"training document {k} out of range [0, {self.num_train})")
        return int(k + np.searchsorted(self._gaps, k, side="right"))

    def val_doc(self, k: int) -> int:
        return int(self.val_indices[k])

    def train_indices(self) -> np.ndarray:
        """All training document indices (materialised: use for small sources and tests)."""
        mask = np.ones(self.num_docs, dtype=bool)
        mask[self.val_indices] = False
        return np.flatnonzero(mask)


def hash_split(num_docs: int, val_fraction: float, *, what: str) -> DocSplit:
    """Split documents 0..num_docs-1 by the seeded hash. `what` names the source in error messages."""
    if num_docs < 2:
        raise DataError(
            f"config.data: {what} has {num_docs} document(s); a train/validation split by whole documents needs at "
            f"least 2. Fix: add documents (one per .txt file or per .jsonl line), or for a TFDS dataset whose split "
            f"is one long text set config.data.tfds_val_split (e.g. 'validation') to validate on its own split.")
    parts = []
    for start in range(0, num_docs, _CHUNK):
        idx = np.arange(start, min(num_docs, start + _CHUNK), dtype=np.int64)
        parts.append(idx[doc_hash_unit(idx) < val_fraction])
    val = np.concatenate(parts)
    if len(val) == 0 or len(val) == num_docs:
        u = doc_hash_unit(np.arange(num_docs, dtype=np.int64))  # only reachable for small sources
        if len(val) == 0:
            val = np.array([int(np.argmin(u))], dtype=np.int64)
        else:
            val = np.delete(val, int(np.argmax(u)))
    return DocSplit(num_docs=num_docs, val_indices=np.sort(val).astype(np.int64))


class PartSource:
    """Random-access view (grain data source protocol: __len__, __getitem__) of one side of a split.

    `part` is 'train' or 'validation'; with `split=None` the view is the whole source (used when validation comes
    from a separate split, config.data.tfds_val_split). Picklable when `source` is, for multiprocessing workers.
    """

    def __init__(self, source, split: DocSplit | None, part: str):
        if part not in ("train", "validation"):
            raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
        self.source, self.split, self.part = source, split, part

    def __len__(self) -> int:
        if self.split is None:
            return len(self.source)
        return self.split.num_train if self.part == "train" else self.split.num_val

    def doc_index(self, k: int) -> int:
        """Index in the underlying source of this view's k-th document."""
        if self.split is None:
            if not 0 <= k < len(self.source):
                raise IndexError(f"document {k} out of range [0, {len(self.source)})")
            return int(k)
        return self.split.train_doc(k) if self.part == "train" else self.split.val_doc(k)

    def __getitem__(self, k: int):
        return self.source[self.doc_index(int(k))]

    def __repr__(self) -> str:
        return f"PartSource({self.part}, {len(self)} documents of {self.source!r})"
