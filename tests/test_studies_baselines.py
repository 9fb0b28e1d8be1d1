"""moe_jax/studies/baselines.py: the unigram equals a count-based reference, the bigram is a distribution for every
context and its score is the naive one, the interpolation weight is the validation optimum, and the baselines score
exactly the arms' target tokens (on synthetic streams at several sequence lengths, and on the shipped corpus)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_jax import data
from moe_jax.data import pipeline
from moe_jax.studies import baselines
from study_helpers import tiny_base
from moe_jax.config.typed import parse

V = 7
# three documents (EOS = 6 ends each), token ids < V
TRAIN = [[1, 2, 3, 2, 6], [2, 3, 3, 6], [4, 1, 2, 6]]
HELD = [[1, 2, 3, 5, 6], [3, 3, 2, 6], [0, 6]]


def stream(docs):
    return (np.array([t for d in docs for t in d], dtype=np.int32),
            np.array([i for i, d in enumerate(docs) for _ in d], dtype=np.int32))


def naive_pairs(docs, packing):
    """(previous token, target) of every scored target, by hand: within documents, and across them with concat."""
    flat = [(i, t) for i, d in enumerate(docs) for t in d]
    return [(flat[j - 1][1], flat[j][1]) for j in range(1, len(flat))
            if packing == "concat" or flat[j - 1][0] == flat[j][0]]


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_unigram_is_add_one_over_the_training_targets(packing):
    model = baselines.counts(*stream(TRAIN), packing, V)
    targets = [w for _, w in naive_pairs(TRAIN, packing)]
    want = [(targets.count(w) + 1) / (len(targets) + V) for w in range(V)]
    np.testing.assert_allclose(baselines.unigram_probs(model), want, rtol=1e-15)
    got = baselines.score(model, 0.5, *stream(HELD), packing, len(HELD))["unigram"]
    held = naive_pairs(HELD, packing)
    assert got["tokens"] == len(held)
    assert got["loss"] == pytest.approx(-sum(math.log(want[w]) for _, w in held) / len(held), rel=1e-12)


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_bigram_is_a_distribution_for_every_context_and_scores_naively(packing):
    model = baselines.counts(*stream(TRAIN), packing, V)
    pairs = naive_pairs(TRAIN, packing)
    for lam in (0.0, 0.3, 0.999):
        for prev in range(V):  # seen contexts and unseen ones (0, 5: never followed by a scored target)
            p = baselines.bigram_probs(model, prev, lam)
            assert (p > 0).all() and p.sum() == pytest.approx(1.0, abs=1e-12)
            seen = [w for v, w in pairs if v == prev]
            if seen:  # lam * c(v, w) / c(v) + (1 - lam) p1(w)
                want = [lam * seen.count(w) / len(seen) + (1 - lam) * baselines.unigram_probs(model)[w]
                        for w in range(V)]
                np.testing.assert_allclose(p, want, rtol=1e-12)
    lam = 0.4
    got = baselines.score(model, lam, *stream(HELD), packing, len(HELD))["bigram"]
    held = naive_pairs(HELD, packing)
    nll = [-math.log(baselines.bigram_probs(model, v, lam)[w]) for v, w in held]
    assert got["loss"] == pytest.approx(sum(nll) / len(held), rel=1e-12)
    # per document: the targets of document i are its tokens after its first (segments) / after the stream's first
    _, doc = stream(HELD)
    doc_of = doc[pipeline.scored_targets(doc, packing)]
    np.testing.assert_array_equal(got["documents"]["tokens"], np.bincount(doc_of, minlength=len(HELD)))
    np.testing.assert_allclose(got["documents"]["loss_sum"], np.bincount(doc_of, weights=nll, minlength=len(HELD)))


def test_interpolation_weight_minimises_the_validation_loss():
    rng = np.random.default_rng(0)
    ml, p1 = rng.uniform(0.0, 1.0, 500) * (rng.uniform(size=500) > 0.2), rng.uniform(0.01, 1.0, 500)
    lam = baselines.choose_lambda(ml, p1)
    grid = np.linspace(0.0, 0.999, 1000)
    nll = [-np.sum(np.log(g * ml + (1 - g) * p1)) for g in grid]
    assert abs(lam - grid[int(np.argmin(nll))]) < 2e-3 and 0 < lam < 1


@pytest.mark.parametrize("packing", ["concat", "segments"])
def test_baselines_score_the_arms_tokens_at_every_sequence_length(packing):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, V, int(n)).tolist() for n in rng.integers(1, 40, 30)]
    tokens, doc = stream(docs)
    got = baselines.score(baselines.counts(*stream(TRAIN), packing, V), 0.5, tokens, doc, packing, len(docs))
    for seq_len in (4, 16, 100):
        win = pipeline.tile_windows(tokens, doc, seq_len=seq_len, packing=packing)
        scored = win["weights"] > 0
        assert got["bigram"]["tokens"] == got["unigram"]["tokens"] == int(scored.sum())
        np.testing.assert_array_equal(got["bigram"]["documents"]["tokens"],
                                      np.bincount(win["doc_index"][scored], minlength=len(docs)))


def test_baselines_on_the_corpus_match_the_whole_split_windows_and_are_cached(data_cache, monkeypatch):
    c = tiny_base(data_cache)
    c.data.test_fraction, c.data.max_val_windows = 0.05, 0
    run = parse(c)
    ds = data.build(run, 0, 1)
    out = baselines.evaluate(run, "test")
    win = ds.eval_windows("test")
    assert out["bigram"]["tokens"] == out["unigram"]["tokens"] == int((win["weights"] > 0).sum())
    np.testing.assert_array_equal(out["bigram"]["documents"]["doc_ids"], ds.doc_ids("test"))
    assert 0 < out["lambda"] < 1 and out["bigram"]["loss"] < out["unigram"]["loss"] < math.log(run.model.vocab_size)
    monkeypatch.setattr(baselines, "counts", lambda *a: pytest.fail("fitted again"))
    again = baselines.evaluate(run, "test")
    assert again["bigram"]["loss"] == out["bigram"]["loss"] and again["lambda"] == out["lambda"]
    with pytest.raises(ValueError, match="split must be 'validation' or 'test'"):
        baselines.evaluate(run, "train")
