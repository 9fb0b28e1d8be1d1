"""Command line: from a dollar budget to a model shape and a config that spends it.

    python -m moe_jax.budget --usd 50 --device h100 [--moe --experts 8 --top_k 2] [--hours 4] [--mfu 0.4]
                             [--vocab 8192] [--seq 1024] [--write configs/x.py]

Budget in FLOPs: C = usd / price ($ per device-hour) x 3600 x peak (dense bf16 FLOP/s per device) x MFU. Prices, peaks
and measured MFUs are the table in moe_jax/tools/hardware.py (sources and dates there); MFU defaults to
hardware.DEFAULT_MFU where none was measured, and --mfu overrides it.

Sizing rule: Chinchilla (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 1-3 and
Table 3): the loss-optimal model for a compute budget is trained on about 20 tokens per parameter, counting all
parameters including embeddings (Pearce & Song 2024, "Reconciling Kaplan and Chinchilla Scaling Laws", on that
convention). For a Mixture-of-Experts model the rule is applied to its ACTIVE parameters (flops.param_counts
'active': what one token touches), i.e. the MoE is sized like the dense model of the same FLOPs per token and gets
its extra experts on top. That is an assumption, not a result: Clark et al. 2022 ("Unified Scaling Laws for Routed
Language Models") and Krajewski et al. 2024 ("Scaling Laws for Fine-Grained Mixture of Experts") find that routed
models reach a lower loss than dense ones at equal FLOPs and that the compute-optimal token count depends on the
number and granularity of experts (Krajewski et al.: more tokens per active parameter than dense as granularity
grows); no published law covers this exact family (top-k switch routing with capacity, Muon), so the MoE pick is a
dense-equivalent starting point to be checked with moe_jax.compare.

Shapes searched (what config_lib.validate accepts): n_layers in SEARCH_LAYERS, d_model a multiple of the head
dimension (64 below d_model 1024, 128 from there), n_heads = d_model / head_dim, d_ff = 4 d_model (and expert d_ff =
4 d_model, as in seed exp5), aspect ratio d_model / n_layers in [ASPECT_MIN, ASPECT_MAX]. Each shape's
'Chinchilla point' costs 20 x active params x training FLOPs/token (flops.flops_per_token at --seq). The pick is
the shape whose point is nearest the budget, preferring among those within PICK_TOLERANCE of it the one whose aspect
ratio is nearest ASPECT_TARGET (GPT-3's and Chinchilla's models lie at ~64-128). Then the written config spends the
whole budget: global batch = the power-of-two number of sequences nearest tokens / STEPS_TARGET per step (at least
one sequence per device, at most MAX_BATCH_TOKENS), steps = round(C / flops.flops_per_step), so steps x FLOPs/step is
within half a step of C (tested within 5%).

Devices: one unless --hours is given, then ceil(device-hours / hours) devices on a data-parallel mesh. The micro-batch
per device is chosen from a memory estimate (parameters + gradients + optimizer state ~20 bytes per parameter, bf16
activations ~(34 + 5 heads seq / d_model) bytes per token, layer and d_model, Korthikanti et al. 2022) against 70% of
the device's memory; the rest of the global batch is gradient accumulation. When the parameters and optimizer state
alone do not fit one device (with one row of activations) and there are several devices, the config gets
mesh.fsdp=True (FSDP: that state split over the devices; moe_jax/sharding.py). It is an estimate; with --write, when the
compilers of requirements-aot.txt are installed, the config is compiled for those devices (moe_jax.aot: the trainer's
steps, the real XLA compiler, no device attached) and, if it does not fit, model.remat=True and then halved
micro-batches with doubled accumulation are tried in that order and the first that fits is written (--nocheck skips
it; without the compilers one line says it was skipped).

Flags, errors and exit codes follow moe_jax/cli.py: a bad flag or value is one `error:` line naming it, status 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import sys

from moe_jax.config import schema as config_lib
from moe_jax.config import typed
from moe_jax.model import flops
from moe_jax.tools import hardware

TOKENS_PER_PARAM = 20.0
SEARCH_LAYERS = (2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 36, 40, 48, 56, 64, 72, 80)
ASPECT_MIN, ASPECT_MAX, ASPECT_TARGET = 32, 256, 96
MIN_D_MODEL, MAX_D_MODEL = 128, 16384
PICK_TOLERANCE = 0.25  # shapes whose point is within 25% of the budget compete on aspect ratio
STEPS_TARGET = 2000
MAX_BATCH_TOKENS = 2 ** 20
MIN_STEPS = 50
BYTES_PER_PARAM = 20  # f32 params 4 + grads 4 + accumulated grads 4 + AdamW moments 8 (Muon keeps 1 moment)
MEMORY_FRACTION = 0.7


class BudgetError(ValueError):
    """The flags cannot give a run; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    head_dim: int

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def aspect(self) -> float:
        return self.d_model / self.n_layers


