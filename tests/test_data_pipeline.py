"""Tests of moe_jax/data/pipeline.py on synthetic token documents (no tokenizer): packing, determinism, exact resume
through orbax (with and without a packing remainder at the save point), per-process sharding, validation dealing.

Document i is {'tokens': [1000*i + 1, ..., 1000*i + n_i]}: every token is unique and names its document.
"""

import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import data
from moe_jax.data import pipeline

S = 16


def make_docs(lengths):
    return [{"tokens": (np.arange(1, n + 1) + 1000 * i).astype(np.int32)} for i, n in enumerate(lengths)]


def random_lengths(n=60, seed=0):
    return [int(x) for x in np.random.default_rng(seed).integers(1, 3 * S, n)]


def windows(docs, packing="concat", **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("num_epochs", 1)
    return list(pipeline.packed_windows(docs, tokenize=None, seq_len=S, packing=packing, **kw))


def real_tokens(example):
    """The real tokens of a window: every input, plus the last target, where real (concat packing)."""
    w = example["weights"]
    toks = [int(example["inputs"][0])] + [int(t) for t, wt in zip(example["targets"], w) if wt > 0]
    return toks


def all_doc_tokens(docs):
    return sorted(int(t) for d in docs for t in d["tokens"])


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_windows_shifted_exact_length(packing):
    docs = make_docs(random_lengths())
    out = windows(docs, packing)
    keys = {"inputs", "targets", "weights"} | ({"segment_ids", "positions"} if packing == "segments" else set())
    for ex in out:
        assert set(ex) == keys
        for k, v in ex.items():
            assert v.shape == (S,), k
        assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32
        assert ex["weights"].dtype == np.float32
        np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])  # each input is followed by its target
    # every window but the last is full (only the end of a finite stream is padded)
    assert all(ex["weights"].sum() == S for ex in out[:-1]) or packing == "segments"


