"""Print the data a config trains on, and how fast the input pipeline delivers it on this machine.

    python scripts/data_stats.py --config configs/moe.py [--batches 40] [--config.data.worker_count=2 ...]

Prints the source; documents and tokens (one EOS per document included) in each split; the tokenizer's vocab size
and file; the fixed validation windows; preparation time (first build in this cache, or reuse); and the training
pipeline's throughput in tokens/s (`--batches` batches of B = batch_size * grad_accum rows of seq_len tokens, timed
after one warm-up batch), with its margin over the tokens/s a training step consumes (`--step_tokens_per_s`, by
default the ~600 tokens/s of the seed MoE config on this CPU).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_jax import config_lib, data  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=False)
flags.DEFINE_integer("batches", 40, "Training batches to time (after one warm-up batch).")
flags.DEFINE_float("step_tokens_per_s", 600.0, "Tokens/s a training step consumes, for the margin.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    try:
        config_lib.validate(config)
        t0 = time.perf_counter()
        ds = data.build(config)
        build_s = time.perf_counter() - t0
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    st, t, d = ds.stats, config.train, config.data
    est = " (estimated)" if st["tokens_estimated"] else ""
    print(f"source            {st['source']}  (cache {ds.source.cache_dir})")
    print(f"documents         train {st['num_docs_train']:,}   validation {st['num_docs_val']:,}")
    print(f"tokens{est:<12}train {st['tokens_train']:,}   validation {st['tokens_val']:,}")
    print(f"tokenizer         vocab_size {ds.tokenizer.vocab_size:,}  eos {ds.tokenizer.eos_id}  "
          f"({ds.tokenizer.path})")
    print(f"validation        {st['val_windows']} fixed windows of {t.seq_len} tokens "
          f"(data.max_val_windows={d.max_val_windows})")
    print(f"build             {build_s:.2f} s")

    rows = data.per_process_batch(config, ds.process_count)
    next(ds.train_iter)  # warm-up: threads started, first documents tokenised
    t0 = time.perf_counter()
    for _ in range(FLAGS.batches):
        batch = next(ds.train_iter)
    secs = time.perf_counter() - t0
    tokens = FLAGS.batches * batch["inputs"].size
    rate = tokens / secs
    print(f"pipeline          {rate:,.0f} tokens/s  ({FLAGS.batches} batches of [{rows}, {t.seq_len}], "
          f"packing={d.packing}, worker_count={d.worker_count}, {secs:.2f} s)")
    print(f"margin            {rate / FLAGS.step_tokens_per_s:,.0f}x the {FLAGS.step_tokens_per_s:,.0f} tokens/s "
          "a training step consumes")


if __name__ == "__main__":
    app.run(main)
