"""Throughput benchmark of the compiled train step: tokens/s, model TFLOP/s, MFU and step time per config, and each
config's TFLOP/s as a fraction of the dense one's.

    python -m moe_jax.bench --config configs/moe.py --baseline configs/dense.py --batch 4 --seq 512
    python -m moe_jax.bench --config configs/moe.py --config.moe.group_size=256 --steps 20
    python -m moe_jax.bench --config configs/moe.py --baseline configs/dense.py --rounds 3 --breakdown \
        --config.model.dtype=bfloat16            (a --config.x=y override applies to the baseline too)
    python -m moe_jax.bench --config configs/smoke.py --baseline configs/smoke.py --baseline.moe.num_experts=0 \
        --baseline.name=smoke_dense              (a --baseline.x=y override applies to the baseline only)
    python scripts/bench_step.py ...   (the same, as a script)

What is timed: the trainer's own train step (train_step.make_train_step: forward, backward, gradient accumulation
over train.grad_accum micro-batches, optimizer update, metrics), jitted with the trainer's shardings on a mesh of
--devices devices (default 1) and the state donated, on a fixed batch of --batch x --seq random tokens per
micro-batch (--batch overrides train.batch_size, --seq train.seq_len; --grad_accum 0 keeps the config's). Each
config is compiled, then run --warmup untimed steps; then --rounds rounds of --steps steps are timed with the configs
interleaved (on a shared machine only numbers taken together compare), and the median round is reported.

Model FLOPs are flops.flops_per_token(config)['training'] (active experts only; the MoE dispatch's own FLOPs
(flops.py `dispatch_overhead`: capacity padding and dispatch/combine einsums, or dropless's combine and XLA:CPU's
dense ragged_dot) and the optimizer's FLOPs excluded, the dispatch overhead printed apart). --dispatch
capacity,dropless times every MoE config once per dispatch mode (labels get ' [dropless]').
MFU = model FLOP/s / peak, where the peak is the flops.PEAK_TFLOPS table (per device, x --devices) on GPU/TPU,
and on CPU a jitted n x n matmul timed here (--matmul_n, in the first config's dtype, best of 5, measured before
and after the runs; the larger is used). --peak_tflops overrides both. Every config is compared with the first
dense one (moe.num_experts == 0).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from moe_jax.config import schema as config_lib
from moe_jax.model import flops
from moe_jax.config import typed
from moe_jax.model import transformer as model_lib
from moe_jax.optim import chain as optimizer_lib
from moe_jax import sharding as sharding_lib
from moe_jax.train import step as step_lib
from moe_jax.model.layers import dtype_of


def apply_overrides(config, overrides: dict) -> None:
    """{'moe.group_size': 256} -> config.moe.group_size = 256; a path that is not a config field raises ConfigError."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise config_lib.ConfigError(f"{key} is not a config field of {config.get('name', 'the config')}")
            node = node[p]
        if leaf not in node:
            raise config_lib.ConfigError(f"{key} is not a config field of {config.get('name', 'the config')}")
        node[leaf] = value


def prepare(config, batch: int, seq: int, grad_accum: int = 0, overrides=None, backend: str | None = None):
    """A copy of `config` with the overrides ({'x.y': value}) and the benchmark's batch shape, parsed
    (config.typed.parse: validated, 'auto' resolved for `backend`, default JAX's default backend) into a RunConfig."""
    config = config.copy_and_resolve_references()
    apply_overrides(config, overrides or {})
    config.train.batch_size = batch
    config.train.seq_len = seq
    if grad_accum:
        config.train.grad_accum = grad_accum
    return typed.parse(config, backend)


