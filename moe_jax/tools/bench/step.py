"""`--mode step` (the default): throughput of the compiled train step. Tokens/s, model TFLOP/s, MFU and step time
per config, and each config's TFLOP/s as a fraction of the dense one's.

    python -m moe_jax.bench --config configs/moe.py --baseline configs/dense.py --batch 4 --seq 512
    python -m moe_jax.bench --config configs/moe.py --config.moe.group_size=256 --steps 20
    python -m moe_jax.bench --config configs/moe.py --baseline configs/dense.py --rounds 3 --breakdown \
        --config.model.dtype=bfloat16            (a --config.x=y override applies to the baseline too)
    python -m moe_jax.bench --config configs/smoke.py --baseline configs/smoke.py --baseline.moe.num_experts=0 \
        --baseline.name=smoke_dense              (a --baseline.x=y override applies to the baseline only)
    python -m moe_jax.bench --config configs/dense.py --variant optim.muon_impl=optax --variant batched-float32-none

What is timed: the trainer's own train step (train_step.make_train_step: forward, backward, gradient accumulation
over train.grad_accum micro-batches, optimizer update, metrics), jitted with the trainer's shardings on a mesh of
--devices devices (default 1) and the state donated, on a fixed batch of --batch x --seq random tokens per
micro-batch (--batch overrides train.batch_size, --seq train.seq_len; --grad_accum 0 keeps the config's). Each
config is compiled, then run --warmup untimed steps; then --rounds rounds of --steps steps are timed with the configs
interleaved (on a shared machine only numbers taken together compare), and the median round is reported.

Model FLOPs are flops.flops_per_token(config)['training'] (active experts only; the MoE dispatch's own FLOPs
(flops.py `dispatch_overhead`: capacity padding and dispatch/combine einsums, or dropless's combine and XLA:CPU's
dense ragged_dot) and the optimizer's FLOPs excluded, the dispatch overhead printed apart). --dispatch
capacity,dropless times every MoE config once per dispatch mode (labels get ' [dropless]'); each --variant (config
overrides, or a name of common.VARIANTS) times every config once with its overrides (labels get ' [variant]').
MFU = model FLOP/s / peak, where the peak is the flops.PEAK_TFLOPS table (per device, x --devices) on GPU/TPU,
and on CPU a jitted n x n matmul timed here (--matmul_n, in the first config's dtype, best of 5, measured before
and after the runs; the larger is used). --peak_tflops overrides both. Every config is compared with the first
dense one (moe.num_experts == 0).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from moe_jax import sharding as sharding_lib
from moe_jax.config import schema as config_lib
from moe_jax.model import flops
from moe_jax.model import transformer as model_lib
from moe_jax.model.layers import dtype_of
from moe_jax.optim import chain as optimizer_lib
from moe_jax.tools.bench import common
from moe_jax.train import step as step_lib

FLAGS_READ = ("config", "baseline", "dispatch", "variant", "batch", "seq", "grad_accum", "steps", "warmup", "rounds",
              "matmul_n", "peak_tflops", "devices", "breakdown")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How the train steps are timed (the step mode's flags)."""
    batch: int = 4  # sequences per micro-batch (train.batch_size)
    seq: int = 512  # train.seq_len
    grad_accum: int = 1  # micro-batches per step; 0 keeps the config's
    steps: int = 10  # timed steps per round
    warmup: int = 2  # untimed steps after compiling
    rounds: int = 1  # timing rounds, configs interleaved; the median round is reported
    matmul_n: int = 2048  # the square matmul timed as the CPU peak
    peak_tflops: float = 0.0  # all timed devices together; 0: the table (GPU/TPU) or measured (CPU)
    breakdown: bool = False  # also time forward, forward+backward and the optimizer update alone
    dispatch: tuple[str, ...] = ()  # time every MoE config once per moe.dispatch mode


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
        opt = optimizer_lib.build(config.optim, t.steps, distributed_muon=config.mesh.fsdp)
        rows = t.batch_size * t.grad_accum
        rng = np.random.default_rng(1)
        batch = {"inputs": rng.integers(0, config.model.vocab_size, (rows, t.seq_len), dtype=np.int32),
                 "targets": rng.integers(0, config.model.vocab_size, (rows, t.seq_len), dtype=np.int32),
                 "weights": np.ones((rows, t.seq_len), np.float32)}
        abs_state = step_lib.abstract_train_state(abstract_nnx, opt, self.mesh, config.mesh.fsdp)
        t0 = time.perf_counter()
        self.step, b_shard = step_lib.compile_train_step(t, graphdef, opt, abs_state, self.mesh, batch)
        with jax.set_mesh(self.mesh):
            shardings = jax.tree.map(lambda s: s.sharding, abs_state)
            self.state = step_lib.init_sharded_state(config.model, config.seed, opt, shardings)
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
                out[label] = common.time_call(lambda fn=fn, args=args: fn(*args), n)
        return out


