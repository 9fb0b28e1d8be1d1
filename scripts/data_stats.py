"""Print the data a config trains on, and how fast the input pipeline delivers it on this machine.

    python scripts/data_stats.py --config configs/moe.py [--batches 40] [--config.data.worker_count=2 ...]

(with the package installed: `pip install -e .` in the repository root).

Prints the source; documents and tokens (one EOS per document included) in each split; the tokenizer's vocab size
and file; the fixed validation windows; preparation time (first build in this cache, or reuse); and the training
pipeline's throughput in tokens/s (`--batches` batches of B = batch_size * grad_accum rows of seq_len tokens, timed
after one warm-up batch), with its margin over the tokens/s a training step consumes (`--step_tokens_per_s`, by
default the ~600 tokens/s of the seed MoE config on this CPU).
"""

from __future__ import annotations

import time

from absl import flags

from moe_jax import cli
from moe_jax.config import typed
from moe_jax import data

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The script's flags (cli.run calls it before parsing)."""
    cli.config_flag()
    flags.DEFINE_integer("batches", 40, "Training batches to time (after one warm-up batch).")
    flags.DEFINE_float("step_tokens_per_s", 600.0, "Tokens/s a training step consumes, for the margin.")


def main(argv):
    cli.no_arguments(argv)
    config = typed.parse(FLAGS.config)  # a ConfigError exits with status 2 (cli.run)
    t0 = time.perf_counter()
    ds = data.build(config)
    build_s = time.perf_counter() - t0
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
    cli.run(main, define_flags)
