"""The grain pipeline: documents -> tokens + EOS -> packed windows of seq_len + 1 -> shifted examples -> batches.

Training (infinite, per JAX process):

    MapDataset.source(train documents)[process_index::process_count]   disjoint document shards
      .shuffle(seed).repeat()                                           reshuffled every epoch (seed + epoch)
      .map(TokenizeDoc)                                                 {'tokens': int32 [n + 1]} (EOS appended)
      .to_iter_dataset(ReadOptions(num_threads))                        threaded reading + tokenising
    ConcatThenSplitIterDataset(length_struct={'tokens': S + 1})         {'tokens', 'tokens_segment_ids',
                                                                         'tokens_positions'} [S + 1]
      .map(WindowToExample)                                             shifted example, see below
      .batch(B, drop_remainder=True)                                    [B, S] numpy arrays
      [.mp_prefetch(num_workers)]                                       optional worker processes
    ExactResumeIterDataset                                              fixes ConcatThenSplit's restore (below)

A window w of S + 1 packed tokens becomes inputs = w[:-1], targets = w[1:] (so inputs[i + 1] == targets[i]) and
weights = 1 where the target is a real token. Consecutive windows do not overlap: every token of an epoch lies in
exactly one window. With packing='segments' the example also carries segment_ids = seg[:-1] (1, 2, ... per document
piece, 0 = padding) and positions = pos[:-1] (restarting at 0 in each piece), and a target in another segment than
its input (the token after an EOS) gets weight 0. Padding (only at the end of a finite stream) has the pad id,
segment 0 and weight 0.

Shards (config.data.shards = K, default one per process): the training documents are split into K shards
`docs[k::K]`, each its own pipeline above with batch B / K. Process p of N reads shards [p K / N, (p + 1) K / N) and
its batch is their batches concatenated in shard order; the global batch is the processes' batches in process order.
So a run's global batches depend on K, never on N: a 1-process run with K = 2 sees exactly the rows of a 2-process
run. The checkpointed data state is one JSON file per shard (`process_<k>-of-<K>.json`, grain's own name, so K = N
is grain's layout), and a checkpoint restores under any process count that divides K.

Validation (and test): the documents in their fixed order as one token stream, tiled into windows of S + 1 tokens
that overlap by one (`tile_windows`), so that every target token of the split is scored exactly once, with the token
before it in its context, whatever S is: arms of different sequence lengths score the same tokens. All windows
(max_val_windows 0; the last one padded) or `max_val_windows` of them, the first ones or spread evenly
(data.val_window_sampling), computed once as arrays [W, S] (plus doc_index, each target's document); `val_batches`
deals them out per process.

Resume workaround: grain 0.2.18's ConcatThenSplit state holds `remainder_slices` as tuples; after the JSON round
trip of a checkpoint they come back as lists, `[-1, -1] != (-1, -1)` makes `set_state` believe there is a remainder
when there is none, and the restored iterator skips one document. `ExactResumeIterDataset`'s iterator turns every
`remainder_slices` value back into tuples (anywhere in the nested state) before delegating `set_state`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import grain
import numpy as np
import orbax.checkpoint as ocp  # (importing it also registers grain's checkpoint args with orbax)
from grain import checkpoint as grain_checkpoint
from grain.experimental import ConcatThenSplitIterDataset

from moe_jax.data.errors import DataError

PACKINGS = ("concat", "segments")


class TokenizeDoc(grain.transforms.Map):
    """record -> {'tokens': int32 [n + 1]}: the document's text tokenised, EOS appended. Picklable."""

    def __init__(self, tokenizer, text_key: str):
        self.tokenizer = tokenizer
        self.text_key = text_key

    def map(self, record):
        value = record[self.text_key]
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        ids = self.tokenizer.encode(text)
        ids.append(self.tokenizer.eos_id)
        return {"tokens": np.asarray(ids, dtype=np.int32)}


class WindowToExample(grain.transforms.Map):
    """A packed window of S + 1 tokens -> shifted example of length S (see module docstring). Picklable."""

    def __init__(self, packing: str, pad_id: int = 0):
        if packing not in PACKINGS:
            raise DataError(f"config.data.packing={packing!r}: choose one of {PACKINGS}")
        self.packing = packing
        self.pad_id = int(pad_id)

    def map(self, window):
        tokens = np.asarray(window["tokens"], dtype=np.int32)
        seg = np.asarray(window["tokens_segment_ids"], dtype=np.int32)
        if self.pad_id != 0:
            tokens = np.where(seg == 0, self.pad_id, tokens).astype(np.int32)
        inputs, targets = tokens[:-1], tokens[1:]
        real = seg[1:] != 0
        out = {"inputs": inputs, "targets": targets}
        if self.packing == "segments":
            weights = real & (seg[:-1] == seg[1:])
            out["segment_ids"] = seg[:-1]
            out["positions"] = np.asarray(window["tokens_positions"], dtype=np.int32)[:-1]
        else:
            weights = real
        out["weights"] = weights.astype(np.float32)
        return out


