"""End-to-end tests of data.build() on the shipped corpus (and small local files): batch format, the document split
on the Bible, determinism, exact resume through orbax, per-process shards, validation batches, stats, errors."""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from moe_jax.config import schema as config_lib
from smoke_helpers import run_config
from moe_jax import data
from moe_jax.data import pipeline

S, BATCH, ACCUM, V = 32, 4, 2, 512


def make_config(cache_dir, model=(), train=(), **data_fields):
    """The base config at vocab V, batch BATCH x ACCUM of S tokens, 40 validation windows, data cached in
    `cache_dir`, with `data.<k> = v` for each keyword and the `model` and `train` field dicts; parsed."""
    c = config_lib.base_config()
    c.model.vocab_size = V
    c.train.seq_len, c.train.batch_size, c.train.grad_accum = S, BATCH, ACCUM
    c.data.cache_dir = str(cache_dir)
    c.data.max_val_windows = 40
    return run_config(c, data=data_fields, model=dict(model), train=dict(train))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def bible(cache_dir):
    return data.build(make_config(cache_dir), process_index=0, process_count=1)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                      for x, y in zip(xs, ys))


def test_batches_have_the_trainer_format(bible, cache_dir):
    b = next(bible.train_iter)
    assert set(b) == {"inputs", "targets", "weights"}
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (BATCH * ACCUM, S)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32 and b["weights"].dtype == np.float32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert b["weights"].min() == 1.0  # training windows are full
    assert b["inputs"].max() < V and b["inputs"].min() >= 0

    seg = data.build(make_config(cache_dir, packing="segments"), process_index=0, process_count=1)
    s = next(seg.train_iter)
    assert set(s) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert all(v.shape == (BATCH * ACCUM, S) for v in s.values())
    assert s["segment_ids"].dtype == np.int32 and s["positions"].dtype == np.int32
    eos = s["inputs"] == seg.tokenizer.eos_id
    assert (s["weights"][eos] == 0).all()  # the token after an EOS starts another document: not scored
    assert set(seg.val_batches(BATCH)[0]) == set(s) | {"doc_index"}  # and each target's document


def test_tokenizer_and_stats(bible):
    tok = bible.tokenizer
    assert tok.vocab_size == V and tok.eos_id == 3 and tok.bos_id == 2 and tok.pad_id == 0
    assert os.path.isfile(tok.path) and tok.path.endswith(".model")
    assert tok.decode(tok.encode("And God said, Let there be light")) == "And God said, Let there be light"
    st = bible.stats
    assert st["source"] == "bible" and st["vocab_size"] == V and st["val_windows"] == 40
    assert st["num_docs_train"] + st["num_docs_val"] == 1189 and 20 < st["num_docs_val"] < 110
    assert st["tokens_train"] > 10 * st["tokens_val"] > 0 and not st["tokens_estimated"]


def test_bible_train_and_validation_disjoint_by_document(bible):
    src = bible.source
    train_docs = {src.train.doc_index(k) for k in range(len(src.train))}
    val_docs = {src.val.doc_index(k) for k in range(len(src.val))}
    assert train_docs.isdisjoint(val_docs) and train_docs | val_docs == set(range(1189))
    train_ids = {src.train[k]["id"] for k in range(len(src.train))}
    val_ids = {src.val[k]["id"] for k in range(len(src.val))}
    assert train_ids.isdisjoint(val_ids) and len(train_ids) + len(val_ids) == 1189  # chapters, e.g. b'Genesis 1'
    # one training epoch holds exactly the training documents' tokens (stats counts them with one EOS each)
    tokenize = pipeline.TokenizeDoc(bible.tokenizer, src.text_key)
    windows = pipeline.packed_windows(src.train, tokenize=tokenize, seq_len=1023, packing="concat", num_epochs=1)
    assert sum(int(w["weights"].sum()) + 1 for w in windows) == bible.stats["tokens_train"]
    # and the validation windows are made of validation documents only, in order
    first_val_text = src.text(src.val[0])
    first_window = bible.val_batches(BATCH)[0]["inputs"][0]
    assert first_val_text.startswith(bible.tokenizer.decode(first_window[:8]))


