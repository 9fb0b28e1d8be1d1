"""Tests of moe_jax/data/tokenizer.py: BPE training, round trip, special ids, the cache (reused, not retrained;
truncated or altered model rebuilt), a given .model file and its errors."""

import os
import pickle

import pytest

from moe_jax.config import schema as config_lib
from smoke_helpers import run_config
from moe_jax.data import DataError, sources, tokenizer

V = 512


@pytest.fixture(scope="module")
def bible_texts():
    return [text for _, text in sources.bible_documents(sources.bible_path())][:300]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, bible_texts):
    path = tmp_path_factory.mktemp("tok") / "m.model"
    path.write_bytes(tokenizer.train_bpe(bible_texts, V))
    return str(path)


def test_trained_model_ids_and_round_trip(model_file):
    tok = tokenizer.load_tokenizer(model_file)
    assert tok.vocab_size == V
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    for text in ["In the beginning God created the heaven and the earth.",
                 "  two  spaces,\ttab\nnew line\n\n", "ünïcödé — 漢字 🙂 0123456789", " lead", "trail ", ""]:
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < V for i in ids)
        assert tok.eos_id not in ids and tok.bos_id not in ids
        assert tok.decode(ids) == text
    assert len(tok.encode("the earth")) < len("the earth")  # merges were learned


def test_training_is_deterministic(bible_texts, model_file):
    with open(model_file, "rb") as f:
        assert tokenizer.train_bpe(bible_texts, V) == f.read()


def test_pickles_by_content(model_file):
    tok = tokenizer.load_tokenizer(model_file)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("And God said") == tok.encode("And God said") and clone.path == tok.path


def test_long_lines_are_cut_for_training():
    lines = list(tokenizer._lines(["word " * 5000 + "\nshort"]))
    assert all(len(x.encode()) <= tokenizer.MAX_LINE_BYTES for x in lines)
    assert "".join(lines[:-1]) == "word " * 5000 and lines[-1] == "short"


class FakeSource:
    """Just what get_tokenizer reads: a cache dir, a name, a split and the training documents."""

    def __init__(self, cache_dir, texts):
        self.cache_dir, self.name, self.split = str(cache_dir), "fake", object()
        self.train = [{"text": t} for t in texts]

    def text(self, record):
        return record["text"]


def make_config(vocab_size=V, **data):
    """The base config at `vocab_size` with `data.<k> = v` for each keyword, parsed."""
    return run_config(config_lib.base_config(), data=data, model=dict(vocab_size=vocab_size))


def test_cache_reused_then_truncated_model_rebuilt(tmp_path, bible_texts, monkeypatch):
    src = FakeSource(tmp_path, bible_texts)
    calls = []
    real_train = tokenizer.train_bpe
    monkeypatch.setattr(tokenizer, "train_bpe", lambda *a, **k: (calls.append(1), real_train(*a, **k))[1])
    first = tokenizer.get_tokenizer(make_config(), src)
    assert calls == [1] and os.path.dirname(first.path) == str(tmp_path)
    assert os.path.basename(first.path) == f"tokenizer-bpe{V}-val0.05.model"

    second = tokenizer.get_tokenizer(make_config(), src)
    assert calls == [1]  # reused: no retraining
    assert second.encode("Let there be light") == first.encode("Let there be light")

    with open(first.path, "r+b") as f:
        f.truncate(os.path.getsize(first.path) // 3)
    third = tokenizer.get_tokenizer(make_config(), src)
    assert calls == [1, 1]  # detected and rebuilt, not used
    assert third.encode("Let there be light") == first.encode("Let there be light")

    with open(first.path, "r+b") as f:  # same size, altered content
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    tokenizer.get_tokenizer(make_config(), src)
    assert calls == [1, 1, 1]

    other_vocab = make_config(vocab_size=600)
    assert tokenizer.get_tokenizer(other_vocab, src).vocab_size == 600  # keyed by vocab size
    assert calls == [1, 1, 1, 1]


def test_given_model_file(model_file, tmp_path):
    src = FakeSource(tmp_path, ["unused"])
    tok = tokenizer.get_tokenizer(make_config(tokenizer_path=model_file), src)
    assert tok.path == model_file and tok.vocab_size == V
    wrong = make_config(tokenizer_path=model_file, vocab_size=8192)
    with pytest.raises(ValueError, match=r"config\.model\.vocab_size=8192 differs from the 512 pieces"):
        tokenizer.get_tokenizer(wrong, src)


def test_given_model_errors(tmp_path):
    with pytest.raises(DataError, match=r"config\.data\.tokenizer_path=.*no such file"):
        tokenizer.load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid sentencepiece model"):
        tokenizer.load_tokenizer(str(bad))


def test_vocab_too_small_or_no_text(tmp_path):
    with pytest.raises(DataError, match=r"config\.model\.vocab_size=100"):
        tokenizer.train_bpe(["some text here and more words"] * 20, 100)
    with pytest.raises(DataError, match="no text to train the tokenizer"):
        tokenizer.train_bpe(["", "   "], V)
