"""Time the optimizer update alone (clip + Muon + AdamW, jitted, one device) for configs and optimizer variants,
interleaved round by round (on a shared machine only numbers taken together compare); prints the median per variant.

    python scripts/bench_update.py --configs configs/dense.py,configs/moe.py --vocab 49152 --rounds 5 \
        --variants optax:float32,batched:float32,batched:bfloat16

A variant is muon_impl:ns_dtype. Gradients are Gaussian; the state is the optimizer's initial one.
"""

import argparse
import statistics
import time

import jax

from moe_jax import bench, model, optimizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="configs/dense.py,configs/moe.py")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="optax:float32,batched:float32,batched:bfloat16")
    a = ap.parse_args()
    runs = {}
    for path in a.configs.split(","):
        for variant in a.variants.split(","):
            impl, dt = variant.split(":")
            c = bench.prepare(bench.load_config_file(path), 4, 512, overrides=(
                f"model.vocab_size={a.vocab}", f"optim.muon_impl='{impl}'", f"optim.ns_dtype='{dt}'"))
            params = model.init_params(c)[1]
            tx = optimizer.build(c)
            grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape, x.dtype), params)
            upd = jax.jit(tx.update)
            args = (grads, tx.init(params), params)
            jax.block_until_ready(upd(*args))  # compile + one run
            runs[(path, variant)] = (upd, args, [])
    for _ in range(a.rounds):
        for upd, args, times in runs.values():
            t = time.perf_counter()
            jax.block_until_ready(upd(*args))
            times.append(time.perf_counter() - t)
    for (path, variant), (_, _, times) in runs.items():
        print(f"{path:22s} {variant:18s} median {1e3 * statistics.median(times):8.0f} ms  "
              f"(min {1e3 * min(times):.0f}, max {1e3 * max(times):.0f}, {len(times)} rounds)")


if __name__ == "__main__":
    main()
