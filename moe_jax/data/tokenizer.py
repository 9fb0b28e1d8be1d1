"""SentencePiece tokenizer: trained once per source on its training split and cached, or loaded from a .model file.

Trained models are byte-fallback BPE with `config.model.vocab_size` pieces and fixed special ids
pad=0, unk=1, bos=2, eos=3; identity normalisation and no whitespace folding, so `decode(encode(text)) == text` for
any UTF-8 text (bytes absent from the vocabulary fall back to the 256 byte pieces). Training input is the training
split only (validation text never shapes the vocabulary), cut into lines of at most 4,096 bytes; large sources are
sampled evenly up to 200 M characters. Training is deterministic (fixed sentencepiece seed).

Cache: `<cache>/<source_key>/tokenizer-bpe<V>-<split>.model` next to the prepared data, with a manifest
(`.manifest.json`: size and sha256). A missing, truncated or altered model is retrained, never used.

A given model (`config.data.tokenizer_path`) must have exactly `config.model.vocab_size` pieces and an EOS id.
`encode` adds no BOS/EOS; the pipeline appends EOS to every document.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from moe_jax.data import cache
from moe_jax.data.errors import DataError
from moe_jax.data.split import source_split_tag

log = logging.getLogger("moe_jax.data")

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MAX_LINE_BYTES = 4096
MAX_TRAIN_CHARS = 200_000_000
MAX_TRAIN_DOCS = 1_000_000
TRAIN_SEED = 1234


class Tokenizer:
    """A sentencepiece model: encode/decode plus the ids the pipeline and trainer need. Picklable (by content)."""

    def __init__(self, path: str, proto: bytes | None = None):
        self.path = os.path.abspath(path)
        if proto is None:
            with open(self.path, "rb") as f:
                proto = f.read()
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        """The model's pad id, or 0 when it defines none (padding always has weight 0; any valid id works)."""
        pad = int(self._sp.pad_id())
        return pad if pad >= 0 else 0

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS or EOS."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """encode() of each text, computed by sentencepiece in `num_threads` threads."""
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def id_to_piece(self, i: int) -> str:
        """The vocabulary piece of id `i` as sentencepiece stores it ('▁the', '<0x0A>'): routing.py's tables show
        pieces, since decode() of a single id drops its leading-space marker."""
        return self._sp.id_to_piece(int(i))

    def __getstate__(self):
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["path"], state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str, *, setting: str = "data.tokenizer_path") -> Tokenizer:
    """Load a sentencepiece .model; DataError naming `setting` if it is missing or not a valid model."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise DataError(f"config.{setting}={path!r}: no such file. Fix: give the path of a sentencepiece .model, "
                        "or leave data.tokenizer_path empty to train one on the training split.")
    try:
        tok = Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise DataError(f"config.{setting}={path!r} is not a valid sentencepiece model ({e}). "
                        "Fix: point it at a .model file written by sentencepiece.") from None
    if tok.eos_id < 0:
        raise DataError(f"config.{setting}={path!r}: the model defines no EOS id; documents are separated by EOS. "
                        "Fix: use a model trained with eos_id >= 0.")
    return tok


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: non-empty lines, long ones cut at spaces into pieces of at most MAX_LINE_BYTES."""
    for text in texts:
        for line in text.split("\n"):
            while len(line.encode("utf-8")) > MAX_LINE_BYTES:
                cut = line.rfind(" ", 0, MAX_LINE_BYTES // 4)  # chars <= 4 bytes each: the prefix fits
                cut = cut if cut > 0 else MAX_LINE_BYTES // 4
                yield line[:cut]
                line = line[cut:]
            if line.strip():
                yield line


def train_bpe(texts: Iterable[str], vocab_size: int) -> bytes:
    """A byte-fallback BPE model (serialised) with `vocab_size` pieces trained on `texts`."""
    spm.set_random_generator_seed(TRAIN_SEED)
    out = io.BytesIO()
    counted = {"chars": 0}

    def sentences():
        for line in _lines(texts):
            counted["chars"] += len(line)
            yield line

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=out, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            character_coverage=0.9995, max_sentence_length=MAX_LINE_BYTES + 16, input_sentence_size=5_000_000,
            shuffle_input_sentence=True, num_threads=max(1, min(16, os.cpu_count() or 1)), minloglevel=2)
    except RuntimeError as e:
        if counted["chars"] == 0:
            raise DataError("config.data: the training split has no text to train the tokenizer on (every document "
                            "is empty). Fix: check data.source / data.files / data.text_feature.") from None
        raise DataError(f"config.model.vocab_size={vocab_size}: sentencepiece cannot train a byte-fallback BPE of "
                        f"that size on this training split ({e}). Fix: choose a vocab_size between ~300 (256 byte "
                        "pieces + specials + the corpus's characters) and what the corpus supports, or give "
                        "data.tokenizer_path.") from None
    return out.getvalue()


def _training_texts(source) -> Iterator[str]:
    """Texts of the training documents, evenly sampled when the split is large (see module docstring)."""
    n = len(source.train)
    step = max(1, n // MAX_TRAIN_DOCS)
    chars = 0
    for k in range(0, n, step):
        text = source.text(source.train[k])
        chars += len(text)
        yield text
        if chars >= MAX_TRAIN_CHARS:
            log.info("tokenizer: trained on the first %d characters of an even sample", chars)
            return


def cache_name(config, source) -> str:
    return f"tokenizer-bpe{config.model.vocab_size}-{source_split_tag(config.data, source.split is not None)}"


def get_tokenizer(config, source) -> Tokenizer:
    """The tokenizer for this config: data.tokenizer_path, else the cached (or newly trained) one for `source`."""
    vocab = config.model.vocab_size
    if config.data.tokenizer_path:
        tok = load_tokenizer(config.data.tokenizer_path)
        if tok.vocab_size != vocab:
            raise DataError(f"config.model.vocab_size={vocab} differs from the {tok.vocab_size} pieces of "
                            f"data.tokenizer_path={tok.path!r}. Fix: set model.vocab_size = {tok.vocab_size}.")
        return tok
    name = cache_name(config, source)
    model_path = os.path.join(source.cache_dir, name + ".model")
    manifest = os.path.join(source.cache_dir, name + ".manifest.json")
    with cache.locked(source.cache_dir):
        ok, why = cache.check_manifest(manifest, source.cache_dir)
        if ok:
            try:
                return load_tokenizer(model_path)
            except DataError as e:
                why = str(e)
        if os.path.exists(model_path) or os.path.exists(manifest):
            log.warning("tokenizer cache is invalid (%s): retraining %s", why, model_path)
        cache.remove(manifest)
        log.info("training a %d-piece BPE tokenizer on the training split of %s", vocab, source.name)
        proto = train_bpe(_training_texts(source), vocab)
        cache.atomic_write_bytes(model_path, proto)
        cache.write_manifest(manifest, [model_path], source.cache_dir, vocab_size=vocab, source=source.name)
    tok = Tokenizer(model_path, proto)
    if tok.vocab_size != vocab:  # sentencepiece honours vocab_size exactly; this guards a silent change
        raise DataError(f"config.model.vocab_size={vocab}: sentencepiece produced {tok.vocab_size} pieces.")
    return tok