@dataclasses.dataclass(frozen=True)
class Options:
    usd: float
    device: str
    moe: bool = False
    experts: int = 8
    top_k: int = 2
    hours: float | None = None
    mfu: float | None = None
    vocab: int = 8192
    seq: int = 1024


@dataclasses.dataclass
class Point:
    """One shape at its Chinchilla point (TOKENS_PER_PARAM x active parameters)."""
    shape: Shape
    params: int
    active: int
    flops_per_token: float  # training
    tokens: float
    flops: float
    device_hours: float
    usd: float


@dataclasses.dataclass
class Plan:
    options: Options
    device: hardware.Device
    mfu: float
    mfu_source: str
    budget_flops: float
    devices: int
    pick: Point
    candidates: list[Point]
    config: object  # the ConfigDict written by --write
    steps: int
    flops_per_step: float
    tokens: float  # trained: steps x tokens per step
    hours: float  # wall clock on `devices` devices at the assumed MFU
    usd: float  # cost of steps x flops_per_step


def _check_options(o: Options) -> hardware.Device:
    device = hardware.get(o.device)  # ValueError naming the choices
    if not (o.usd > 0 and math.isfinite(o.usd)):
        raise BudgetError(f"--usd {o.usd}: must be a positive number of US dollars")
    if o.mfu is not None and not 0 < o.mfu <= 1:
        raise BudgetError(f"--mfu {o.mfu}: must be in (0, 1], e.g. 0.35")
    if o.hours is not None and not o.hours > 0:
        raise BudgetError(f"--hours {o.hours}: must be > 0 (wall-clock hours; sets the number of devices)")
    if o.vocab < 256:
        raise BudgetError(f"--vocab {o.vocab}: must be >= 256 (the tokenizer's size, e.g. 8192 or 49152)")
    if o.seq < 128:
        raise BudgetError(f"--seq {o.seq}: must be >= 128")
    if o.moe:
        if o.experts < 2:
            raise BudgetError(f"--experts {o.experts}: an MoE needs at least 2 experts")
        if not 1 <= o.top_k <= o.experts:
            raise BudgetError(f"--top_k {o.top_k}: must be between 1 and --experts {o.experts}")
    return device


def shapes() -> list[Shape]:
    """Every shape searched (see the module docstring)."""
    out = []
    for n_layers in SEARCH_LAYERS:
        for d_model in range(MIN_D_MODEL, MAX_D_MODEL + 1, 64):
            head_dim = 64 if d_model < 1024 else 128
            if d_model % head_dim or not ASPECT_MIN <= d_model / n_layers <= ASPECT_MAX:
                continue
            out.append(Shape(n_layers, d_model, head_dim))
    return out