class Bench:
    """One config: its compiled train step, state and a fixed random batch."""

    def __init__(self, name: str, config, devices):
        self.name, self.config = name, config
        t = config.train
        self.mesh = sharding_lib.build_mesh(config.mesh, devices)
        shards = self.mesh.shape["data"] * self.mesh.shape["expert"]
        if t.batch_size % shards:
            raise config_lib.ConfigError(f"--batch {t.batch_size} is not divisible by the {shards} batch shards of "
                                         f"mesh {dict(self.mesh.shape)}")
        graphdef, abstract_nnx = model_lib.abstract(config.model)
        opt = optimizer_lib.build(config.optim, t.steps)
        rows = t.batch_size * t.grad_accum
        rng = np.random.default_rng(1)
        batch = {"inputs": rng.integers(0, config.model.vocab_size, (rows, t.seq_len), dtype=np.int32),
                 "targets": rng.integers(0, config.model.vocab_size, (rows, t.seq_len), dtype=np.int32),
                 "weights": np.ones((rows, t.seq_len), np.float32)}
        abs_state = step_lib.abstract_train_state(abstract_nnx, opt, self.mesh)
        t0 = time.perf_counter()
        self.step, b_shard = step_lib.compile_train_step(t, graphdef, opt, abs_state, self.mesh, batch)
        with jax.set_mesh(self.mesh):
            self.state = step_lib.init_sharded_state(config.model, config.seed, opt, jax.tree.map(lambda s: s.sharding, abs_state))
            self.memory = step_lib._memory(self.step)  # bytes per device, XLA's compiled memory analysis
            self.batch = {k: jax.device_put(v, b_shard[k]) for k, v in batch.items()}
        self.compile_s = time.perf_counter() - t0
        self.graphdef, self.opt = graphdef, opt
        self.tokens_per_step = rows * t.seq_len
        self.rounds: list[float] = []  # seconds per step, one entry per timed round
        self.last_loss = float("nan")

    def run(self, n: int) -> float:
        """Run n steps; seconds per step."""
        if n <= 0:
            return 0.0
        m = None
        t0 = time.perf_counter()
        with jax.set_mesh(self.mesh):
            for _ in range(n):
                self.state, m = self.step(self.state, self.batch)
            jax.block_until_ready((self.state, m))
        sec = (time.perf_counter() - t0) / n
        self.last_loss = float(m["loss"])
        return sec

    def breakdown(self, n: int) -> dict[str, float]:
        """Seconds per call of the loss (forward), forward+backward, and the optimizer update alone (one
        micro-batch, the state's current parameters)."""
        graphdef, opt, config = self.graphdef, self.opt, self.config
        rows = config.train.batch_size
        micro = {k: v[:rows] for k, v in self.batch.items()}
        rng = jax.random.key(0)
        out = {}
        with jax.set_mesh(self.mesh):
            params, opt_state = self.state["params"], self.state["opt_state"]
            fwd = jax.jit(lambda p, b: step_lib._loss(graphdef, p, b, rng, True)[0])
            grad = jax.jit(jax.grad(lambda p, b: step_lib._loss(graphdef, p, b, rng, True)[0]))
            upd = jax.jit(lambda g, s, p: opt.update(g, s, p))
            g = grad(params, micro)
            for label, fn, args in (("forward", fwd, (params, micro)), ("forward+backward", grad, (params, micro)),
                                    ("optimizer update", upd, (g, opt_state, params))):
                jax.block_until_ready(fn(*args))
                t0 = time.perf_counter()
                for _ in range(n):
                    r = fn(*args)
                jax.block_until_ready(r)
                out[label] = (time.perf_counter() - t0) / n
        return out


