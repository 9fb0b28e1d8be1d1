"""Time the optimizer update alone (clip + Muon + AdamW, jitted, one device) for configs and optimizer variants,
interleaved round by round (on a shared machine only numbers taken together compare); prints the median per variant.

    python scripts/bench_update.py --configs configs/dense.py,configs/moe.py --vocab 49152 --rounds 5 \
        --variants optax:float32,batched:float32,batched:bfloat16

A variant is muon_impl:ns_dtype. Gradients are Gaussian; the state is the optimizer's initial one. The shape is the
seed benchmark's (batch 4 x seq 512, which only sets the config; the update does not depend on it).
"""

import statistics
import time

from absl import flags

from moe_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("configs", ["configs/dense.py", "configs/moe.py"], "Config files to time.")
    flags.DEFINE_integer("vocab", 49152, "model.vocab_size for every config (the seeds' benchmark used 49152).")
    flags.DEFINE_integer("rounds", 5, "Timed rounds (each runs every variant once, interleaved).")
    flags.DEFINE_list("variants", ["optax:float32", "batched:float32", "batched:bfloat16"],
                      "muon_impl:ns_dtype pairs.")


def main(argv) -> None:
    cli.no_arguments(argv)
    import jax

    from moe_jax import bench, model, optimizer

    if FLAGS.rounds < 1:
        raise cli.UsageError(f"--rounds must be >= 1, got {FLAGS.rounds}")
    runs = {}
    for path in FLAGS.configs:
        for variant in FLAGS.variants:
            impl, sep, dt = variant.partition(":")
            if not sep:
                raise cli.UsageError(f"--variants: {variant!r} is not muon_impl:ns_dtype, e.g. batched:float32")
            c = bench.prepare(cli.load_config_file(path), 4, 512, overrides={
                "model.vocab_size": FLAGS.vocab, "optim.muon_impl": impl, "optim.ns_dtype": dt})
            params = model.init_params(c)[1]
            tx = optimizer.build(c)
            grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape, x.dtype), params)
            upd = jax.jit(tx.update)
            args = (grads, tx.init(params), params)
            jax.block_until_ready(upd(*args))  # compile + one run
            runs[(path, variant)] = (upd, args, [])
    for _ in range(FLAGS.rounds):
        for upd, args, times in runs.values():
            t = time.perf_counter()
            jax.block_until_ready(upd(*args))
            times.append(time.perf_counter() - t)
    for (path, variant), (_, _, times) in runs.items():
        print(f"{path:22s} {variant:18s} median {1e3 * statistics.median(times):8.0f} ms  "
              f"(min {1e3 * min(times):.0f}, max {1e3 * max(times):.0f}, {len(times)} rounds)")


if __name__ == "__main__":
    cli.run(main, define_flags)