def expand_dispatch(entries, dispatch) -> list:
    """Every MoE (label, config) once per moe.dispatch mode in `dispatch` (labels get ' [mode]'); dense ones as
    they are."""
    if not dispatch:
        return list(entries)
    bad = [d for d in dispatch if d not in config_lib.MOE_DISPATCH]
    if bad:
        raise config_lib.ConfigError(f"--dispatch {','.join(bad)}: choose from {config_lib.MOE_DISPATCH}")
    expanded = []
    for label, c in entries:
        if c.moe.num_experts == 0:
            expanded.append((label, c))
            continue
        for d in dispatch:
            c_d = c.copy_and_resolve_references()
            c_d.moe.dispatch = d
            expanded.append((f"{label} [{d}]", c_d))
    return expanded


def unique_labels(entries) -> list:
    """The entries with repeated labels made unique by primes."""
    out, seen = [], set()
    for label, c in entries:
        while label in seen:
            label += "'"
        seen.add(label)
        out.append((label, c))
    return out


def peak(devices, options: StepOptions, dtype) -> tuple[float, str]:
    """(peak TFLOP/s of `devices` together, where it comes from): --peak_tflops, else flops.devices_peak_tflops."""
    if options.peak_tflops > 0:
        return options.peak_tflops, "--peak_tflops"
    return flops.devices_peak_tflops(devices, matmul_n=options.matmul_n, dtype=dtype)


def benchmark(entries, options: StepOptions = StepOptions(), devices=None, out=print,
              benches_out: list | None = None) -> dict:
    """Benchmark [(label, config)] together; prints a report through `out` and returns
    {'device', 'num_devices', 'peak_tflops', 'peak_source', 'configs': {label: {...}}, 'fraction_of_dense': {...}}.
    `benches_out`, when a list, receives the compiled `Bench` objects (e.g. to profile a step afterwards)."""
    if not entries:
        raise ValueError("no configs to benchmark")
    devices = list(jax.devices()[:1] if devices is None else devices)
    dev = devices[0]
    configs = [(label, common.prepare(c, options.batch, options.seq, options.grad_accum, backend=dev.platform))
               for label, c in unique_labels(expand_dispatch(entries, options.dispatch))]
    out(f"device: {dev.device_kind} ({dev.platform}), timing on {len(devices)} of {jax.device_count()} device(s); "
        f"jax {jax.__version__}")
    dtype = dtype_of(configs[0][1].model.dtype)
    peak_tflops, source = peak(devices, options, dtype)
    out(f"peak: {peak_tflops * 1e3:,.1f} GFLOP/s ({source})")

    benches = []
    for label, c in configs:
        b = Bench(label, c, devices)
        out(f"compiled {label}: {b.compile_s:.1f} s")
        b.run(options.warmup)
        benches.append(b)
    times = common.interleave({b.name: (lambda b=b: b.run(options.steps)) for b in benches}, max(1, options.rounds))
    for b in benches:
        b.rounds.extend(times[b.name])
    if dev.platform == "cpu" and options.peak_tflops <= 0:  # again after the runs: the spread shows the noise
        peak_after, _ = peak(devices, options, dtype)
        out(f"peak re-measured after the runs: {peak_after * 1e3:,.1f} GFLOP/s; using the larger")
        peak_tflops = max(peak_tflops, peak_after)

    if benches_out is not None:
        benches_out.extend(benches)
    out("")
    results = {b.name: report(b, peak_tflops, options, out) for b in benches}
    return {"device": f"{dev.device_kind} ({dev.platform})", "num_devices": len(devices), "peak_tflops": peak_tflops,
            "peak_source": source, "configs": results, "fraction_of_dense": fractions_of_dense(results, out)}


def newton_schulz_settings(optim) -> dict:
    """What Muon's Newton-Schulz runs as (OptimConfig.ns, resolved by parse) in config.json's field names."""
    return {"ns_dtype": optim.ns.dtype, "ns_stack": optim.ns.stack, "ns_method": optim.ns.method}


def measure(b: Bench, peak_tflops: float) -> dict:
    """One config's numbers from its timed rounds."""
    c = b.config
    counts, fpt = flops.param_counts(c.model), flops.run_flops_per_token(c)
    sec = statistics.median(b.rounds)
    tps = b.tokens_per_step / sec
    return dict(name=c.name, step_time_s=sec, rounds_s=list(b.rounds), tokens_per_s=tps,
                tflops=tps * fpt["training"] / 1e12, mfu=flops.mfu(tps, fpt["training"], peak_tflops),
                tokens_per_step=b.tokens_per_step, compile_s=b.compile_s, params_total=counts["total"],
                params_active=counts["active"], training_flops_per_token=fpt["training"],
                padding_flops_per_token=fpt["dispatch_overhead_training"],
                tflops_with_padding=tps * (fpt["training"] + fpt["dispatch_overhead_training"]) / 1e12,
                dispatch=c.moe.dispatch if c.moe.num_experts else "", loss=b.last_loss, dense=c.moe.num_experts == 0,
                dtype=c.model.dtype, attention=c.model.attention, memory_bytes=dict(b.memory),
                newton_schulz=newton_schulz_settings(c.optim))