def benchmark(entries, *, batch: int = 4, seq: int = 512, grad_accum: int = 1, steps: int = 10, warmup: int = 2,
              rounds: int = 1, matmul_n: int = 2048, breakdown: bool = False, overrides=None, devices=None,
              peak_tflops: float = 0.0, out=print, benches_out: list | None = None, dispatch=()) -> dict:
    """Benchmark [(label, config)] together (`overrides` {'x.y': value} applied to each); prints a report through
    `out` and returns
    {'device', 'peak_tflops', 'peak_source', 'configs': {label: {...}}, 'fraction_of_dense': {label: {...}}}.
    `benches_out`, when a list, receives the compiled `Bench` objects (e.g. to profile a step afterwards)."""
    if not entries:
        raise ValueError("no configs to benchmark")
    devices = list(jax.devices()[:1] if devices is None else devices)
    configs, seen = [], set()
    if dispatch:
        bad = [d for d in dispatch if d not in config_lib.MOE_DISPATCH]
        if bad:
            raise config_lib.ConfigError(f"--dispatch {','.join(bad)}: choose from {config_lib.MOE_DISPATCH}")
        expanded = []
        for label, c in entries:
            if c.moe.num_experts == 0:
                expanded.append((label, c))
                continue
            for d in dispatch:
                c2 = c.copy_and_resolve_references()
                c2.moe.dispatch = d
                expanded.append((f"{label} [{d}]", c2))
        entries = expanded
    for label, c in entries:
        while label in seen:
            label += "'"
        seen.add(label)
        configs.append((label, prepare(c, batch, seq, grad_accum, overrides, devices[0].platform)))
    dev = devices[0]
    out(f"device: {dev.device_kind} ({dev.platform}), timing on {len(devices)} of {jax.device_count()} device(s); "
        f"jax {jax.__version__}")
    dtype = dtype_of(configs[0][1].model.dtype)
    if peak_tflops > 0:
        peak, source = peak_tflops, "--peak_tflops"
    else:
        peak, source = flops.devices_peak_tflops(devices, matmul_n=matmul_n, dtype=dtype)
    out(f"peak: {peak * 1e3:,.1f} GFLOP/s ({source})")

    benches = []
    for label, c in configs:
        b = Bench(label, c, devices)
        out(f"compiled {label}: {b.compile_s:.1f} s")
        b.run(warmup)
        benches.append(b)
    for _ in range(max(1, rounds)):
        for b in benches:
            b.rounds.append(b.run(steps))
    if dev.platform == "cpu" and peak_tflops <= 0:  # again after the runs: the spread shows how noisy the machine is
        peak_after, _ = flops.devices_peak_tflops(devices, matmul_n=matmul_n, dtype=dtype)
        out(f"peak re-measured after the runs: {peak_after * 1e3:,.1f} GFLOP/s; using the larger")
        peak = max(peak, peak_after)

    if benches_out is not None:
        benches_out.extend(benches)
    results = {}
    out("")
    for b in benches:
        c = b.config
        counts = flops.param_counts(c.model)
        fpt = flops.run_flops_per_token(c)
        sec = statistics.median(b.rounds)
        tps = b.tokens_per_step / sec
        tflops = tps * fpt["training"] / 1e12
        r = dict(name=c.name, step_time_s=sec, rounds_s=list(b.rounds), tokens_per_s=tps, tflops=tflops,
                 mfu=flops.mfu(tps, fpt["training"], peak), tokens_per_step=b.tokens_per_step, compile_s=b.compile_s,
                 params_total=counts["total"], params_active=counts["active"],
                 training_flops_per_token=fpt["training"], padding_flops_per_token=fpt["dispatch_overhead_training"],
                 tflops_with_padding=tps * (fpt["training"] + fpt["dispatch_overhead_training"]) / 1e12,
                 dispatch=c.moe.dispatch if c.moe.num_experts else "",
                 loss=b.last_loss, dense=c.moe.num_experts == 0, dtype=c.model.dtype, attention=c.model.attention,
                 memory_bytes=dict(b.memory))
        results[b.name] = r
        t = c.train
        ns = c.optim.ns  # what Muon's Newton-Schulz runs as (resolved by parse)
        r["newton_schulz"] = ns = {"ns_dtype": ns.dtype, "ns_stack": ns.stack, "ns_method": ns.method}
        muon_desc = (f" ({c.optim.muon_impl}: NS {ns['ns_dtype']}, stack {ns['ns_stack']}, {ns['ns_method']})"
                     if c.optim.name == "muon" else "")
        out(f"== {b.name}: batch {t.batch_size} x accum {t.grad_accum} x seq {t.seq_len}, {c.model.dtype}, "
            f"attention {c.model.attention}, optimizer {c.optim.name}{muon_desc}")
        out(f"   params {counts['total'] / 1e6:.2f} M total, {counts['active'] / 1e6:.2f} M active; training "
            f"{fpt['training'] / 1e6:.2f} MFLOP/token (dispatch overhead "
            f"{fpt['dispatch_overhead_training'] / 1e6:.2f} MFLOP/token apart"
            + (f", moe.dispatch={c.moe.dispatch}" if c.moe.num_experts else "") + ")")
        if b.memory:
            out("   compiled step memory per device: " + ", ".join(
                f"{k.replace('_size_in_bytes', '')} {v / 2**30:.2f} GiB" for k, v in b.memory.items()))
        out(f"   step time {sec * 1e3:.1f} ms (rounds: {', '.join(f'{s * 1e3:.1f}' for s in b.rounds)} ms), "
            f"loss {b.last_loss:.3f}")
        out(f"   tokens/s {tps:,.0f}; TFLOP/s {tflops:.4g}; MFU {r['mfu']:.2%} of the peak "
            f"({peak * 1e3:,.1f} GFLOP/s)")
        if fpt["dispatch_overhead"]:
            out(f"   counting the dispatch overhead: {r['tflops_with_padding']:.4g} TFLOP/s "
                f"({r['tflops_with_padding'] / peak:.2%} of the peak)")
        if breakdown:
            r["breakdown_s"] = b.breakdown(max(2, steps // 2))
            for label, s in r["breakdown_s"].items():
                out(f"   {label:<17} {s * 1e3:8.1f} ms")
            r["update_share_of_step"] = r["breakdown_s"]["optimizer update"] / sec
            out(f"   optimizer update: {r['update_share_of_step']:.1%} of the step")

    fractions = {}
    dense_name = next((n for n, r in results.items() if r["dense"]), None)
    if dense_name is not None and len(results) > 1:
        out("")
        d = results[dense_name]
        for n, r in results.items():
            if n == dense_name:
                continue
            fractions[n] = {"of": dense_name, "tflops": r["tflops"] / d["tflops"],
                            "tokens_per_s": r["tokens_per_s"] / d["tokens_per_s"],
                            "step_time": r["step_time_s"] / d["step_time_s"],
                            "flops_per_token": r["training_flops_per_token"] / d["training_flops_per_token"]}
            out(f"{n}: TFLOP/s {fractions[n]['tflops']:.1%} of dense ({dense_name}); tokens/s "
                f"{fractions[n]['tokens_per_s']:.1%} of dense; step time {fractions[n]['step_time']:.3f}x dense's "
                f"at {fractions[n]['flops_per_token']:.3f}x its model FLOPs per token")
    return {"device": f"{dev.device_kind} ({dev.platform})", "num_devices": len(devices), "peak_tflops": peak,
            "peak_source": source, "configs": results, "fraction_of_dense": fractions}


UPDATE_VARIANTS = ("optax:float32", "batched:float32:layers:standard", "batched:float32:none:standard",
                   "batched:bfloat16:layers:standard", "batched:bfloat16:none:standard", "batched:bfloat16:layers:gram",
                   "batched:bfloat16:none:gram")


def time_updates(entries, variants=UPDATE_VARIANTS, rounds: int = 5, out=print) -> dict:
    """The optimizer update alone (clip + Muon + AdamW, jitted, one device) of each (label, config) under each
    'muon_impl:ns_dtype[:ns_stack[:ns_method]]' variant, interleaved round by round (on a shared machine only
    numbers taken together compare). Each config goes through `prepare` with the variant's overrides (validated,
    'auto' resolved). Gradients are Gaussian, the state the optimizer's initial one; the update does not depend
    on the batch. Returns {label: {variant: {'median_s', 'min_s', 'max_s', 'rounds_s'}}} and prints one line per
    pair."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs = {}
    for label, config in entries:
        for variant in variants:
            parts = variant.split(":")
            if len(parts) not in (2, 3, 4):
                raise config_lib.ConfigError(f"update variant {variant!r} is not muon_impl:ns_dtype[:ns_stack"
                                             "[:ns_method]], e.g. batched:float32 or batched:bfloat16:none:gram")
            overrides = {"optim.muon_impl": parts[0], "optim.ns_dtype": parts[1]}
            for key, value in zip(("optim.ns_stack", "optim.ns_method"), parts[2:]):
                overrides[key] = value
            c = prepare(config, config.train.batch_size, config.train.seq_len, overrides=overrides)
            params = model_lib.init_params(c.model, c.seed)[1]
            tx = optimizer_lib.build(c.optim, c.train.steps)
            grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(0), x.shape, x.dtype), params)
            upd = jax.jit(tx.update)
            args = (grads, tx.init(params), params)
            jax.block_until_ready(upd(*args))  # compile + one run
            runs[(label, variant)] = (upd, args, [])
    for _ in range(rounds):
        for upd, args, times in runs.values():
            t0 = time.perf_counter()
            jax.block_until_ready(upd(*args))
            times.append(time.perf_counter() - t0)
    results: dict = {}
    for (label, variant), (_, _, times) in runs.items():
        results.setdefault(label, {})[variant] = dict(median_s=statistics.median(times), min_s=min(times),
                                                      max_s=max(times), rounds_s=list(times))
        out(f"{label:22s} {variant:18s} median {1e3 * statistics.median(times):8.0f} ms  "
            f"(min {1e3 * min(times):.0f}, max {1e3 * max(times):.0f}, {len(times)} rounds)")
    return results


# ---------------------------------------------------------------------------------------------------------------
# Command line


def define_flags() -> None:
    """Define the command-line flags (cli.run calls it before parsing)."""
    from absl import flags

    from moe_jax import cli

    cli.config_flag(help_text="The config file to benchmark; override its fields with --config.x.y=value (applied "
                    "to the --baseline too).")
    cli.config_flag("baseline", "Optional second config file timed together with --config (interleaved) and reported "
                    "first, e.g. configs/dense.py; --config.x.y=value overrides apply to it too unless "
                    "--baseline.x.y=value sets the same field.", required=False)
    flags.DEFINE_list("dispatch", [], "Time every MoE config once per moe.dispatch mode, e.g. capacity,dropless "
                      "(labels get ' [mode]').")
    flags.DEFINE_integer("batch", 4, "Sequences per micro-batch (train.batch_size).")
    flags.DEFINE_integer("seq", 512, "Sequence length (train.seq_len).")
    flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step (train.grad_accum); 0 keeps the config's.")
    flags.DEFINE_integer("steps", 10, "Timed steps per round.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_integer("rounds", 1, "Timing rounds (configs interleaved); the median round is reported.")
    flags.DEFINE_integer("matmul_n", 2048, "Size of the square matmul timed as the CPU peak.")
    flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of all timed devices together (0: table / measured).")
    flags.DEFINE_integer("devices", 1, "Devices to time on (data-parallel mesh of the config's shape); 0: all.")
    flags.DEFINE_bool("breakdown", False, "Also time the forward pass, forward+backward and the optimizer alone.")
    flags.DEFINE_string("json", "", "Also write the results to this JSON file.")


def entries_from_flags() -> list:
    """[(label, config)] of --baseline (when given; with the --config overrides it does not set itself) and
    --config, in report order."""
    from absl import flags

    from moe_jax import cli

    FLAGS = flags.FLAGS
    entries = []
    if FLAGS.baseline is not None:
        baseline = FLAGS.baseline.copy_and_resolve_references()
        own = cli.override_values("baseline")
        apply_overrides(baseline, {k: v for k, v in cli.override_values("config").items() if k not in own})
        entries.append((f"{baseline.name} ({cli.config_path('baseline')})", baseline))
    entries.append((f"{FLAGS.config.name} ({cli.config_path('config')})", FLAGS.config))
    return entries


def main(argv) -> None:
    """absl entry point (prints the report; run_from_flags returns it)."""
    run_from_flags(argv)


def run_from_flags(argv) -> dict:
    from absl import flags

    from moe_jax import cli

    cli.no_arguments(argv)
    FLAGS = flags.FLAGS
    n = FLAGS.devices or jax.device_count()
    if n > jax.device_count():
        raise cli.UsageError(f"--devices {n}: only {jax.device_count()} available; use at most that (0: all)")
    results = benchmark(entries_from_flags(), batch=FLAGS.batch, seq=FLAGS.seq, grad_accum=FLAGS.grad_accum,
                        steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds, matmul_n=FLAGS.matmul_n,
                        breakdown=FLAGS.breakdown, devices=jax.devices()[:n], peak_tflops=FLAGS.peak_tflops,
                        out=lambda s: print(s, flush=True),
                        dispatch=FLAGS.dispatch)  # a ConfigError exits with status 2 (cli.run)
    if FLAGS.json:
        import json
        import os
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags)