def fix_state(state: Any) -> Any:
    """A copy of a (JSON-restored) pipeline state with every `remainder_slices` value turned back into tuples."""
    if isinstance(state, dict):
        fixed = {}
        for k, v in state.items():
            if k == "remainder_slices" and isinstance(v, dict):
                fixed[k] = {name: tuple(int(x) for x in sl) for name, sl in v.items()}
            else:
                fixed[k] = fix_state(v)
        return fixed
    if isinstance(state, list):
        return [fix_state(v) for v in state]
    return state


class ExactResumeIterator(grain.DatasetIterator):
    """Delegates to its parent; `set_state` applies `fix_state` first (the ConcatThenSplit restore workaround)."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(fix_state(state))

    def __str__(self) -> str:
        return "ExactResumeIterator"


class ExactResumeIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> ExactResumeIterator:
        return ExactResumeIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "ExactResumeIterDataset"


def packed_windows(docs, *, tokenize: Callable | None, seq_len: int, packing: str | None, pad_id: int = 0,
                   seed: int | None = 0, process_index: int = 0, process_count: int = 1,
                   num_epochs: int | None = None, read_threads: int = 2) -> grain.IterDataset:
    """Examples (unbatched) from random-access `docs`: this process's shard, shuffled (seed None: in order),
    repeated `num_epochs` times (None: forever), tokenised by `tokenize` (None: records already hold 'tokens'),
    packed into windows of seq_len + 1 and shifted (packing None: the raw ConcatThenSplit windows)."""
    ds = grain.MapDataset.source(docs)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if seed is not None:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if tokenize is not None:
        ds = ds.map(tokenize)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    it = ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
    return it if packing is None else it.map(WindowToExample(packing, pad_id))


def train_dataset(docs, *, tokenize: Callable | None, seq_len: int, batch_size: int, packing: str, pad_id: int = 0,
                  seed: int = 0, process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                  worker_count: int = 0, read_threads: int = 2) -> ExactResumeIterDataset:
    """The training pipeline (module docstring): batches of `batch_size` examples, checkpointable exactly."""
    if process_count > 1 and len(docs) < process_count:
        raise DataError(f"config.data: {len(docs)} training document(s) cannot be sharded over {process_count} "
                        "processes (each needs at least one). Fix: use a larger source or fewer processes.")
    it = packed_windows(docs, tokenize=tokenize, seq_len=seq_len, packing=packing, pad_id=pad_id, seed=seed,
                        process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                        read_threads=read_threads)
    it = it.batch(batch_size, drop_remainder=True)
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ExactResumeIterDataset(it)


def even_indices(total: int, count: int) -> np.ndarray:
    """`count` indices spread evenly over range(total), first and last included (all of them when count >= total):
    round(linspace(0, total - 1, count))."""
    if count <= 0 or count >= total:
        return np.arange(total)
    return np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))


def token_stream(docs, *, tokenize: Callable | None, read_threads: int = 2,
                 max_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`docs` in their order as one token stream: (tokens int32 [N], document int32 [N], the ordinal in `docs` of
    each token's document). `tokenize` (None: the records already hold 'tokens') appends one EOS per document. With
    max_tokens > 0 reading stops at the first document that brings the stream to max_tokens tokens or more."""
    ds = grain.MapDataset.source(docs)
    if tokenize is not None:
        ds = ds.map(tokenize)
    pieces, total = [], 0
    for record in ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64)):
        pieces.append(np.asarray(record["tokens"], dtype=np.int32))
        total += len(pieces[-1])
        if max_tokens and total >= max_tokens:
            break
    if not pieces:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    doc = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p) for p in pieces])
    return np.concatenate(pieces), doc


def scored_targets(doc: np.ndarray, packing: str) -> np.ndarray:
    """bool [N]: the tokens of a stream (`doc`: each token's document) that are scored as targets, given the one
    token before them: every token but the first (packing 'concat'), or every token but each document's first
    ('segments': the model does not see across documents)."""
    if packing not in PACKINGS:
        raise DataError(f"config.data.packing={packing!r}: choose one of {PACKINGS}")
    doc = np.asarray(doc)
    out = np.zeros(len(doc), dtype=bool)
    out[1:] = True if packing == "concat" else doc[1:] == doc[:-1]
    return out


