"""Unigram and interpolated-bigram baselines of a study's data: what any language model trained on it must beat.

Both are fitted on the training split's token stream (its documents in order, tokenised by the runs' tokenizer with
one EOS each, as the trainer reads them) and scored on exactly the target tokens the arms' whole-split evaluations
score (data.pipeline.scored_targets of the validation or test stream: every token but the first with packing
'concat', every token but each document's first with 'segments'), so their token counts equal the arms'. A target's
context is the one token before it in the stream, which is the model's last input token: the evaluation windows
(pipeline.tile_windows) always hold a target's previous token, whatever the arm's sequence length.

    unigram   p1(w)     = (c(w) + 1) / (N + V)                             add-one over the tokenizer's V ids
    bigram    p2(w | v) = lam c(v, w) / c(v) + (1 - lam) p1(w)             Jelinek-Mercer interpolation; p1(w) where
                                                                             c(v) = 0

c(w): how often w is a scored target of the training stream (N of them); c(v, w): how often target w follows v there;
c(v) = sum_w c(v, w). Both are distributions over the V ids for every context. lam in [0, 1] minimises the
validation split's nats/token (the negative log-likelihood is convex in lam: golden-section search to 1e-6); the test
split plays no part in the fit. The fit (counts and lam) is cached per data and tokenizer in
`<source cache dir>/ngram-<tokenizer sha256[:12]>-<split tag>-<packing>.npz`. The training stream is held in memory
(8 bytes a token): meant for corpora like the shipped one, not for a 365M-document source.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

from moe_jax.data import cache, pipeline
from moe_jax.data.sources import open_source
from moe_jax.data.split import source_split_tag
from moe_jax.data.tokenizer import get_tokenizer

SMOOTHING = ("unigram: add-one over the tokenizer's ids; bigram: Jelinek-Mercer interpolation of the bigram's "
             "maximum-likelihood estimate with that unigram, the weight chosen on the validation split")
_GOLDEN = (math.sqrt(5) - 1) / 2


def counts(tokens: np.ndarray, doc: np.ndarray, packing: str, vocab: int) -> dict:
    """The counts of a training stream: {'unigram': int64 [V] c(w) over the scored targets, 'pair_keys': int64 [P]
    sorted v * V + w of the (previous token, target) pairs seen, 'pair_counts': int64 [P] c(v, w), 'vocab': V}."""
    tokens = np.asarray(tokens, dtype=np.int64)
    scored = pipeline.scored_targets(doc, packing)
    targets = tokens[scored]
    keys = tokens[np.flatnonzero(scored) - 1] * vocab + targets
    pair_keys, pair_counts = np.unique(keys, return_counts=True)
    return {"unigram": np.bincount(targets, minlength=vocab).astype(np.int64), "pair_keys": pair_keys,
            "pair_counts": pair_counts.astype(np.int64), "vocab": vocab}


def unigram_probs(model: dict) -> np.ndarray:
    """float64 [V]: p1 (module docstring)."""
    c = model["unigram"].astype(np.float64)
    return (c + 1.0) / (c.sum() + model["vocab"])


def context_counts(model: dict) -> np.ndarray:
    """float64 [V]: c(v), how often v precedes a scored target."""
    return np.bincount(model["pair_keys"] // model["vocab"], weights=model["pair_counts"],
                       minlength=model["vocab"]).astype(np.float64)


def _components(model: dict, prev: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maximum-likelihood bigram c(v, w) / c(v), or p1(w) where c(v) = 0; p1(w)) for pairs (prev, targets)."""
    p1 = unigram_probs(model)[targets]
    keys, known = np.asarray(prev, dtype=np.int64) * model["vocab"] + targets, model["pair_keys"]
    c_vw = np.zeros(len(keys), dtype=np.float64)
    if len(known):
        at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        c_vw = np.where(known[at] == keys, model["pair_counts"][at], 0).astype(np.float64)
    c_v = context_counts(model)[prev]
    ml = np.where(c_v > 0, c_vw / np.maximum(c_v, 1.0), p1)
    return ml, p1


def bigram_probs(model: dict, prev: int, lam: float) -> np.ndarray:
    """float64 [V]: p2(. | prev) over every id (for checks; scoring uses the same `_components`)."""
    ids = np.arange(model["vocab"])
    ml, p1 = _components(model, np.full(model["vocab"], prev), ids)
    return lam * ml + (1.0 - lam) * p1