def test_same_seed_same_batches_other_seed_other_order(bible, cache_dir):
    again = data.build(make_config(cache_dir), process_index=0, process_count=1)
    reference = take(iter(bible.train_dataset), 3)
    assert same(take(again.train_iter, 3), reference)
    other = data.build(make_config(cache_dir, shuffle_seed=1), process_index=0, process_count=1)
    assert not np.array_equal(next(other.train_iter)["inputs"], reference[0]["inputs"])


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_exact_resume_after_7_batches(cache_dir, tmp_path, packing):
    c = make_config(cache_dir, packing=packing)
    uninterrupted = data.build(c, process_index=0, process_count=1).train_iter
    reference = take(uninterrupted, 7 + 5)
    run = data.build(c, process_index=0, process_count=1)
    take(run.train_iter, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=data.checkpoint_save_args(run.train_iter)))
        mngr.wait_until_finished()
    fresh = data.build(c, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(7, args=ocp.args.Composite(data=data.checkpoint_restore_args(fresh.train_iter)))
    assert same(take(fresh.train_iter, 5), reference[7:])


def test_two_processes(bible, cache_dir):
    shards = [data.build(make_config(cache_dir), process_index=p, process_count=2) for p in range(2)]
    batches = [next(s.train_iter) for s in shards]
    assert all(b["inputs"].shape == (BATCH * ACCUM // 2, S) for b in batches)
    assert not np.array_equal(batches[0]["inputs"], batches[1]["inputs"])
    # validation: each process gets its own half of each global batch, the same number of batches
    vb = [s.val_batches(BATCH) for s in shards]
    full = bible.val_batches(BATCH)
    assert len(vb[0]) == len(vb[1]) == len(full)
    for g, (a, b) in enumerate(zip(*vb)):
        np.testing.assert_array_equal(np.concatenate([a["inputs"], b["inputs"]]), full[g]["inputs"])
    c = make_config(cache_dir, train=dict(batch_size=3))
    with pytest.raises(data.DataError, match=r"config\.train\.batch_size=3 is not divisible by the 2"):
        data.build(c, process_index=0, process_count=2)


def test_shards_fix_the_global_batch_across_process_counts(cache_dir, tmp_path):
    """With data.shards=2, one process reads exactly the rows two processes read together (process 0 first), and a
    data state saved by the two processes (one file per shard) resumes in one process, and vice versa."""
    two = [data.build(make_config(cache_dir), process_index=p, process_count=2) for p in range(2)]
    one = data.build(make_config(cache_dir, shards=2), process_index=0, process_count=1)
    for _ in range(3):
        parts = [next(d.train_iter) for d in two]
        whole = next(one.train_iter)
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([parts[0][k], parts[1][k]]))
    handler = pipeline.ShardFilesHandler()
    saved = epath.Path(tmp_path / "two")
    saved.mkdir()
    for d in two:
        handler.save(saved, args=pipeline.ShardsSave(d.train_iter))
    assert sorted(p.name for p in saved.iterdir()) == ["process_0-of-2.json", "process_1-of-2.json"]
    resumed = data.build(make_config(cache_dir, shards=2), process_index=0, process_count=1)
    handler.restore(saved, args=pipeline.ShardsRestore(resumed.train_iter))
    expect = [next(d.train_iter) for d in two]
    np.testing.assert_array_equal(next(resumed.train_iter)["inputs"],
                                  np.concatenate([e["inputs"] for e in expect]))
    back = [data.build(make_config(cache_dir, shards=2), process_index=p, process_count=2) for p in range(2)]
    saved_one = epath.Path(tmp_path / "one")
    saved_one.mkdir()
    handler.save(saved_one, args=pipeline.ShardsSave(resumed.train_iter))
    for d in back:
        handler.restore(saved_one, args=pipeline.ShardsRestore(d.train_iter))
    whole = next(resumed.train_iter)
    np.testing.assert_array_equal(np.concatenate([next(d.train_iter)["inputs"] for d in back]), whole["inputs"])
    # a state of 2 shards does not silently restore into 1 shard
    with pytest.raises(data.DataError, match=r"config\.data\.shards: .*--config\.data\.shards=2"):
        handler.restore(saved, args=pipeline.ShardsRestore(data.build(make_config(cache_dir), process_index=0,
                                                                      process_count=1).train_iter))
    with pytest.raises(data.DataError, match=r"config\.data\.shards=3: must be a positive multiple of the 2"):
        pipeline.local_shards(3, 0, 2)


def test_val_batches_fixed_finite_padded(bible):
    a, b = bible.val_batches(BATCH), bible.val_batches(BATCH)
    assert same(a, b)
    assert len(a) == 10  # 40 windows / 4
    odd = bible.val_batches(6)  # 40 = 6 * 6 + 4: the last batch is padded with weight-0 rows
    assert len(odd) == 7 and odd[-1]["inputs"].shape == (6, S)
    assert odd[-1]["weights"][4:].sum() == 0 and odd[-1]["weights"][:4].sum() > 0


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_whole_split_windows_score_every_validation_token_once_at_any_seq_len(bible, cache_dir, packing):
    """max_val_windows 0: the windows of every sequence length score the same tokens, each document's own once:
    its tokens + EOS, less the split's first token (concat) or each document's first token (segments); in all
    stats' tokens_val less 1 or less the document count."""
    src, tok = bible.source, bible.tokenizer
    lengths = np.array([len(tok.encode(src.text(src.val[k]))) + 1 for k in range(len(src.val))])
    want = lengths - 1 if packing == "segments" else lengths - np.eye(len(lengths), dtype=np.int64)[0]
    for seq_len in (32, 100):
        ds = data.build(make_config(cache_dir, packing=packing, max_val_windows=0, train=dict(seq_len=seq_len)),
                        process_index=0, process_count=1)
        win = ds.eval_windows("validation")
        scored = win["weights"] > 0
        np.testing.assert_array_equal(np.bincount(win["doc_index"][scored], minlength=len(lengths)), want)
        assert int(scored.sum()) == ds.stats["tokens_val"] - (1 if packing == "concat" else len(lengths))
        np.testing.assert_array_equal(ds.doc_ids("validation"), ds.source.split.val_indices)
    with pytest.raises(data.DataError, match="there is no test split"):
        ds.doc_ids("test")


def test_error_seq_len_longer_than_validation(tmp_path):
    for i in range(30):
        (tmp_path / f"d{i}.txt").write_text(f"Short document number {i}, a few words long. " * 3)
    c = make_config(tmp_path / "cache", source="files", files=str(tmp_path / "*.txt"), model=dict(vocab_size=300),
                    train=dict(seq_len=4096))
    with pytest.raises(data.DataError, match=r"config\.train\.seq_len=4096: the validation split has only \d+ tokens"):
        data.build(c, process_index=0, process_count=1)


def test_error_tokenizer_path_vocab_mismatch(bible, cache_dir):
    c = make_config(cache_dir, tokenizer_path=bible.tokenizer.path, model=dict(vocab_size=1024))
    with pytest.raises(ValueError, match=r"model\.vocab_size=1024"):
        data.build(c, process_index=0, process_count=1)
    c = make_config(cache_dir, tokenizer_path=bible.tokenizer.path)
    assert data.build(c, process_index=0, process_count=1).tokenizer.path == bible.tokenizer.path


def test_load_tokenizer_public(bible):
    tok = data.load_tokenizer(bible.tokenizer.path)
    assert tok.encode("Amen") == bible.tokenizer.encode("Amen")
