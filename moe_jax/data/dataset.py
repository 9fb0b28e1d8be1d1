"""`build(config)`: the data layer's entry point, returning a `Data` with tokenizer, train iterator, validation.

    ds = build(config, process_index=None, process_count=None)  # None -> jax.process_index() / process_count()
    ds.tokenizer          Tokenizer (.encode, .decode, .vocab_size, .bos_id, .eos_id, .pad_id, .path)
    ds.train_iter         infinite grain iterator; next() -> {'inputs', 'targets': int32 [B, S], 'weights': float32
                          [B, S], with packing='segments' also 'segment_ids', 'positions': int32 [B, S]}
                          B = train.batch_size * train.grad_accum // process_count, S = train.seq_len;
                          the rows of this process's data shards (config.data.shards, see pipeline.py)
    ds.val_batches(n)     fixed list of this process's shares of global validation batches of n rows
    ds.eval_batches(n, split)  the same for 'validation' or 'test' (data.test_fraction > 0; built on first use)
    ds.eval_windows(split) all windows of a split ([W, S] arrays, pipeline.tile_windows: every target token of the
                          split exactly once when data.max_val_windows = 0), doc_index: each target's document
    ds.doc_ids(split)     the source's document indices of the split, in the order doc_index counts them
    ds.stats              {source, num_docs_train, num_docs_val, tokens_train, tokens_val, vocab_size, val_windows,
                           tokens_estimated}

Token counts include one EOS per document. They are exact up to 200,000 documents per split, else estimated from an
even sample of 20,000 (`tokens_estimated` says which), and cached as
`<cache>/<source_key>/stats-<model sha256[:12]>-<split>.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from moe_jax.data import cache, pipeline
from moe_jax.data.errors import DataError
from moe_jax.data.sources import Source, open_source
from moe_jax.data.split import source_split_tag
from moe_jax.data.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("moe_jax.data")

EXACT_COUNT_MAX_DOCS = 200_000
ESTIMATE_SAMPLE_DOCS = 20_000
_COUNT_CHUNK = 512


@dataclasses.dataclass
class Data:
    """What `build` returns. `source` and `train_dataset` are there for tools and tests."""

    tokenizer: Tokenizer
    train_iter: pipeline.ShardedIterator
    stats: dict[str, Any]
    source: Source
    train_dataset: pipeline.ShardedIterDataset
    process_index: int
    process_count: int
    packing: str
    _val_windows: dict[str, np.ndarray]
    _test_windows: Any = None  # a zero-argument callable building the test windows (None: no test split)

    def val_batches(self, batch_size: int) -> list[dict[str, np.ndarray]]:
        """This process's rows of each global validation batch of `batch_size` rows (the same list every call).

        `batch_size` is global, like train.batch_size: each returned dict has batch_size // process_count rows; the
        last batch is padded with weight-0 rows; every process gets the same number of batches.
        """
        return self.eval_batches(batch_size, "validation")

    def eval_windows(self, split: str = "validation") -> dict[str, np.ndarray]:
        """All evaluation windows [W, S] of split 'validation' or 'test' (pipeline.val_windows; doc_index holds each
        target's document as an ordinal into `doc_ids(split)`). The test windows are built on the first call (data.
        test_fraction > 0): the test split is read only when a caller asks for it."""
        if split == "validation":
            return self._val_windows
        if split != "test":
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        if self._test_windows is None:
            raise DataError("config.data.test_fraction is 0: there is no test split. Fix: set data.test_fraction "
                            "> 0 (e.g. 0.05) for the runs that report on it.")
        if callable(self._test_windows):
            self._test_windows = self._test_windows()
        return self._test_windows

    def eval_batches(self, batch_size: int, split: str = "validation") -> list[dict[str, np.ndarray]]:
        """Like val_batches, for split 'validation' or 'test' (`eval_windows`)."""
        return pipeline.val_batches(self.eval_windows(split), batch_size, process_index=self.process_index,
                                    process_count=self.process_count, pad_id=self.tokenizer.pad_id)

    def doc_ids(self, split: str = "validation") -> np.ndarray:
        """int64 [n]: the source's index of every document of split 'validation' or 'test', in split order (the
        order of the windows' doc_index ordinals; the same for every run on this data)."""
        if split == "validation":
            return self.source.val.doc_indices()
        if split != "test" or self.source.test is None:
            self.eval_windows(split)  # raises the one error for a bad split name or a missing test split
        return self.source.test.doc_indices()