def make_config(shape: Shape, o: Options, batch_size: int = 8, grad_accum: int = 1, steps: int = 1000):
    """The run config of `shape` under options `o` (base_config plus the fields the budget sets)."""
    c = config_lib.base_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads = o.vocab, shape.d_model, shape.n_layers, shape.n_heads
    m.d_ff = 4 * shape.d_model
    m.dropout = 0.0
    m.dtype = "bfloat16"
    if o.moe:
        c.moe.num_experts, c.moe.top_k, c.moe.every, c.moe.d_ff = o.experts, o.top_k, 1, 4 * shape.d_model
    else:
        c.moe.num_experts = 0
    t = c.train
    t.seq_len, t.batch_size, t.grad_accum, t.steps = o.seq, batch_size, grad_accum, steps
    t.log_every = max(1, steps // 200)
    t.eval_every = max(1, steps // 20)
    t.checkpoint_every = t.eval_every
    return c


def point(shape: Shape, o: Options, device: hardware.Device, mfu: float) -> Point:
    run = typed.parse(make_config(shape, o))
    counts = flops.param_counts(run.model)
    fpt = flops.run_flops_per_token(run)["training"]
    tokens = TOKENS_PER_PARAM * counts["active"]
    total = tokens * fpt
    hours = total / (device.peak_tflops * 1e12 * mfu) / 3600.0
    return Point(shape, counts["total"], counts["active"], fpt, tokens, total, hours, hours * device.usd_per_hour)


def _rough_flops(s: Shape, o: Options) -> float:
    """6 N^2 x TOKENS_PER_PARAM with N ~ active parameters (attention 4 d^2, FFN 8 d^2 per active expert, embedding):
    only used to skip shapes far from the budget before the exact count."""
    n = s.n_layers * (4 + 8 * (o.top_k if o.moe else 1)) * s.d_model ** 2 + o.vocab * s.d_model
    return 6.0 * n * n * TOKENS_PER_PARAM


def budget_flops(usd: float, device: hardware.Device, mfu: float) -> float:
    """Training FLOPs the budget buys: device-hours x 3600 x peak x MFU."""
    return usd / device.usd_per_hour * 3600.0 * device.peak_tflops * 1e12 * mfu


def _pick(points: list[Point], budget: float) -> Point:
    fit = lambda p: abs(math.log(p.flops / budget))  # noqa: E731
    close = [p for p in points if fit(p) <= math.log(1 + PICK_TOLERANCE)]
    if not close:
        return min(points, key=fit)
    return min(close, key=lambda p: (abs(math.log(p.shape.aspect / ASPECT_TARGET)), fit(p)))


def _candidates(points: list[Point], pick: Point, budget: float, around: int = 2) -> list[Point]:
    """The best-fitting shape at each depth, for the pick's depth and `around` depths either side."""
    best: dict[int, Point] = {}
    for p in points:
        cur = best.get(p.shape.n_layers)
        if cur is None or abs(math.log(p.flops / budget)) < abs(math.log(cur.flops / budget)):
            best[p.shape.n_layers] = p
    best[pick.shape.n_layers] = pick
    depths = sorted(best)
    i = depths.index(pick.shape.n_layers)
    return [best[d] for d in depths[max(0, i - around):i + around + 1]]


def _activation_bytes_per_row(c) -> float:
    m = c.model
    per_token_layer = (34 + 5 * m.n_heads * c.train.seq_len / m.d_model) * m.d_model
    if c.moe.num_experts:
        per_token_layer += 2 * c.moe.top_k * c.moe.d_ff * 2 * c.moe.capacity_factor  # expert hidden, bf16
    return per_token_layer * c.train.seq_len * m.n_layers + 4 * c.train.seq_len * m.vocab_size * 2  # + logits f32


def _micro_rows(c, device: hardware.Device, rows_per_device: int, devices: int = 1) -> tuple[int, bool, bool]:
    """(micro-batch rows per device, fits, fsdp) from the memory estimate in the module docstring. fsdp: the
    replicated state with one row does not fit one device but does split over the `devices` (config.mesh.fsdp:
    parameters and optimizer state sharded over the data-parallel devices, 1/devices of it each)."""
    memory = MEMORY_FRACTION * device.memory_gib * 2 ** 30
    fixed = BYTES_PER_PARAM * flops.param_counts(typed.parse(c).model)["total"]
    per_row = _activation_bytes_per_row(c)
    fsdp = devices > 1 and fixed + per_row > memory
    if fsdp:
        fixed /= devices
    rows = rows_per_device
    while rows > 1 and fixed + rows * per_row > memory:
        rows //= 2
    return rows, fixed + rows * per_row <= memory, fsdp


def plan(o: Options) -> Plan:
    """Size a model for the budget (see the module docstring). Raises BudgetError / ValueError on bad options or a
    budget below the smallest shape's Chinchilla point."""
    device = _check_options(o)
    mfu, mfu_source = hardware.mfu_for(device, o.mfu)
    budget = budget_flops(o.usd, device, mfu)
    everything = shapes()
    smallest = point(min(everything, key=lambda s: (s.d_model * s.n_layers, s.d_model)), o, device, mfu)
    # exact counts (flops.py) only for shapes a rough count puts within 4x of the budget: ConfigDicts are slow
    points = [point(s, o, device, mfu) for s in everything if abs(math.log(_rough_flops(s, o) / budget)) < math.log(4)]
    points = points or [smallest]
    if budget < smallest.flops:
        s = smallest.shape
        raise BudgetError(
            f"--usd {o.usd:g}: too small for the smallest model searched ({s.n_layers} layers x d_model "
            f"{s.d_model}, {smallest.active / 1e6:.2f}M active parameters, {TOKENS_PER_PARAM:g} tokens/parameter) "
            f"on {device.name} at MFU {mfu:.2f}: the minimum is ${_ceil_cents(smallest.usd):.4g}")
    pick = _pick(points, budget)

    device_hours = budget / (device.peak_tflops * 1e12 * mfu) / 3600.0
    devices = 1 if o.hours is None else max(1, math.ceil(device_hours / o.hours - 1e-9))
    tokens_goal = budget / pick.flops_per_token
    rows_per_device = 2 ** max(0, round(math.log2(max(1.0, tokens_goal / STEPS_TARGET / o.seq / devices))))
    while rows_per_device > 1 and rows_per_device * devices * o.seq > MAX_BATCH_TOKENS:
        rows_per_device //= 2
    fps = lambda rows: pick.flops_per_token * rows * o.seq  # noqa: E731  training FLOPs per step
    while rows_per_device > 1 and budget / fps(rows_per_device * devices) < MIN_STEPS:
        rows_per_device //= 2
    global_rows = rows_per_device * devices
    steps = max(1, round(budget / fps(global_rows)))
    if steps < 10:
        raise BudgetError(f"--usd {o.usd:g}: buys only {steps} step(s) of one sequence of {o.seq} tokens per device; "
                          f"lower --seq or raise --usd")
    probe = make_config(pick.shape, o, global_rows, 1, steps)
    micro, fits, fsdp = _micro_rows(probe, device, rows_per_device, devices)
    config = make_config(pick.shape, o, micro * devices, rows_per_device // micro, steps)
    config.mesh.fsdp = fsdp
    if not fits:
        config.model.remat = True
    config.name = f"budget_{device.name}_{o.usd:g}usd{'_moe' if o.moe else ''}".replace(".", "p")
    step_flops = flops.flops_per_step(typed.parse(config))  # the plan's one parse (a ConfigError names the field)
    total = steps * step_flops
    hours = total / (device.peak_tflops * 1e12 * mfu) / 3600.0
    return Plan(options=o, device=device, mfu=mfu, mfu_source=mfu_source, budget_flops=budget, devices=devices,
                pick=pick, candidates=_candidates(points, pick, budget), config=config, steps=steps,
                flops_per_step=step_flops, tokens=float(steps * global_rows * o.seq), hours=hours / devices,
                usd=hours * device.usd_per_hour)


def _remedies(config, devices: int):
    """(what changed, config) in the order tried: as planned; model.remat=True; then train.batch_size halved with
    train.grad_accum doubled (the tokens per step stay equal) while every device keeps whole rows."""
    yield "as planned", config
    c = config.copy_and_resolve_references()
    if not c.model.remat:
        c.model.remat = True
        yield "model.remat=True", c
    while c.train.batch_size % 2 == 0 and (c.train.batch_size // 2) % devices == 0:
        c = c.copy_and_resolve_references()
        c.train.batch_size //= 2
        c.train.grad_accum *= 2
        yield (f"model.remat=True, train.batch_size={c.train.batch_size} with train.grad_accum={c.train.grad_accum}",
               c)


def compile_check(p: Plan, out=print) -> Plan:
    """The config compiled for p.devices devices of p.device by moe_jax.aot (the trainer's own steps, the real XLA
    compiler, nothing attached): reports fits or not and the peak per device; if it does not fit, tries _remedies in
    order and returns the plan with the first that fits (the plan as is when none does, or when the check cannot
    run: the compiler package is absent or no target matches, said in one line)."""
    from moe_jax.tools import aot, targets
    try:
        name, slices = targets.for_devices(p.device.name, p.devices)
        targets.check_compiler(targets.get(name))
    except targets.TargetError as e:
        out(f"compile check skipped: {e}")
        return p
    where = f"{name}{f' x {slices} slices' if slices > 1 else ''}"
    for change, config in _remedies(p.config, p.devices):
        try:
            result = aot.run(config, aot.Request(target=name, slices=slices))
        except aot.AotError as e:
            out(f"compile check on {where}, {change}: {e}")
            if "does not fit" not in str(e):
                return p
            continue
        peak = max(q["memory"]["peak"] for q in result["programs"].values())
        device_gib = result["programs"]["train"]["device_memory"] / aot.GIB
        out(f"compile check on {where}, {change}: peak {peak / aot.GIB:.2f} GiB per device of {device_gib:.1f} GiB: "
            f"{'fits' if result['fits'] else f'does not fit (limit {aot.MEMORY_LIMIT:.0%})'}")
        if result["fits"]:
            if change != "as planned":
                out(f"compile check: writing the config with {change}")
            return dataclasses.replace(p, config=config)
    out("compile check: no remedy fits; the config is written as planned: shard the model (mesh.shape) or use more "
        "devices (--hours)")
    return p


def _ceil_cents(usd: float) -> float:
    """Round up to 2 significant digits (so the stated minimum is enough)."""
    if usd <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(usd)) - 1)
    return math.ceil(usd / scale) * scale


def _num(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def report(p: Plan) -> str:
    """The printed report: inputs, candidate table, pick, the written config's numbers, and the rule's caveats."""
    o, d, c = p.options, p.device, p.config
    lines = [
        f"budget: ${o.usd:g} on {d.name} ({d.description}) at ${d.usd_per_hour:.2f}/device-hour"
        f"{' (approximate)' if d.approximate else ''}; source: {d.price_source} "
        f"[retrieved {hardware.PRICES_RETRIEVED}]",
        f"peak {d.peak_tflops:g} TFLOP/s dense bf16 ({d.peak_source}); MFU {p.mfu:.2f} ({p.mfu_source})",
        f"=> {p.budget_flops:.3e} training FLOPs ({p.budget_flops / (d.peak_tflops * 1e12 * p.mfu) / 3600:.2f} "
        f"device-hours)",
        f"rule: {TOKENS_PER_PARAM:g} training tokens per {'ACTIVE ' if o.moe else ''}parameter (Chinchilla, Hoffmann "
        f"et al. 2022); vocab {o.vocab}, seq {o.seq}, d_ff = 4 d_model"
        + (f", {o.experts} experts top-{o.top_k} in every layer" if o.moe else ", dense"),
        "",
        "candidates at their 20-tokens/parameter point (best fit per depth; * = pick):",
        f"  {'':1} {'layers':>6} {'d_model':>7} {'heads':>5} {'params':>8} {'active':>8} {'tokens':>8} "
        f"{'steps':>8} {'hours':>8} {'$':>9}",
    ]
    rows = c.train.batch_size * c.train.grad_accum
    for q in p.candidates:
        steps = q.tokens / (rows * o.seq)
        mark = "*" if q is p.pick else ""
        lines.append(f"  {mark:1} {q.shape.n_layers:>6} {q.shape.d_model:>7} {q.shape.n_heads:>5} {_num(q.params):>8} "
                     f"{_num(q.active):>8} {_num(q.tokens):>8} {steps:>8.0f} {q.device_hours / p.devices:>8.3g} "
                     f"{q.usd:>9.4g}")
    m = c.model
    lines += [
        "",
        f"pick: {m.n_layers} layers x d_model {m.d_model} ({m.n_heads} heads of {m.d_model // m.n_heads}), "
        f"{_num(p.pick.params)} parameters, {_num(p.pick.active)} active, "
        f"{p.pick.flops_per_token:.4g} training FLOPs/token",
        f"run: {p.steps} steps x {rows} sequences x {o.seq} tokens = {_num(p.tokens)} tokens "
        f"({p.tokens / p.pick.active:.1f} tokens/{'active ' if o.moe else ''}parameter) on {p.devices} device(s), "
        f"micro-batch {c.train.batch_size} x accumulation {c.train.grad_accum}{', remat' if m.remat else ''}",
        f"     steps x flops_per_step = {p.steps * p.flops_per_step:.4e} FLOPs "
        f"({100 * (p.steps * p.flops_per_step / p.budget_flops - 1):+.2f}% of the budget), "
        f"{p.hours:.3g} h wall clock, ${p.usd:.2f}",
    ]
    lines.append(f"data: the config keeps base_config()'s data section (data.source={c.data.source!r}); the shipped "
                 f"Bible corpus holds ~1M tokens, so {_num(p.tokens)} tokens would repeat it: set data.source "
                 f"(tfds/files) to a corpus of at least that many tokens")
    if m.remat:
        lines.append("memory: the estimate exceeds 70% of one device even at micro-batch 1; remat is on, and a "
                     "model this size may need the 'model' mesh axis (mesh.shape) or more devices")
    if p.pick is max(p.candidates, key=lambda q: q.flops) and p.pick.flops < p.budget_flops / (1 + PICK_TOLERANCE):
        lines.append(f"note: the budget exceeds the largest shape searched; it trains on "
                     f"{p.tokens / p.pick.active:.0f} tokens/parameter")
    if o.moe:
        lines += [
            "",
            "MoE caveat: the 20 tokens/parameter rule is measured for dense models (Hoffmann et al. 2022). Applying it",
            "to active parameters sizes the MoE like the dense model of equal FLOPs/token. Known: routed models reach",
            "lower loss at equal FLOPs (Clark et al. 2022), and the compute-optimal tokens per active parameter grows",
            "with expert granularity (Krajewski et al. 2024). Unknown: the optimum for this family (top-k routing with",
            "capacity, Muon); compare against the dense pick with moe_jax.compare before spending a large budget.",
        ]
    return "\n".join(lines)


def config_source(p: Plan, argv: list[str] | None = None, path: str = "<this file>") -> str:
    """A config file (get_config on config_lib.base_config) that moe_jax.train runs as is."""
    c, o = p.config, p.options
    cmd = "python -m moe_jax.budget " + " ".join(argv if argv is not None else [])
    fields = [
        ("name", c.name),
        ("model.vocab_size", c.model.vocab_size), ("model.d_model", c.model.d_model),
        ("model.n_layers", c.model.n_layers), ("model.n_heads", c.model.n_heads), ("model.d_ff", c.model.d_ff),
        ("model.dropout", c.model.dropout), ("model.dtype", c.model.dtype), ("model.remat", c.model.remat),
        ("moe.num_experts", c.moe.num_experts),
    ]
    if c.moe.num_experts:
        fields += [("moe.top_k", c.moe.top_k), ("moe.every", c.moe.every), ("moe.d_ff", c.moe.d_ff)]
    fields += [
        ("train.steps", c.train.steps), ("train.batch_size", c.train.batch_size),
        ("train.grad_accum", c.train.grad_accum), ("train.seq_len", c.train.seq_len),
        ("train.log_every", c.train.log_every), ("train.eval_every", c.train.eval_every),
        ("train.checkpoint_every", c.train.checkpoint_every),
    ]
    if c.mesh.fsdp:  # the replicated state does not fit one device (_micro_rows)
        fields.append(("mesh.fsdp", True))
    body = "\n".join(f"    c.{k} = {v!r}" for k, v in fields)
    d = p.device
    return f'''"""Written by `{cmd.strip()}` on {datetime.date.today().isoformat()}.

Budget ${o.usd:g} on {d.name} at ${d.usd_per_hour:.2f}/device-hour, peak {d.peak_tflops:g} TFLOP/s, MFU {p.mfu:.2f}
= {p.budget_flops:.4e} training FLOPs; this config: {p.steps} steps x {p.flops_per_step:.4e} FLOPs/step
= {p.steps * p.flops_per_step:.4e} ({100 * (p.steps * p.flops_per_step / p.budget_flops - 1):+.2f}%), \
{_num(p.tokens)} tokens on {p.devices} device(s).
Sizing rule and caveats: moe_jax/budget.py. Data: config_lib.base_config()'s (the shipped corpus unless changed).

    python -m moe_jax.train --config {path} --workdir runs/{c.name}
"""

from moe_jax.config import schema as config_lib


def get_config():
    c = config_lib.base_config()
{body}
    return c
'''


def define_flags() -> None:
    """The command's flags (defined only when it runs as a program; see moe_jax/cli.py)."""
    from absl import flags
    flags.DEFINE_float("usd", None, "Budget in US dollars.")
    flags.DEFINE_string("device", None, f"One of: {', '.join(hardware.DEVICES)}.")
    flags.DEFINE_bool("moe", False, "Size a Mixture-of-Experts model (the rule on active parameters).")
    flags.DEFINE_integer("experts", None, "Experts per MoE layer (with --moe; default 8).")
    flags.DEFINE_integer("top_k", None, "Experts per token (with --moe; default 2).")
    flags.DEFINE_float("hours", None, "Wall-clock limit: sets the number of devices.")
    flags.DEFINE_float("mfu", None, "Model FLOP utilisation to assume (default: the table's, else 0.35).")
    flags.DEFINE_integer("vocab", 8192, "Vocabulary size (the tokenizer's).")
    flags.DEFINE_integer("seq", 1024, "Sequence length.")
    flags.DEFINE_string("write", None, "Write the picked config to this .py file.")
    flags.DEFINE_bool("check", True, "With --write: compile the config for the devices first (moe_jax.aot; needs "
                      "requirements-aot.txt) and write the first of remat / a smaller micro-batch that fits.")
    flags.mark_flags_as_required(["usd", "device"])


def command(usd: float, device: str, *, moe: bool = False, experts: int | None = None, top_k: int | None = None,
            hours: float | None = None, mfu: float | None = None, vocab: int = 8192, seq: int = 1024,
            write: str | None = None, check: bool = True, argv: list[str] | None = None) -> Plan:
    """The command: plan, print the report, write the config. Bad input raises cli.UsageError naming the flag."""
    from moe_jax import cli
    if not moe and (experts is not None or top_k is not None):
        raise cli.UsageError("--experts/--top_k need --moe")
    if write is not None and not write.endswith(".py"):
        raise cli.UsageError(f"--write {write}: must be a .py file")
    o = Options(usd=usd, device=device, moe=moe, experts=Options.experts if experts is None else experts,
                top_k=Options.top_k if top_k is None else top_k, hours=hours, mfu=mfu, vocab=vocab, seq=seq)
    try:
        p = plan(o)
    except (BudgetError, ValueError, config_lib.ConfigError) as e:
        raise cli.UsageError(str(e)) from None
    print(report(p))
    if write and check:
        p = compile_check(p)
    if write:
        os.makedirs(os.path.dirname(os.path.abspath(write)), exist_ok=True)
        with open(write, "w") as f:
            f.write(config_source(p, argv if argv is not None else sys.argv[1:], write))
        print(f"\nwrote {write}: python -m moe_jax.train --config {write} --workdir runs/{p.config.name}")
    return p


def main(argv) -> None:
    from absl import flags

    from moe_jax import cli
    cli.no_arguments(argv)
    f = flags.FLAGS
    command(f.usd, f.device, moe=f.moe, experts=f.experts, top_k=f.top_k, hours=f.hours, mfu=f.mfu, vocab=f.vocab,
            seq=f.seq, write=f.write, check=f.check, argv=sys.argv[1:])


if __name__ == "__main__":
    from moe_jax import cli
    cli.run(main, define_flags)