def choose_lambda(ml: np.ndarray, p1: np.ndarray, tol: float = 1e-6) -> float:
    """The lam in [0, 1] minimising -sum log(lam ml + (1 - lam) p1) (convex in lam): golden-section search."""
    def nll(lam):
        return -float(np.sum(np.log(lam * ml + (1.0 - lam) * p1)))

    lo, hi = 0.0, 1.0
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = nll(b)
    return (lo + hi) / 2


def score(model: dict, lam: float, tokens: np.ndarray, doc: np.ndarray, packing: str, num_docs: int) -> dict:
    """Both baselines on the scored targets of a stream: {'unigram', 'bigram': {'loss' (nats/token), 'tokens',
    'documents': {'tokens' int64 [num_docs], 'loss_sum' float64 [num_docs]}}}, documents by `doc` ordinal."""
    tokens = np.asarray(tokens, dtype=np.int64)
    where = np.flatnonzero(pipeline.scored_targets(doc, packing))
    ml, p1 = _components(model, tokens[where - 1], tokens[where])
    target_doc = np.asarray(doc)[where]
    out = {}
    for name, p in (("unigram", p1), ("bigram", lam * ml + (1.0 - lam) * p1)):
        loss_sum = np.bincount(target_doc, weights=-np.log(p), minlength=num_docs)
        per_doc = np.bincount(target_doc, minlength=num_docs).astype(np.int64)
        out[name] = {"loss": float(loss_sum.sum()) / max(len(where), 1), "tokens": int(len(where)),
                     "documents": {"tokens": per_doc, "loss_sum": loss_sum}}
    return out


def _streams(config):
    """(source, tokenizer, stream of a part) for a study arm's config (a RunConfig): the runs' data and tokenizer."""
    source = open_source(config, cache.cache_root(config))
    tok = get_tokenizer(config, source)
    tokenize = pipeline.TokenizeDoc(tok, source.text_key)
    threads = max(1, min(4, os.cpu_count() or 1))
    return source, tok, lambda part: pipeline.token_stream(part, tokenize=tokenize, read_threads=threads)


def fit(config) -> tuple[dict, float]:
    """(counts of the training split, lam chosen on validation) for `config`'s data and tokenizer, cached
    (module docstring)."""
    source, tok, stream = _streams(config)
    packing = config.data.packing
    path = os.path.join(source.cache_dir, f"ngram-{cache.file_sha256(tok.path)[:12]}-"
                                          f"{source_split_tag(config.data, source.split is not None)}-{packing}.npz")
    try:
        with np.load(path) as z:
            model = {k: z[k] for k in ("unigram", "pair_keys", "pair_counts")} | {"vocab": int(z["vocab"])}
            return model, float(z["lam"])
    except (OSError, ValueError, KeyError):  # absent or unreadable: fitted again
        pass
    model = counts(*stream(source.train), packing, tok.vocab_size)
    tokens, doc = stream(source.val)
    where = np.flatnonzero(pipeline.scored_targets(doc, packing))
    lam = choose_lambda(*_components(model, tokens[where - 1].astype(np.int64), tokens[where].astype(np.int64)))
    buf = io.BytesIO()
    np.savez(buf, lam=lam, **model)
    cache.atomic_write_bytes(path, buf.getvalue())
    return model, lam


def evaluate(config, split: str) -> dict:
    """Both baselines of `config`'s data on its whole `split` ('validation' or 'test'): `score`'s dict, each with
    documents['doc_ids'] (the source's indices, as studies.runner.document_losses gives them), plus 'lambda' and
    'smoothing'."""
    source, _, stream = _streams(config)
    part = {"validation": source.val, "test": source.test}.get(split)
    if part is None:
        raise ValueError(f"split must be 'validation' or 'test' (with data.test_fraction > 0), got {split!r}")
    model, lam = fit(config)
    tokens, doc = stream(part)
    doc_ids = part.doc_indices()
    out = score(model, lam, tokens, doc, config.data.packing, len(doc_ids))
    for v in out.values():
        v["documents"]["doc_ids"] = doc_ids
    return out | {"lambda": lam, "smoothing": SMOOTHING}