def _count_tokens(tok: Tokenizer, part, text_of) -> tuple[int, bool]:
    """(tokens incl. one EOS per document, estimated?) over a PartSource."""
    n = len(part)
    if n == 0:
        return 0, False
    if n <= EXACT_COUNT_MAX_DOCS:
        indices, estimated = range(n), False
    else:
        indices, estimated = np.linspace(0, n - 1, ESTIMATE_SAMPLE_DOCS).astype(np.int64).tolist(), True
    total = 0
    indices = list(indices)
    threads = max(1, min(8, os.cpu_count() or 1))
    for start in range(0, len(indices), _COUNT_CHUNK):
        texts = [text_of(part[k]) for k in indices[start:start + _COUNT_CHUNK]]
        total += sum(len(ids) + 1 for ids in tok.encode_batch(texts, threads))
    if estimated:
        total = int(round(total * n / len(indices)))
    return total, estimated


def _token_stats(config, source: Source, tok: Tokenizer) -> dict[str, Any]:
    split = source_split_tag(config.data, source.split is not None)
    path = os.path.join(source.cache_dir, f"stats-{cache.file_sha256(tok.path)[:12]}-{split}.json")
    cached = cache.read_json(path)
    keys = ("tokens_train", "tokens_val", "tokens_estimated", "num_docs_train", "num_docs_val")
    if (isinstance(cached, dict) and all(k in cached for k in keys) and cached["num_docs_train"] == len(source.train)
            and cached["num_docs_val"] == len(source.val)):
        return {k: cached[k] for k in keys + ("tokens_test", "num_docs_test") if k in cached}
    tokens_train, est_train = _count_tokens(tok, source.train, source.text)
    tokens_val, est_val = _count_tokens(tok, source.val, source.text)
    stats = {"tokens_train": tokens_train, "tokens_val": tokens_val, "tokens_estimated": est_train or est_val,
             "num_docs_train": len(source.train), "num_docs_val": len(source.val)}
    if source.test is not None:
        stats["tokens_test"], est_test = _count_tokens(tok, source.test, source.text)
        stats["num_docs_test"] = len(source.test)
        stats["tokens_estimated"] = stats["tokens_estimated"] or est_test
    cache.atomic_write_json(path, stats)
    return stats


def per_process_batch(config, process_count: int) -> int:
    """B = train.batch_size * train.grad_accum // process_count; DataError naming train.batch_size if uneven."""
    t = config.train
    if t.batch_size % process_count:
        raise DataError(f"config.train.batch_size={t.batch_size} is not divisible by the {process_count} JAX "
                        f"processes; every process loads batch_size // process_count rows of each micro-batch. "
                        f"Fix: set train.batch_size to a multiple of {process_count}.")
    return t.batch_size * t.grad_accum // process_count


def build(config, process_index: int | None = None, process_count: int | None = None) -> Data:
    """Prepare (once, cached) and open the configured data (config: a config.typed.RunConfig, already validated);
    see the module docstring."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    d, t = config.data, config.train
    batch = per_process_batch(config, process_count)

    source = open_source(config, cache.cache_root(config))
    tok = get_tokenizer(config, source)
    tokenize = pipeline.TokenizeDoc(tok, source.text_key)
    read_threads = max(1, min(4, os.cpu_count() or 1))

    def windows_of(part):
        return pipeline.val_windows(part, tokenize=tokenize, seq_len=t.seq_len, packing=d.packing,
                                    pad_id=tok.pad_id, max_windows=d.max_val_windows, read_threads=read_threads,
                                    sampling=d.val_window_sampling)

    windows = windows_of(source.val)
    num_shards = d.shards or process_count
    shards = pipeline.local_shards(num_shards, process_index, process_count)
    per_shard = batch // len(shards)
    train_ds = pipeline.ShardedIterDataset({
        k: pipeline.train_dataset(source.train, tokenize=tokenize, seq_len=t.seq_len, batch_size=per_shard,
                                  packing=d.packing, pad_id=tok.pad_id, seed=d.shuffle_seed, process_index=k,
                                  process_count=num_shards, worker_count=d.worker_count, read_threads=read_threads)
        for k in shards}, num_shards)
    stats = {"source": source.name, **_token_stats(config, source, tok), "vocab_size": tok.vocab_size,
             "val_windows": int(len(windows["inputs"]))}
    return Data(tokenizer=tok, train_iter=iter(train_ds), stats=stats, source=source, train_dataset=train_ds,
                process_index=process_index, process_count=process_count, packing=d.packing, _val_windows=windows,
                _test_windows=(lambda: windows_of(source.test)) if source.test is not None else None)