def report(b: Bench, peak_tflops: float, options: StepOptions, out) -> dict:
    """Measure one config, print its block, and (--breakdown) time its parts; returns its numbers."""
    r = measure(b, peak_tflops)
    c, t, ns = b.config, b.config.train, r["newton_schulz"]
    fpt = flops.run_flops_per_token(c)
    muon_desc = (f" ({c.optim.muon_impl}: NS {ns['ns_dtype']}, stack {ns['ns_stack']}, {ns['ns_method']})"
                 if c.optim.name == "muon" else "")
    out(f"== {b.name}: batch {t.batch_size} x accum {t.grad_accum} x seq {t.seq_len}, {c.model.dtype}, "
        f"attention {c.model.attention}, optimizer {c.optim.name}{muon_desc}")
    out(f"   params {r['params_total'] / 1e6:.2f} M total, {r['params_active'] / 1e6:.2f} M active; training "
        f"{fpt['training'] / 1e6:.2f} MFLOP/token (dispatch overhead "
        f"{fpt['dispatch_overhead_training'] / 1e6:.2f} MFLOP/token apart"
        + (f", moe.dispatch={c.moe.dispatch}" if c.moe.num_experts else "") + ")")
    if b.memory:
        out("   compiled step memory per device: " + ", ".join(
            f"{k.replace('_size_in_bytes', '')} {v / 2**30:.2f} GiB" for k, v in b.memory.items()))
    out(f"   step time {r['step_time_s'] * 1e3:.1f} ms (rounds: {', '.join(f'{s * 1e3:.1f}' for s in b.rounds)} ms), "
        f"loss {b.last_loss:.3f}")
    out(f"   tokens/s {r['tokens_per_s']:,.0f}; TFLOP/s {r['tflops']:.4g}; MFU {r['mfu']:.2%} of the peak "
        f"({peak_tflops * 1e3:,.1f} GFLOP/s)")
    if fpt["dispatch_overhead"]:
        out(f"   counting the dispatch overhead: {r['tflops_with_padding']:.4g} TFLOP/s "
            f"({r['tflops_with_padding'] / peak_tflops:.2%} of the peak)")
    if options.breakdown:
        r["breakdown_s"] = b.breakdown(max(2, options.steps // 2))
        for label, s in r["breakdown_s"].items():
            out(f"   {label:<17} {s * 1e3:8.1f} ms")
        r["update_share_of_step"] = r["breakdown_s"]["optimizer update"] / r["step_time_s"]
        out(f"   optimizer update: {r['update_share_of_step']:.1%} of the step")
    return r


def fractions_of_dense(results: dict, out) -> dict:
    """Every config's TFLOP/s, tokens/s, step time and model FLOPs per token over the first dense config's
    (printed); {} without a dense config or with one config only."""
    dense_name = next((n for n, r in results.items() if r["dense"]), None)
    if dense_name is None or len(results) < 2:
        return {}
    out("")
    d, fractions = results[dense_name], {}
    for n, r in results.items():
        if n == dense_name:
            continue
        f = fractions[n] = {"of": dense_name, "tflops": r["tflops"] / d["tflops"],
                            "tokens_per_s": r["tokens_per_s"] / d["tokens_per_s"],
                            "step_time": r["step_time_s"] / d["step_time_s"],
                            "flops_per_token": r["training_flops_per_token"] / d["training_flops_per_token"]}
        out(f"{n}: TFLOP/s {f['tflops']:.1%} of dense ({dense_name}); tokens/s {f['tokens_per_s']:.1%} of dense; "
            f"step time {f['step_time']:.3f}x dense's at {f['flops_per_token']:.3f}x its model FLOPs per token")
    return fractions


def from_flags() -> dict:
    """`--mode step` from the command line: the report printed, the results returned."""
    from absl import flags

    from moe_jax import cli

    FLAGS = flags.FLAGS
    n = FLAGS.devices or jax.device_count()
    if n > jax.device_count():
        raise cli.UsageError(f"--devices {n}: only {jax.device_count()} available; use at most that (0: all)")
    batch = common.int_list("batch", FLAGS.batch, [StepOptions.batch])
    if len(batch) != 1:
        raise cli.UsageError(f"--batch {','.join(FLAGS.batch)}: --mode step times one batch size, e.g. --batch 4")
    options = StepOptions(batch=batch[0], seq=FLAGS.seq or StepOptions.seq, grad_accum=FLAGS.grad_accum,
                          steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds or StepOptions.rounds,
                          matmul_n=FLAGS.matmul_n, peak_tflops=FLAGS.peak_tflops, breakdown=FLAGS.breakdown,
                          dispatch=tuple(FLAGS.dispatch))
    entries = common.entries_from_flags()
    variants = common.variants_from_flags()
    if variants:
        common.describe_variants(variants, lambda s: print(s, flush=True))
        entries = common.with_variants(entries, variants)
    # a ConfigError exits with status 2 (cli.run)
    return benchmark(entries, options, jax.devices()[:n], out=lambda s: print(s, flush=True))
