"""`--mode update`: the optimizer update alone (clip + Muon + AdamW, jitted, one device) of each config under each
variant, interleaved round by round (on a shared machine only numbers taken together compare); prints the median
per (config, variant).

    python -m moe_jax.bench --mode update --config configs/moe.py --baseline configs/dense.py \
        --config.model.vocab_size=49152 --rounds 5
    python -m moe_jax.bench --mode update --config configs/moe.py --variant optax-float32 \
        --variant optim.muon_impl=batched,optim.ns_dtype=bfloat16,optim.ns_stack=none

A variant is a set of config overrides (`--variant field=value,field=value`, repeated) or a name of
common.VARIANTS; without --variant every named variant is timed (optax against the batched Muon, float32 / bfloat16
Newton-Schulz, stacked across layers or not, X or Gram space). Gradients are Gaussian; the state is the optimizer's
initial one; the config's batch shape does not matter (the update does not depend on it).
"""

from __future__ import annotations

import statistics

import jax

from moe_jax.model import transformer as model_lib
from moe_jax.optim import chain as optimizer_lib
from moe_jax.tools.bench import common

FLAGS_READ = ("config", "baseline", "variant", "rounds")
ROUNDS = 5


def compile_update(config):
    """(the jitted update, its arguments) of `config` (prepared), compiled and run once."""
    params = model_lib.init_params(config.model, config.seed)[1]
    tx = optimizer_lib.build(config.optim, config.train.steps)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape, x.dtype), params)
    upd = jax.jit(tx.update)
    args = (grads, tx.init(params), params)
    jax.block_until_ready(upd(*args))  # compile + one run
    return upd, args


def time_updates(entries, variants=None, rounds: int = ROUNDS, out=print) -> dict:
    """The update of each (label, config) under each variant [(label, {'x.y': value})] (default: every one of
    common.VARIANTS), each config prepared (parsed: validated, 'auto' resolved) with the variant's overrides. Returns
    {label: {variant: {'median_s', 'min_s', 'max_s', 'rounds_s'}}} and prints one line per pair."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if variants is None:
        variants = list(common.VARIANTS.items())
    runs = {}
    for label, config in entries:
        for variant, overrides in variants:
            upd, args = compile_update(common.prepare(common.with_variant(config, variant, overrides)))
            runs[(label, variant)] = lambda upd=upd, args=args: common.time_call(lambda: upd(*args))
    times = common.interleave(runs, rounds)
    results: dict = {}
    width = (max(22, *(len(label) for label, _ in entries)), max(18, *(len(v) for v, _ in variants)))
    for (label, variant), t in times.items():
        results.setdefault(label, {})[variant] = common.summary(t)
        out(f"{label:{width[0]}s} {variant:{width[1]}s} median {1e3 * statistics.median(t):8.0f} ms  "
            f"(min {1e3 * min(t):.0f}, max {1e3 * max(t):.0f}, {len(t)} rounds)")
    return results


def from_flags() -> dict:
    """`--mode update` from the command line."""
    from absl import flags

    from moe_jax import cli

    rounds = flags.FLAGS.rounds or ROUNDS
    if rounds < 1:
        raise cli.UsageError(f"--rounds must be >= 1, got {rounds}")
    entries = common.entries_from_flags()
    variants = common.variants_from_flags(default=common.VARIANTS)
    out = lambda s: print(s, flush=True)  # noqa: E731
    common.describe_variants(variants, out)
    return {"rounds": rounds, "variants": dict(variants), "results": time_updates(entries, variants, rounds, out)}
