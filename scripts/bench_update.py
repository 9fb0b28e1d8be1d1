"""Time the optimizer update alone (clip + Muon + AdamW, jitted, one device) for configs and optimizer variants,
interleaved round by round (on a shared machine only numbers taken together compare); prints the median per variant.

    python scripts/bench_update.py --configs configs/dense.py,configs/moe.py --vocab 49152 --rounds 5 \
        --variants optax:float32,batched:float32:none,batched:bfloat16:none

A variant is muon_impl:ns_dtype[:ns_stack[:ns_method]] (default: moe_jax.bench.UPDATE_VARIANTS). Gradients are
Gaussian; the state is the optimizer's initial one. The shape is the seed benchmark's (batch 4 x seq 512, which only
sets the config; the update does not depend on it).
"""

from absl import flags

from moe_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("configs", ["configs/dense.py", "configs/moe.py"], "Config files to time.")
    flags.DEFINE_integer("vocab", 49152, "model.vocab_size for every config (the seeds' benchmark used 49152).")
    flags.DEFINE_integer("rounds", 5, "Timed rounds (each runs every variant once, interleaved).")
    flags.DEFINE_list("variants", None,
                      "muon_impl:ns_dtype[:ns_stack[:ns_method]] variants (default: bench.UPDATE_VARIANTS).")


def main(argv) -> None:
    cli.no_arguments(argv)
    from moe_jax.tools import bench

    if FLAGS.rounds < 1:
        raise cli.UsageError(f"--rounds must be >= 1, got {FLAGS.rounds}")
    entries = []
    for path in FLAGS.configs:
        c = cli.load_config_file(path)
        c.model.vocab_size = FLAGS.vocab  # time_updates validates and resolves each variant's config
        entries.append((path, c))
    # a bad variant: ConfigError, exit 2
    bench.time_updates(entries, FLAGS.variants or bench.UPDATE_VARIANTS, FLAGS.rounds)


if __name__ == "__main__":
    cli.run(main, define_flags)
