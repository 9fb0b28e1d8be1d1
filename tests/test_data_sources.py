"""Tests of moe_jax/data/sources.py and split.py: the shipped Bible, local files and a local TFDS builder all read
through tfds.data_source; the document-level split; the prepared-data cache; every source error by message."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from moe_jax.config import schema as config_lib
from moe_jax.config.typed import parse
from smoke_helpers import run_config
from moe_jax.data import DataError, sources, split


class DummyLines(tfds.core.GeneratorBasedBuilder):
    """A local TFDS text dataset (text under 'body') with 'train' and 'validation' splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"body": tfds.features.Text(), "n": tfds.features.Scalar(dtype=np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 40), "validation": self._generate_examples(40, 45)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):
            yield i, {"body": f"line {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 3), "n": i}


@pytest.fixture(scope="module")
def dummy_tfds_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    DummyLines(data_dir=d, file_format="array_record").download_and_prepare(file_format="array_record")
    return d


def config(tmp_path, **data):
    c = config_lib.base_config()
    c.data.cache_dir = str(tmp_path / "cache")
    return run_config(c, data=data)


def write_corpus(root, n_txt=6, n_jsonl=30, field="text"):
    os.makedirs(root / "corpus" / "sub", exist_ok=True)
    for i in range(n_txt):
        (root / "corpus" / f"doc{i}.txt").write_text(f"Text file {i}.\nSecond line of file {i}.\n")
    with open(root / "corpus" / "sub" / "docs.jsonl", "w") as f:
        for i in range(n_jsonl):
            f.write(json.dumps({field: f"JSON document {i} with some words.", "other": i}) + "\n")
        f.write(json.dumps({field: "   "}) + "\n")  # empty documents are skipped
    return str(root / "corpus" / "**" / "*.*")


@pytest.fixture
def spy_data_source(monkeypatch):
    calls = []
    real = tfds.data_source

    def spy(name, **kw):
        calls.append((name, kw.get("split")))
        return real(name, **kw)

    monkeypatch.setattr(tfds, "data_source", spy)
    return calls


def test_bible_documents_are_chapters():
    docs = list(sources.bible_documents(sources.bible_path()))
    assert len(docs) == 1189
    assert docs[0][0] == "Genesis 1" and docs[0][1].startswith("In the beginning God created the heaven")
    assert docs[-1][0] == "Revelation 22"
    with open(sources.bible_path()) as f:
        verses = sum(1 for line in f if line.strip())
    assert verses == 31103 and sum(d[1].count("\n") + 1 for d in docs) == verses  # every verse, once


def test_hash_split_disjoint_covering_deterministic():
    s = split.hash_split(10_000, 0.05, what="x")
    train = s.train_indices()
    assert set(train).isdisjoint(set(s.val_indices))
    assert len(train) + s.num_val == 10_000 and set(train) | set(s.val_indices) == set(range(10_000))
    assert 400 < s.num_val < 600
    assert [s.train_doc(k) for k in range(s.num_train)] == list(train)
    again = split.hash_split(10_000, 0.05, what="x")
    np.testing.assert_array_equal(again.val_indices, s.val_indices)
    # a growing source keeps the earlier documents on their side
    bigger = split.hash_split(20_000, 0.05, what="x")
    np.testing.assert_array_equal(bigger.val_indices[bigger.val_indices < 10_000], s.val_indices)


def test_hash_split_small_sources():
    s = split.hash_split(3, 0.01, what="x")
    assert s.num_val == 1 and s.num_train == 2
    s = split.hash_split(3, 0.99, what="x")
    assert s.num_val == 2 and s.num_train == 1
    with pytest.raises(DataError, match="at least 2"):
        split.hash_split(1, 0.05, what="x")


def test_files_and_local_tfds_builder_share_the_read_path(tmp_path, dummy_tfds_dir, spy_data_source):
    files = sources.open_source(config(tmp_path, source="files", files=write_corpus(tmp_path)), str(tmp_path / "c"))
    assert spy_data_source == [(sources.LOCAL_BUILDER, "train")]
    assert len(files.train) + len(files.val) == 36  # 6 .txt + 30 .jsonl lines; the empty one skipped
    texts = {files.text(files.train[k]) for k in range(len(files.train))}
    texts |= {files.text(files.val[k]) for k in range(len(files.val))}
    assert "Text file 0.\nSecond line of file 0.\n" in texts and "JSON document 29 with some words." in texts

    spy_data_source.clear()
    t = sources.open_source(config(tmp_path, source="tfds", tfds_name="dummy_lines", tfds_data_dir=dummy_tfds_dir,
                                   text_feature="body"), str(tmp_path / "c"))
    assert spy_data_source == [("dummy_lines", "train")]
    assert type(t.train.source) is type(files.train.source)  # the same array_record data source class
    assert len(t.train) + len(t.val) == 40 and t.text(t.train[0]).startswith("line ")


def test_tfds_val_split_uses_the_datasets_own_split(tmp_path, dummy_tfds_dir, spy_data_source):
    c = config(tmp_path, source="tfds", tfds_name="dummy_lines", tfds_data_dir=dummy_tfds_dir, text_feature="body",
               tfds_val_split="validation")
    s = sources.open_source(c, str(tmp_path / "c"))
    assert spy_data_source == [("dummy_lines", "train"), ("dummy_lines", "validation")]
    assert len(s.train) == 40 and len(s.val) == 5 and s.split is None
    assert {int(s.val[k]["n"]) for k in range(5)} == set(range(40, 45))


def test_prepared_cache_reused_and_truncated_file_rebuilt(tmp_path, monkeypatch):
    c = config(tmp_path, source="files", files=write_corpus(tmp_path))
    first = sources.open_source(c, str(tmp_path / "c"))
    ids = [first.train[k]["id"] for k in range(len(first.train))]

    def no_prepare(*a, **k):
        raise AssertionError("prepared again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(sources.MoeJaxText, "download_and_prepare", no_prepare)
        again = sources.open_source(c, str(tmp_path / "c"))
    assert [again.train[k]["id"] for k in range(len(again.train))] == ids

    data_dir = os.path.join(first.cache_dir, "tfds")
    shard = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs if ".array_record" in f][0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    rebuilt = sources.open_source(c, str(tmp_path / "c"))  # detected by the manifest and rebuilt
    assert [rebuilt.train[k]["id"] for k in range(len(rebuilt.train))] == ids
    ok, _ = sources.cache.check_manifest(os.path.join(first.cache_dir, "tfds.manifest.json"), data_dir)
    assert ok

    os.remove(os.path.join(first.cache_dir, "tfds.manifest.json"))  # as if killed before the manifest was written
    with monkeypatch.context() as m:
        calls = []
        real = sources.MoeJaxText.download_and_prepare
        m.setattr(sources.MoeJaxText, "download_and_prepare", lambda self, **k: (calls.append(1), real(self, **k)))
        sources.open_source(c, str(tmp_path / "c"))
    assert calls == [1]


def test_source_key_changes_with_the_files(tmp_path):
    c = config(tmp_path, source="files", files=write_corpus(tmp_path))
    k1 = sources.source_key(c)
    (tmp_path / "corpus" / "doc99.txt").write_text("a new document")
    assert sources.source_key(c) != k1


# ------------------------------------------------------------------------------------------------- errors


def open_fails(tmp_path, match, **data):
    with pytest.raises(DataError, match=match):
        sources.open_source(config(tmp_path, **data), str(tmp_path / "c"))


def test_error_empty_glob(tmp_path):
    open_fails(tmp_path, r"config\.data\.files=.*matched no files", source="files",
               files=str(tmp_path / "nothing" / "*.txt"))


def test_error_wrong_extension(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    open_fails(tmp_path, r"neither \.txt nor \.jsonl", source="files", files=str(tmp_path / "*"))


def test_error_empty_documents(tmp_path):
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text(" \n\n ")
    open_fails(tmp_path, r"config\.data\.files: all 2 document\(s\) .* are empty", source="files",
               files=str(tmp_path / "*.txt"))


def test_error_jsonl_text_field_missing(tmp_path):
    pattern = write_corpus(tmp_path, n_txt=0, field="content")
    open_fails(tmp_path, r"config\.data\.text_feature='text'.*no such field.*'content'", source="files",
               files=pattern)


def test_error_tfds_text_feature_missing(tmp_path, dummy_tfds_dir):
    open_fails(tmp_path, r"config\.data\.text_feature='text'.*no such feature.*'body'", source="tfds",
               tfds_name="dummy_lines", tfds_data_dir=dummy_tfds_dir, text_feature="text")


def test_error_unknown_tfds_name(tmp_path):
    open_fails(tmp_path, r"config\.data\.tfds_name='no_such_dataset_xyz': TFDS has no dataset", source="tfds",
               tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path / "t"))


def test_error_missing_download_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "network_available", lambda *a, **k: False)
    open_fails(tmp_path, r"tfds_name='tiny_shakespeare': the dataset is not prepared .* no network", source="tfds",
               tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path / "t"))
    assert not os.path.exists(tmp_path / "t" / "downloads")  # nothing was attempted


def test_error_tfds_val_split_missing(tmp_path, dummy_tfds_dir):
    open_fails(tmp_path, r"no split 'test'", source="tfds", tfds_name="dummy_lines", tfds_data_dir=dummy_tfds_dir,
               text_feature="body", tfds_val_split="test")


def test_error_single_document(tmp_path):
    (tmp_path / "only.txt").write_text("one long text")
    open_fails(tmp_path, r"1 document\(s\).*at least 2", source="files", files=str(tmp_path / "*.txt"))


def test_tfds_val_split_only_for_tfds(tmp_path):
    c = config_lib.base_config()
    c.data.tfds_val_split = "validation"
    with pytest.raises(config_lib.ConfigError, match="data.tfds_val_split"):
        parse(c)
