"""Train/validation[/test] split by whole documents, chosen by a seeded hash of the document's index.

Document i (its position in the source's 'train' split), with u_i = splitmix64(i XOR SPLIT_SALT) / 2**64, goes to

    validation  iff u_i < val_fraction
    test        iff val_fraction <= u_i < val_fraction + test_fraction      (only when test_fraction > 0)
    training    otherwise

so about `val_fraction` (and `test_fraction`) of the documents, spread evenly over the source, are held out whole; no
document is ever cut between two sides. With test_fraction = 0 (the default) the split is the two-way one, with the
same validation documents as before the test side existed. Validation is for choosing settings (learning rates...),
test for reporting a final run once (moe_jax/studies). The rule depends only on (index, fractions): not on the
shuffle seed, the tokenizer or the number of processes, so every run on a source evaluates on the same documents.
The hash is vectorised (numpy, chunked), and only the sorted held-out indices are kept: training position k maps to
document `k + searchsorted(held - arange(len(held)), k, side='right')`, so a 365M-document source costs 5% of an
int64 array.

If the hash leaves a side empty (tiny sources) the document with the smallest hash goes to validation, the smallest
remaining one to test, or the one with the largest to training; with too few documents no split exists and
`DataError` says so.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moe_jax.data.errors import DataError

SPLIT_SALT = 0x6D6F655F6A617821  # fixed: the split must not move when seeds or other settings change
_CHUNK = 1 << 22
PARTS = ("train", "validation", "test")


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


def split_tag(val_fraction: float, test_fraction: float = 0.0) -> str:
    """Names a split in cache file names: 'val0.05', or 'val0.05-test0.05' with a test side."""
    return f"val{val_fraction:g}" + (f"-test{test_fraction:g}" if test_fraction else "")


def source_split_tag(data_config, hash_split: bool) -> str:
    """Names a source's split in cache file names: `split_tag` of the hash split, or 'val-<data.tfds_val_split>' when
    validation is a separate TFDS split (hash_split False)."""
    d = data_config
    return split_tag(d.val_fraction, d.test_fraction) if hash_split else f"val-{d.tfds_val_split}"


@dataclasses.dataclass(frozen=True)
class DocSplit:
    """Which of `num_docs` documents are validation (sorted `val_indices`) and test (sorted `test_indices`, empty
    without a test side); all others are training."""

    num_docs: int
    val_indices: np.ndarray
    test_indices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self):
        held = np.sort(np.concatenate([self.val_indices, self.test_indices]).astype(np.int64))
        gaps = held - np.arange(len(held), dtype=np.int64)
        object.__setattr__(self, "_held", held)
        object.__setattr__(self, "_gaps", gaps)

    @property
    def num_val(self) -> int:
        return int(len(self.val_indices))

    @property
    def num_test(self) -> int:
        return int(len(self.test_indices))

    @property
    def num_train(self) -> int:
        return self.num_docs - self.num_val - self.num_test

    def train_doc(self, k: int) -> int:
        """Document index of the k-th training document (0 <= k < num_train)."""
        if not 0 <= k < self.num_train:
            raise IndexError(f"training document {k} out of range [0, {self.num_train})")
        return int(k + np.searchsorted(self._gaps, k, side="right"))

    def val_doc(self, k: int) -> int:
        return int(self.val_indices[k])

    def test_doc(self, k: int) -> int:
        return int(self.test_indices[k])

    def train_indices(self) -> np.ndarray:
        """All training document indices (materialised: use for small sources and tests)."""
        mask = np.ones(self.num_docs, dtype=bool)
        mask[self._held] = False
        return np.flatnonzero(mask)


def hash_split(num_docs: int, val_fraction: float, *, what: str, test_fraction: float = 0.0) -> DocSplit:
    """Split documents 0..num_docs-1 by the seeded hash. `what` names the source in error messages."""
    need = 3 if test_fraction > 0 else 2
    if num_docs < need:
        raise DataError(
            f"config.data: {what} has {num_docs} document(s); a split by whole documents needs at least {need}"
            f"{' (train, validation and test)' if need == 3 else ''}. Fix: add documents (one per .txt file or per "
            f".jsonl line), or for a TFDS dataset whose split is one long text set config.data.tfds_val_split (e.g. "
            f"'validation') to validate on its own split.")
    val_parts, test_parts = [], []
    for start in range(0, num_docs, _CHUNK):
        idx = np.arange(start, min(num_docs, start + _CHUNK), dtype=np.int64)
        u = doc_hash_unit(idx)
        val_parts.append(idx[u < val_fraction])
        if test_fraction > 0:
            test_parts.append(idx[(u >= val_fraction) & (u < val_fraction + test_fraction)])
    val = np.concatenate(val_parts)
    test = np.concatenate(test_parts) if test_parts else np.zeros(0, dtype=np.int64)
    if len(val) == 0 or (test_fraction > 0 and len(test) == 0) or len(val) + len(test) == num_docs:
        u = doc_hash_unit(np.arange(num_docs, dtype=np.int64))  # only reachable for small sources
        order = np.argsort(u)
        if len(val) == 0:
            val = np.array([int(order[0])], dtype=np.int64)
            test = test[test != order[0]]
        if test_fraction > 0 and len(test) == 0:
            test = np.array([int(next(i for i in order if i not in set(val.tolist())))], dtype=np.int64)
        if len(val) + len(test) == num_docs:  # give the document with the largest hash back to training
            last = int(order[-1])
            val, test = val[val != last], test[test != last]
    return DocSplit(num_docs=num_docs, val_indices=np.sort(val).astype(np.int64),
                    test_indices=np.sort(test).astype(np.int64))


class PartSource:
    """Random-access view (grain data source protocol: __len__, __getitem__) of one side of a split.

    `part` is 'train', 'validation' or 'test'; with `split=None` the view is the whole source (used when validation
    comes from a separate split, config.data.tfds_val_split). Picklable when `source` is, for multiprocessing workers.
    """

    def __init__(self, source, split: DocSplit | None, part: str):
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.source, self.split, self.part = source, split, part

    def __len__(self) -> int:
        if self.split is None:
            return len(self.source)
        return {"train": self.split.num_train, "validation": self.split.num_val, "test": self.split.num_test}[self.part]

    def doc_index(self, k: int) -> int:
        """Index in the underlying source of this view's k-th document."""
        if self.split is None:
            if not 0 <= k < len(self.source):
                raise IndexError(f"document {k} out of range [0, {len(self.source)})")
            return int(k)
        if self.part == "train":
            return self.split.train_doc(k)
        return self.split.val_doc(k) if self.part == "validation" else self.split.test_doc(k)

    def doc_indices(self) -> np.ndarray:
        """int64 [len(self)]: `doc_index` of every document of this view, in order."""
        if self.split is None:
            return np.arange(len(self.source), dtype=np.int64)
        if self.part == "train":
            return self.split.train_indices().astype(np.int64)
        return np.asarray(self.split.val_indices if self.part == "validation" else self.split.test_indices,
                          dtype=np.int64)

    def __getitem__(self, k: int):
        return self.source[self.doc_index(int(k))]

    def __repr__(self) -> str:
        return f"PartSource({self.part}, {len(self)} documents of {self.source!r})"