def test_concat_no_token_lost_or_duplicated():
    docs = make_docs(random_lengths())
    out = windows(docs, "concat")
    got = sorted(t for ex in out for t in real_tokens(ex))
    assert got == all_doc_tokens(docs)  # same multiset: nothing lost, nothing duplicated
    assert len(out) == -(-sum(len(d["tokens"]) for d in docs) // (S + 1))


def test_concat_targets_follow_inputs_across_documents():
    """Within a window the token after the last token of a document is the first token of the next one."""
    docs = make_docs(random_lengths())
    out = windows(docs, "concat", seed=None)
    stream = [t for ex in out for t in real_tokens(ex)]
    assert stream == [int(t) for d in docs for t in d["tokens"]]


def test_segments_ids_positions_weights():
    docs = make_docs(random_lengths())
    out = windows(docs, "segments")
    seen = []
    for ex in out:
        seg, pos, inp, tgt, w = ex["segment_ids"], ex["positions"], ex["inputs"], ex["targets"], ex["weights"]
        real = seg != 0
        seen += [int(t) for t in inp[real]]
        for i in range(S):
            if not real[i]:
                assert w[i] == 0 and inp[i] == 0
                continue
            same_doc = tgt[i] != 0 and tgt[i] // 1000 == inp[i] // 1000
            assert w[i] == float(same_doc), (i, inp[i], tgt[i])
            if i and real[i - 1]:
                new_doc = inp[i] // 1000 != inp[i - 1] // 1000
                assert (seg[i] != seg[i - 1]) == new_doc
                assert pos[i] == (0 if new_doc else pos[i - 1] + 1)
        assert seg[0] == 1 and pos[0] == 0
    # every token appears once as an input, except the last token of each window (the window's last target)
    last_targets = [int(ex["targets"][-1]) for ex in out if ex["segment_ids"][-1] != 0]
    assert sorted(seen + last_targets) == all_doc_tokens(docs)


def first_tokens(batches):
    return [int(x) for b in batches for x in b["inputs"][:, 0]]


def take(it, n):
    return [next(it) for _ in range(n)]


def train_ds(docs, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("packing", "concat")
    return pipeline.train_dataset(docs, tokenize=None, seq_len=S, batch_size=3, **kw)


def test_same_seed_same_batches_different_seed_different_order():
    docs = make_docs(random_lengths())
    a, b, c = (take(iter(train_ds(docs, seed=s)), 12) for s in (5, 5, 6))
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert first_tokens(a) != first_tokens(c)
    assert {k: v.shape for k, v in a[0].items()} == {"inputs": (3, S), "targets": (3, S), "weights": (3, S)}


def test_each_epoch_reshuffled_and_complete():
    docs = make_docs([S + 1] * 30)  # one document per window: window order == document order
    out = windows(docs, seed=3, num_epochs=2)
    order = [int(ex["inputs"][0]) // 1000 for ex in out]
    first, second = order[:30], order[30:]
    assert sorted(first) == sorted(second) == list(range(30))
    assert first != second and first != list(range(30))


def _save(directory, it):
    with ocp.CheckpointManager(directory) as mngr:
        mngr.save(7, args=ocp.args.Composite(data=data.checkpoint_save_args(it)))
        mngr.wait_until_finished()


def _restore(directory, it, raw=False):
    args = grain.checkpoint.CheckpointRestore(item=it) if raw else data.checkpoint_restore_args(it)
    with ocp.CheckpointManager(directory) as mngr:
        mngr.restore(7, args=ocp.args.Composite(data=args))


def _same(xs, ys):
    return len(xs) == len(ys) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                      for x, y in zip(xs, ys))


@pytest.mark.parametrize("packing", ["concat", "segments"])
@pytest.mark.parametrize("remainder", [True, False])
def test_exact_resume_through_orbax(tmp_path, packing, remainder):
    # Documents of exactly S + 1 tokens fill windows exactly: no partial document is pending at the save point.
    docs = make_docs(random_lengths(40) if remainder else [S + 1] * 40)
    reference = take(iter(train_ds(docs, packing=packing)), 7 + 12)
    it = iter(train_ds(docs, packing=packing))
    take(it, 7)
    state = it.get_state()
    pending = any(tuple(sl) != (-1, -1) for sl in state["remainder_slices"].values())
    assert pending == remainder  # the save point really is of the kind this case is about
    _save(tmp_path / "ckpt", it)
    resumed = iter(train_ds(docs, packing=packing))
    _restore(tmp_path / "ckpt", resumed)
    assert _same(take(resumed, 12), reference[7:])


def test_grain_restore_bug_is_still_there_and_worked_around(tmp_path):
    """Without ExactResumeIterator, grain 0.2.18 resumes a document late after a JSON round trip (docs/decisions.md)."""
    docs = make_docs([S + 1] * 40)
    reference = take(iter(train_ds(docs)), 7 + 6)
    it = iter(train_ds(docs))
    take(it, 7)
    _save(tmp_path / "ckpt", it)
    raw = iter(train_ds(docs)._parent)  # the grain pipeline under the workaround
    _restore(tmp_path / "ckpt", raw, raw=True)
    assert not _same(take(raw, 6), reference[7:])
    fixed = iter(train_ds(docs))
    _restore(tmp_path / "ckpt", fixed)
    assert _same(take(fixed, 6), reference[7:])


def test_fix_state_turns_nested_remainder_slices_into_tuples():
    state = {"parent": {"remainder_slices": {"tokens": [-1, -1]}, "x": [1, 2]},
             "workers": [{"remainder_slices": {"tokens": [3, 9]}}]}
    fixed = pipeline.fix_state(state)
    assert fixed["parent"]["remainder_slices"] == {"tokens": (-1, -1)}
    assert fixed["workers"][0]["remainder_slices"] == {"tokens": (3, 9)}
    assert fixed["parent"]["x"] == [1, 2]


def test_checkpoint_args_need_the_built_iterator():
    plain = iter(grain.MapDataset.range(3).to_iter_dataset())
    with pytest.raises(TypeError, match="ExactResumeIterator"):
        data.checkpoint_save_args(plain)


def test_two_process_shards_are_disjoint_and_cover_the_data():
    docs = make_docs(random_lengths(41))
    shards = [windows(docs, process_index=p, process_count=2) for p in range(2)]
    tokens = [[t for ex in shard for t in real_tokens(ex)] for shard in shards]
    docs_of = [{t // 1000 for t in toks} for toks in tokens]
    assert docs_of[0].isdisjoint(docs_of[1])
    assert docs_of[0] | docs_of[1] == set(range(41))
    assert sorted(tokens[0] + tokens[1]) == all_doc_tokens(docs)
    # and the infinite training iterators of the two processes stay on their own documents
    for p in range(2):
        batches = take(iter(train_ds(docs, process_index=p, process_count=2)), 20)
        seen = {int(t) // 1000 for b in batches for t in b["inputs"].ravel()}
        assert seen <= docs_of[p]


def test_val_windows_fixed_and_val_batches_dealt_per_process():
    docs = make_docs(random_lengths(30))
    win = pipeline.val_windows(docs, tokenize=None, seq_len=S, packing="concat", max_windows=0)
    again = pipeline.val_windows(docs, tokenize=None, seq_len=S, packing="concat", max_windows=0)
    assert _same([win], [again])
    n = len(win["inputs"])
    assert sorted(win["targets"][win["weights"] > 0].tolist()) == all_doc_tokens(docs)[1:]  # every target once
    limited = pipeline.val_windows(docs, tokenize=None, seq_len=S, packing="concat", max_windows=5)
    assert all(np.array_equal(v, win[k][:5]) for k, v in limited.items())  # 'first': the first windows of the tiling
    even = pipeline.val_windows(docs, tokenize=None, seq_len=S, packing="concat", max_windows=5, sampling="even")
    assert all(np.array_equal(v, win[k][pipeline.even_indices(n, 5)]) for k, v in even.items())

    per_process = [pipeline.val_batches(win, 4, process_index=p, process_count=2) for p in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == -(-n // 4)
    rows = collections.Counter()
    for batches in per_process:
        for b in batches:
            assert b["inputs"].shape == (2, S)
            for r in range(2):
                if b["weights"][r].sum() > 0:
                    rows[tuple(b["inputs"][r])] += 1
                else:
                    assert not b["inputs"][r].any()
    real_rows = [tuple(w) for w, wt in zip(win["inputs"], win["weights"]) if wt.sum() > 0]
    assert rows == collections.Counter(real_rows)  # disjoint shares covering every window once
    with pytest.raises(data.DataError, match="train.batch_size"):
        pipeline.val_batches(win, 3, process_index=0, process_count=2)


def stream_of(docs):
    """(tokens, document ordinal) of `docs` in order: the stream the evaluation windows tile."""
    return (np.concatenate([d["tokens"] for d in docs]),
            np.concatenate([np.full(len(d["tokens"]), i) for i, d in enumerate(docs)]))


@pytest.mark.parametrize("packing", ["concat", "segments"])
@pytest.mark.parametrize("seq_len", [1, 5, 16, 64, 500])
def test_eval_windows_score_every_target_token_exactly_once_at_any_seq_len(packing, seq_len):
    """Conservation: the scored targets are the stream's tokens minus its first (concat) or minus every document's
    first (segments), each exactly once, with the token before it in the stream as its input, whatever S is."""
    docs = make_docs(random_lengths(40, seed=seq_len))
    tokens, doc = stream_of(docs)
    win = pipeline.tile_windows(tokens, doc, seq_len=seq_len, packing=packing, pad_id=0)
    assert len(win["inputs"]) == -(-(len(tokens) - 1) // seq_len) and win["inputs"].shape[1] == seq_len
    firsts = {int(d["tokens"][0]) for d in docs}
    want = sorted(int(t) for t in tokens[1:] if packing == "concat" or int(t) not in firsts)
    scored = win["weights"] > 0
    assert sorted(win["targets"][scored].tolist()) == want
    assert int(scored.sum()) == pipeline.scored_targets(doc, packing).sum() == len(want)
    previous = dict(zip(tokens[1:].tolist(), tokens[:-1].tolist()))
    assert all(previous[t] == i for t, i in zip(win["targets"][scored].tolist(), win["inputs"][scored].tolist()))
    assert (win["doc_index"][scored] == win["targets"][scored] // 1000).all()  # document i's tokens are 1000 i + k
    np.testing.assert_array_equal(win["inputs"][1:, 0], win["targets"][:-1, -1])  # windows share one token
    assert not win["weights"][~(win["doc_index"] >= 0)].any()  # padding is never scored


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_eval_windows_match_the_training_packing(packing):
    """The first evaluation window is exactly the first packed training-style window (grain's ConcatThenSplit, in
    order): the same inputs, targets, weights and, with segments, segment ids and positions; so is a short stream's
    single padded window."""
    for lengths in (random_lengths(30, seed=3), [4, 1, 3]):
        docs = make_docs(lengths)
        tokens, doc = stream_of(docs)
        win = pipeline.tile_windows(tokens, doc, seq_len=S, packing=packing, pad_id=0)
        first = windows(docs, packing, seed=None)[0]
        assert set(win) == set(first) | {"doc_index"}
        for k, v in first.items():
            np.testing.assert_array_equal(win[k][0], v, err_msg=k)


def test_too_few_documents_for_processes():
    with pytest.raises(data.DataError, match="processes"):
        train_ds(make_docs([5, 5]), process_index=0, process_count=3)