def _pieces(win_doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window row of document ordinals (-1: padding): segment ids 1, 2, ... per document piece (0: padding) and
    positions restarting at 0 in each piece (0 in padding), as ConcatThenSplit numbers a packed window."""
    rows, length = win_doc.shape
    start = np.ones((rows, length), dtype=bool)
    start[:, 1:] = win_doc[:, 1:] != win_doc[:, :-1]
    seg = np.cumsum(start, axis=1)
    ar = np.broadcast_to(np.arange(length), (rows, length))
    pos = ar - np.maximum.accumulate(np.where(start, ar, 0), axis=1)
    pad = win_doc < 0
    return np.where(pad, 0, seg).astype(np.int32), np.where(pad, 0, pos).astype(np.int32)


def tile_windows(tokens: np.ndarray, doc: np.ndarray, *, seq_len: int, packing: str,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """Evaluation windows [W, S] tiling a token stream so that every scored target (`scored_targets`) is scored
    exactly once: window k holds stream tokens [kS, kS + S] (S + 1 tokens; consecutive windows share one), inputs
    its first S and targets its last S, so target j (1 <= j < N) sits in window (j - 1) // S with the token before
    it as its input. W = ceil((N - 1) / S); the last window is padded (pad id, weight 0, segment 0). Keys: inputs,
    targets, weights (1 where the target is scored), with packing 'segments' segment_ids and positions (one segment
    per document piece of the window, like the training windows), and doc_index (int32: the ordinal of each
    target's document; -1 in padding)."""
    n = len(tokens)
    rows = max(1, -(-(n - 1) // seq_len))
    length = rows * seq_len + 1
    tok = np.full(length, pad_id, dtype=np.int32)
    tok[:n] = tokens
    dd = np.full(length, -1, dtype=np.int32)
    dd[:n] = doc
    score = np.zeros(length, dtype=bool)
    score[:n] = scored_targets(doc, packing)
    idx = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    win_tok, win_doc = tok[idx], dd[idx]
    out = {"inputs": win_tok[:, :-1], "targets": win_tok[:, 1:], "weights": score[idx][:, 1:].astype(np.float32)}
    if packing == "segments":
        seg, pos = _pieces(win_doc)
        out["segment_ids"], out["positions"] = seg[:, :-1], pos[:, :-1]
    out["doc_index"] = win_doc[:, 1:]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def val_windows(docs, *, tokenize: Callable | None, seq_len: int, packing: str, pad_id: int = 0,
                max_windows: int = 0, read_threads: int = 2, sampling: str = "first") -> dict[str, np.ndarray]:
    """The fixed evaluation windows of a split as arrays [W, S] (`tile_windows` of its documents in order): all of
    them (max_windows 0: every target token of the split exactly once), or `max_windows` of them: the first ones
    (sampling 'first'; reading stops after them) or ones spread evenly over the whole split ('even',
    `even_indices`)."""
    if sampling not in ("first", "even"):
        raise DataError(f"config.data.val_window_sampling={sampling!r}: choose 'first' or 'even'")
    first = max_windows and sampling == "first"
    tokens, doc = token_stream(docs, tokenize=tokenize, read_threads=read_threads,
                               max_tokens=max_windows * seq_len + 1 if first else 0)
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"config.train.seq_len={seq_len}: the validation split has only {len(tokens)} tokens ({len(docs)} "
            f"document(s)), fewer than one window of seq_len + 1 = {seq_len + 1}. Fix: lower train.seq_len or "
            "raise data.val_fraction (or use a larger source).")
    windows = tile_windows(tokens, doc, seq_len=seq_len, packing=packing, pad_id=pad_id)
    if max_windows:
        total = len(windows["inputs"])
        keep = np.arange(min(max_windows, total)) if first else even_indices(total, max_windows)
        windows = {k: v[keep] for k, v in windows.items()}
    return windows


def val_batches(windows: dict[str, np.ndarray], batch_size: int, *, process_index: int, process_count: int,
                pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Deal fixed windows into global batches of `batch_size` rows; return this process's rows of each.

    Global batch b holds windows [b * batch_size, (b + 1) * batch_size); process p gets rows
    [p * per, (p + 1) * per) of it, per = batch_size // process_count, padded with weight-0 rows. Every process gets
    ceil(W / batch_size) batches; the shares are disjoint and together cover every window once.
    """
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"config.train.batch_size={batch_size} (the global validation batch) must be a positive "
                        f"multiple of the process count {process_count}. Fix: set train.batch_size to a multiple "
                        f"of {process_count}.")
    per = batch_size // process_count
    total = len(windows["inputs"])
    out = []
    for b in range(math.ceil(total / batch_size)):
        lo = min(total, b * batch_size + process_index * per)
        hi = min(total, lo + per) if lo < total else lo
        batch = {}
        for k, v in windows.items():
            rows = v[lo:hi]
            if len(rows) < per:
                fill = pad_id if k in ("inputs", "targets") else 0
                pad = np.full((per - len(rows),) + v.shape[1:], fill, dtype=v.dtype)
                rows = np.concatenate([rows, pad])
            batch[k] = np.ascontiguousarray(rows)
        out.append(batch)
    return out


def local_shards(num_shards: int, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` reads: a contiguous block of num_shards / count."""
    if num_shards < 1 or num_shards % process_count:
        raise DataError(f"config.data.shards={num_shards}: must be a positive multiple of the {process_count} JAX "
                        f"processes (every process reads the same number of shards). Fix: set data.shards to a "
                        f"multiple of {process_count}, or 0 (one shard per process).")
    per = num_shards // process_count
    return range(process_index * per, (process_index + 1) * per)


class ShardedIterator:
    """This process's training batches: next() concatenates one batch of each local shard, in shard order.

    `shards`: shard index -> ExactResumeIterator over that shard (batch B / K each); `num_shards`: K."""

    def __init__(self, shards: dict[int, ExactResumeIterator], num_shards: int):
        self.shards = dict(sorted(shards.items()))
        self.num_shards = num_shards

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.shards.values()]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def shard_file(self, shard: int) -> str:
        return f"process_{shard}-of-{self.num_shards}.json"


class ShardedIterDataset:
    """`iter()` gives a fresh ShardedIterator over the same shard datasets."""

    def __init__(self, shards: dict[int, ExactResumeIterDataset], num_shards: int):
        self.shards = dict(sorted(shards.items()))
        self.num_shards = num_shards

    def __iter__(self) -> ShardedIterator:
        return ShardedIterator({k: iter(v) for k, v in self.shards.items()}, self.num_shards)


class ShardFilesHandler(grain_checkpoint.CheckpointHandler):
    """orbax handler for a ShardedIterator: each process writes/reads one JSON state file per local shard."""

    def save(self, directory, item=None, args=None):
        it = item or args.item
        for shard, sub in it.shards.items():
            (directory / it.shard_file(shard)).write_text(json.dumps(sub.get_state(), indent=4))

    def restore(self, directory, item=None, args=None):
        it = item or args.item
        for shard, sub in it.shards.items():
            path = directory / it.shard_file(shard)
            if not path.exists():
                found = sorted(p.name for p in directory.iterdir() if p.name.endswith(".json"))
                counts = sorted({n.rsplit("-of-", 1)[-1][:-len(".json")] for n in found})
                raise DataError(f"config.data.shards: the checkpoint in {directory} holds data state files {found} "
                                f"(written with {' or '.join(counts)} shard(s)), not {path.name}. Fix: resume with "
                                f"--config.data.shards={counts[0] if counts else '<the shards of the saving run>'}.")
            sub.set_state(json.loads(path.read_text()))
            sub.start_prefetch()
        return it


@ocp.args.register_with_handler(ShardFilesHandler, for_save=True)
@dataclasses.dataclass
class ShardsSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ShardFilesHandler, for_restore=True)
@dataclasses.dataclass
class ShardsRestore(ocp.args.CheckpointArgs):
    item: Any


def _check_iterator(it) -> None:
    if not isinstance(it, (ExactResumeIterator, ShardedIterator)):
        raise TypeError(f"expected the train iterator of data.build() (a ShardedIterator or ExactResumeIterator), "
                        f"got {type(it).__name__}: only they restore ConcatThenSplit state exactly")


def checkpoint_save_args(train_iter):
    """orbax args saving the iterator's state (JSON, one file per shard) in an ocp.args.Composite(data=...)."""
    _check_iterator(train_iter)
    if isinstance(train_iter, ShardedIterator):
        return ShardsSave(item=train_iter)
    return grain_checkpoint.CheckpointSave(item=train_iter)


def checkpoint_restore_args(train_iter):
    """orbax args restoring the iterator's state in place (through ExactResumeIterator.set_state)."""
    _check_iterator(train_iter)
    if isinstance(train_iter, ShardedIterator):
        return ShardsRestore(item=train_iter)
    return grain_checkpoint.CheckpointRestore(item=train_iter)
