"""FLOP-matched comparisons of architectures (dense vs MoE), with seeds, a report, and resumable runs.

    python -m moe_jax.compare --config configs/compare.py --workdir runs/cmp

A comparison config (see configs/compare.py) has
  base      - a full moe_jax config: the shared data, tokenizer, optimizer and training setup;
  arms      - name -> partial config (nested overrides of base), or a derived arm:
                {'derive': 'same_active', 'from_arm': 'dense', 'num_experts': 8, 'top_k': 2, 'every': 1}
                    MoE whose active FFN parameters equal the dense arm's (expert d_ff = dense d_ff / top_k);
                {'derive': 'same_total', 'from_arm': 'moe'}
                    dense whose total parameters equal the MoE arm's (d_ff = the MoE model's FFN parameters spread
                    evenly over its layers; the router's M*E per layer is ignored);
  arm_names - the arms to run, in report order (comma-separated);
  seeds     - model-init/dropout seeds (>= 3 for a real comparison); the data seed is shared, so every arm and seed
              sees the same tokenizer, the same validation windows and the same training-token order (checked: all
              arms must agree on the data section, vocab_size, seq_len, batch_size and eval_batches);
  budget    - flops (total training FLOPs per run) or, when 0, reference_arm x reference_steps;
  num_evals - evaluations per run (0: keep base.train.eval_every): each arm's eval_every = ceil(steps / num_evals),
              so every arm is evaluated at about the same training-FLOP points.

Budget rule (also printed and written to the report): for each arm a,
    FLOPs/step(a) = training FLOPs/token(a) x batch_size x grad_accum x seq_len   (flops.flops_per_token: 3 x forward,
                    active experts only; the dispatch's own FLOPs (moe.dispatch='capacity': capacity padding and the
                    dispatch/combine einsums; 'dropless': the gate combine and, on XLA:CPU, ragged_dot's dense
                    fallback; flops.py `dispatch_overhead`) reported apart, not counted)
    steps(a)      = max(1, round(budget / FLOPs/step(a)))
so |steps(a) x FLOPs/step(a) - budget| <= FLOPs/step(a) / 2, and any two arms differ by at most one step's FLOPs.

Each run lives in <workdir>/<arm>/seed<k>/ (an ordinary moe_jax.train workdir with orbax checkpoints): re-running
skips finished runs and resumes unfinished ones from their latest checkpoint; a run dir started with a different
config is refused (use a new --workdir). Output: report.md, results.json and plots/*.png in the workdir.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

import ml_collections
import numpy as np

from moe_jax import config_lib, flops, precision
from moe_jax import metrics as metrics_lib

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"

# (key, column label, format, varies with the seed)
REPORT_FIELDS = (
    ("params_total", "parameters", "{:,.0f}", False),
    ("params_active", "active parameters", "{:,.0f}", False),
    ("steps", "steps", "{:,.0f}", False),
    ("tokens", "training tokens", "{:,.0f}", False),
    ("training_flops", "training FLOPs", "{:.4e}", False),
    ("val_loss", "val loss", "{:.4f}", True),
    ("val_accuracy", "val accuracy", "{:.4f}", True),
    ("val_perplexity", "val perplexity", "{:.2f}", True),
    ("wall_time", "wall time (s)", "{:.1f}", True),
    ("tokens_per_s", "tokens/s", "{:,.0f}", True),
    ("mfu", "MFU", "{:.4f}", True),
    ("dropped_fraction", "dropped-token fraction", "{:.4f}", True),
)

FORMULA = ("training FLOPs/token = 3 x forward; forward = 2 x (attention + dense FFN + k active experts + output "
           "head parameters) + causal attention scores 2*S*d_model per layer + router 2*d_model*E per MoE layer "
           "(embedding lookup, norms, softmaxes and the loss not counted; capacity padding and dispatch/combine "
           "reported apart, not counted). FLOPs/step = FLOPs/token x batch_size x grad_accum x seq_len; "
           "steps = max(1, round(budget / FLOPs/step)).")

# Fields every arm must share so that all runs see the same tokenizer, validation windows and token order.
SHARED_FIELDS = ("model.vocab_size", "train.seq_len", "train.batch_size", "train.eval_batches")
# Fields a re-run may change without invalidating a run dir (presentation, caches, peak for MFU).
RERUN_IGNORED = ("train.progress_bar", "train.plots", "train.async_checkpoint", "train.peak_tflops",
                 "data.cache_dir", "data.worker_count")


def _merge(base: ml_collections.ConfigDict, overrides, where: str) -> None:
    for k, v in overrides.items():
        if k not in base:
            raise config_lib.ConfigError(f"{where}.{k}: unknown config field (not in the base config)")
        if isinstance(v, (dict, ml_collections.ConfigDict)):
            _merge(base[k], v, f"{where}.{k}")
        else:
            base[k] = v


def _to_dict(x) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _copy(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(c.to_dict())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_json(c) -> dict:
    """The config as config.json holds it (tuples as lists), flattened to dotted keys."""
    return _flatten(json.loads(c.to_json_best_effort(sort_keys=True)))


_DERIVE_KEYS = {"same_active": {"derive", "from_arm", "num_experts", "top_k", "every"},
                "same_total": {"derive", "from_arm"}}


def arm_configs(cmp) -> dict[str, ml_collections.ConfigDict]:
    """Resolve every arm in cmp.arm_names into a full, validated config (steps not yet set)."""
    names = [n.strip() for n in str(cmp.arm_names).split(",") if n.strip()]
    if not names:
        raise config_lib.ConfigError("config.arm_names: no arms to compare")
    if len(set(names)) != len(names):
        raise config_lib.ConfigError(f"config.arm_names: an arm is listed twice in {names}")
    resolved: dict[str, ml_collections.ConfigDict] = {}
    resolving: list[str] = []

    def resolve(name):
        if name in resolved:
            return resolved[name]
        if name not in cmp.arms:
            raise config_lib.ConfigError(f"config.arm_names: arm {name!r} is not defined in config.arms "
                                         f"(defined: {sorted(cmp.arms.keys())})")
        if name in resolving:
            raise config_lib.ConfigError(f"config.arms.{name}: derived arms form a cycle {resolving + [name]}")
        resolving.append(name)
        spec = _to_dict(cmp.arms[name])
        derive = spec.get("derive")
        if derive is not None:
            if derive not in _DERIVE_KEYS:
                raise config_lib.ConfigError(f"config.arms.{name}.derive: unknown {derive!r}; use 'same_active' or "
                                             "'same_total'")
            extra = set(spec) - _DERIVE_KEYS[derive]
            if extra:
                raise config_lib.ConfigError(f"config.arms.{name}: unknown keys {sorted(extra)} for derive="
                                             f"{derive!r}; allowed: {sorted(_DERIVE_KEYS[derive])}")
            if "from_arm" not in spec:
                raise config_lib.ConfigError(f"config.arms.{name}.from_arm: a derived arm needs the arm it is "
                                             "derived from")
        if derive is None:
            c = _copy(cmp.base)
            _merge(c, spec, f"config.arms.{name}")
        elif derive == "same_active":
            src = resolve(spec["from_arm"])
            if src.moe.num_experts:
                raise config_lib.ConfigError(f"config.arms.{name}.from_arm: 'same_active' derives an MoE from a "
                                             f"dense arm; {spec['from_arm']!r} is already MoE")
            c = _copy(src)
            c.moe.num_experts = int(spec.get("num_experts", 8))
            c.moe.top_k = int(spec.get("top_k", 2))
            c.moe.every = int(spec.get("every", 1))
            if c.model.d_ff % c.moe.top_k:
                raise config_lib.ConfigError(f"config.arms.{name}: dense d_ff {c.model.d_ff} of "
                                             f"{spec['from_arm']!r} is not divisible by top_k {c.moe.top_k}")
            c.moe.d_ff = c.model.d_ff // c.moe.top_k
        else:  # same_total
            src = resolve(spec["from_arm"])
            c = _copy(src)
            n = src.model.n_layers
            n_moe = sum(config_lib.is_moe_layer(src, i) for i in range(n))
            ffn_total = n_moe * src.moe.num_experts * src.moe.d_ff + (n - n_moe) * src.model.d_ff
            c.model.d_ff = int(round(ffn_total / n))
            c.moe.num_experts = 0
        c.name = name
        config_lib.validate(c)
        resolving.pop()
        resolved[name] = c
        return c

    arms = {n: resolve(n) for n in names}
    check_same_data(arms)
    return arms


def check_same_data(arms: dict) -> None:
    """Every arm must see the same tokenizer, validation windows and training-token order."""
    flat = {n: _config_json(c) for n, c in arms.items()}
    first = next(iter(flat))
    keys = [k for k in flat[first] if k.startswith("data.")] + list(SHARED_FIELDS)
    for n, f in flat.items():
        for k in keys:
            if f.get(k) != flat[first].get(k):
                raise config_lib.ConfigError(
                    f"config.arms.{n}: {k} = {f.get(k)!r} differs from arm {first!r} ({flat[first].get(k)!r}); all "
                    "arms must share the data section, vocab_size, seq_len, batch_size and eval_batches so that "
                    "they see the same tokenizer, validation windows and training-token order")


def plan(cmp) -> dict[str, dict]:
    """Steps per arm so every arm spends the same training FLOPs. Returns name -> {config, steps, flops...}."""
    arms = arm_configs(cmp)
    per_step = {n: flops.flops_per_step(c) for n, c in arms.items()}
    budget = float(cmp.budget.flops)
    if budget <= 0:
        ref = cmp.budget.reference_arm
        if ref not in arms:
            raise config_lib.ConfigError(f"config.budget.reference_arm: {ref!r} is not one of {list(arms)}")
        if int(cmp.budget.reference_steps) < 1:
            raise config_lib.ConfigError("config.budget: set flops > 0 or reference_steps >= 1")
        budget = per_step[ref] * int(cmp.budget.reference_steps)
    num_evals = int(cmp.get("num_evals", 0))
    out = {}
    for n, c in arms.items():
        steps = max(1, int(round(budget / per_step[n])))
        c.train.steps = steps
        if num_evals > 0:
            c.train.eval_every = max(1, math.ceil(steps / num_evals))
        config_lib.validate(c)
        t = c.train
        fpt = flops.flops_per_token(c)
        out[n] = {"config": c, "steps": steps, "budget": budget, "flops_per_token": fpt,
                  "tokens_per_step": t.batch_size * t.grad_accum * t.seq_len, "flops_per_step": per_step[n],
                  "training_flops": steps * per_step[n],
                  "padding_flops": steps * fpt["dispatch_overhead_training"] * t.batch_size * t.grad_accum * t.seq_len,
                  "params": flops.param_counts(c)}
    return out


def run_dir(workdir: str, arm: str, seed) -> str:
    return os.path.join(workdir, arm, f"seed{seed}")


def check_run_dir(config, rdir: str) -> None:
    """Refuse a run dir whose config.json differs from `config` (resuming it would mix two experiments)."""
    path = os.path.join(rdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = _flatten(json.load(f))
    config = config.copy_and_resolve_references()
    precision.resolve(config)  # config.json holds model.dtype/attention resolved for the backend ('auto' -> ...)
    new = _config_json(config)
    diff = sorted(k for k in set(old) | set(new) if k not in RERUN_IGNORED and old.get(k) != new.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise config_lib.ConfigError(f"{rdir} was started with a different config ({shown}"
                                     f"{', ...' if len(diff) > 6 else ''}); use a new --workdir or delete that run")


def run_one(config, rdir: str, devices=None) -> dict:
    """Train one arm/seed unless its summary says it finished; returns the summary with 'skipped'."""
    from moe_jax import trainer

    check_run_dir(config, rdir)
    summary_path = os.path.join(rdir, trainer.SUMMARY_FILE)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("finished") and summary.get("step") == config.train.steps:
            return summary | {"skipped": True}
    ckpt_dir = os.path.join(rdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
        # killed before its first checkpoint: it starts over, so drop the records of the lost attempt
        metrics_lib.truncate_after(rdir, 0)
    return trainer.train(config, rdir, devices=devices) | {"skipped": False}


def _median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(xs)) if xs else None


def record(arm: str, seed, p: dict, summary: dict, rdir: str) -> dict:
    """One run's result: the summary plus numbers recomputed from its metrics.jsonl."""
    records = metrics_lib.read(rdir)
    log_every = p["config"].train.log_every
    train_recs = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    final = evals[-1] if evals else {}
    # Throughput: median over whole logging intervals after the first (the first holds warm-up; a last, partial
    # interval right before the final evaluation is timed from a pipelined fetch and is not representative).
    full = [r for r in train_recs if r["step"] % log_every == 0 and r["step"] > log_every] or train_recs
    dropped = [r["moe/dropped_fraction_mean"] for r in train_recs if "moe/dropped_fraction_mean" in r]
    step = int(summary["step"])
    return {
        "arm": arm, "seed": int(seed), "run_dir": rdir, "steps": step, "tokens": int(summary["tokens"]),
        "training_flops": step * p["flops_per_step"],
        "padding_flops": step * p["tokens_per_step"] * p["flops_per_token"]["dispatch_overhead_training"],
        "params_total": p["params"]["total"], "params_active": p["params"]["active"],
        **{k: summary.get(k, final.get(k)) for k in ("val_loss", "val_accuracy", "val_perplexity")},
        "wall_time": summary.get("wall_time"),
        "tokens_per_s": _median(r.get("tokens_per_s") for r in full),
        "mfu": _median(r.get("mfu") for r in full),
        "dropped_fraction": float(np.mean(dropped)) if dropped else 0.0,
        "skipped": bool(summary.get("skipped", False)),
        "curve": [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"], "wall_time": r["wall_time"],
                   "training_flops": r["step"] * p["flops_per_step"]} for r in evals],
        "throughput_curve": [{"step": r["step"], "wall_time": r["wall_time"], "tokens_per_s": r["tokens_per_s"]}
                             for r in train_recs],
    }


def stats(values) -> dict:
    """mean, sample standard deviation (n - 1; 0 for one value), min, max, n."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate(runs: list[dict]) -> dict[str, dict]:
    arms: dict[str, dict] = {}
    for r in runs:
        arms.setdefault(r["arm"], {"runs": []})["runs"].append(r)
    for a in arms.values():
        for key, *_ in REPORT_FIELDS:
            a[key] = stats([r[key] for r in a["runs"]])
    return arms


def verdict(arms: dict[str, dict], metric: str = "val_loss") -> list[str]:
    """Pairwise: is the difference of the means larger than the seed-to-seed spread? Yes when it exceeds twice its
    standard error (Welch: sqrt(s_a^2/n_a + s_b^2/n_b)) and the two arms' [min, max] ranges over seeds do not
    overlap."""
    names = list(arms)
    lines = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            na, nb = names[i], names[j]
            a, b = arms[na][metric], arms[nb][metric]
            if a["mean"] is None or b["mean"] is None:
                continue
            diff = a["mean"] - b["mean"]
            lower, higher = (na, nb) if diff < 0 else (nb, na)
            head = (f"- {na} {a['mean']:.4f} ± {a['std']:.4f} vs {nb} {b['mean']:.4f} ± {b['std']:.4f} "
                    f"({metric}, mean ± std over {a['n']} and {b['n']} seeds): difference {abs(diff):.4f}")
            if min(a["n"], b["n"]) < 2:
                lines.append(head + "; fewer than 2 seeds in an arm, so the seed-to-seed spread is unknown: "
                                    "no verdict.")
                continue
            se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
            overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
            larger = abs(diff) > 2 * se and not overlap
            lines.append(head + f", {'>' if abs(diff) > 2 * se else '<='} 2 x its standard error ({2 * se:.4f}); "
                         f"seed ranges [{a['min']:.4f}, {a['max']:.4f}] and [{b['min']:.4f}, {b['max']:.4f}] "
                         f"{'overlap' if overlap else 'do not overlap'}. "
                         + (f"**The difference is larger than the seed-to-seed spread: {lower} is better** "
                            f"(lower {metric}) at this budget." if larger else
                            "The difference is **not** larger than the seed-to-seed spread: no winner at this "
                            "budget and number of seeds."))
    return lines


def fmt_stats(s: dict, fmt: str, varies: bool = True) -> str:
    if s["mean"] is None:
        return "n/a"
    if not varies and s["min"] == s["max"]:
        return fmt.format(s["mean"])
    if s["n"] > 1:
        return f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"
    return fmt.format(s["mean"])


def _arm_shape(c) -> str:
    m, moe = c.model, c.moe
    s = f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}, "
    n_moe = sum(config_lib.is_moe_layer(c, i) for i in range(m.n_layers))
    if n_moe:
        s += (f"{moe.num_experts} experts (d_ff {moe.d_ff}) top-{moe.top_k} in {n_moe} of {m.n_layers} layers"
              + (f", dense d_ff {m.d_ff} in the others" if n_moe < m.n_layers else "")
              + (", dropless dispatch" if moe.dispatch == "dropless" else f", capacity factor {moe.capacity_factor}"))
    else:
        s += f"dense FFN d_ff {m.d_ff}"
    t = c.train
    return s + f"; batch {t.batch_size} x accum {t.grad_accum} x seq {t.seq_len}, {c.optim.name}"


def environment() -> dict:
    import jax
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "cpu_count": os.cpu_count()}


def routing_section(workdir: str, cmp, planned: dict) -> list[str]:
    """Report lines pointing each MoE arm's runs at their routing diagnostics (moe_jax.routing): a link to
    <run>/routing/routing.json when it was written, else the command that writes it. None for dense-only studies."""
    moe_arms = [n for n, p in planned.items() if p["config"].moe.num_experts]
    if not moe_arms:
        return []
    lines = ["## Routing", "", "Per-layer loads, drops at the eval and train capacity, router confidence and expert "
             "specialisation of each MoE run (`python -m moe_jax.routing`; README: Inside the router):", ""]
    for n in moe_arms:
        for seed in cmp.seeds:
            rdir = run_dir(workdir, n, seed)
            rel = os.path.relpath(rdir, workdir)
            if os.path.exists(os.path.join(rdir, "routing", "routing.json")):
                lines.append(f"- {n} seed {seed}: [routing.json]({rel}/routing/routing.json), "
                             f"[load heatmap]({rel}/routing/load_heatmap.png), "
                             f"[specialisation]({rel}/routing/specialisation.txt)")
            else:
                lines.append(f"- {n} seed {seed}: `python -m moe_jax.routing --workdir {rdir}` writes {rel}/routing/")
    return lines + [""]


def write_report(workdir: str, cmp, planned: dict, runs: list[dict], command: str, env: dict | None = None) -> dict:
    arms = aggregate(runs)
    budget = next(iter(planned.values()))["budget"]
    env = env or environment()
    os.makedirs(workdir, exist_ok=True)
    lines = [f"# FLOP-matched comparison: {' vs '.join(arms)}", "",
             f"Command: `{command}`", "",
             f"Machine: {env['device_count']} x {env['device_kind']} ({env['platform']}, {env['cpu_count']} CPU "
             f"cores), jax {env['jax']}.", "",
             f"Seeds: {[int(s) for s in cmp.seeds]} (model init and dropout). Data seed "
             f"{next(iter(planned.values()))['config'].data.shuffle_seed}: every arm and seed sees the same "
             "tokenizer, validation windows and training-token order. "
             f"Budget: **{budget:.4e} training FLOPs per run**.", "",
             "## Arms", ""]
    for n, p in planned.items():
        lines.append(f"- **{n}**: {_arm_shape(p['config'])}")
    lines += ["", "## Budget", "", FORMULA, "",
              "| arm | training FLOPs/token | tokens/step | FLOPs/step | steps | training FLOPs | vs budget | "
              "training tokens | padding+dispatch FLOPs/token (not counted) | padding+dispatch FLOPs/run (not "
              "counted) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, p in planned.items():
        lines.append(f"| {n} | {p['flops_per_token']['training']:.6e} | {p['tokens_per_step']:,} | "
                     f"{p['flops_per_step']:.6e} | {p['steps']:,} | {p['training_flops']:.6e} | "
                     f"{p['training_flops'] / budget - 1:+.3%} | {p['steps'] * p['tokens_per_step']:,} | "
                     f"{p['flops_per_token']['dispatch_overhead_training']:.4e} | {p['padding_flops']:.4e} |")
    lines += ["", "## Results (mean ± sample std [min, max] over seeds; single values are the same for every seed)",
              "", "| " + " | ".join(["arm", "runs"] + [label for _, label, *_ in REPORT_FIELDS]) + " |",
              "|" + "---|" * (len(REPORT_FIELDS) + 2)]
    for n, a in arms.items():
        lines.append("| " + " | ".join([n, str(len(a["runs"]))]
                                       + [fmt_stats(a[k], fmt, varies) for k, _, fmt, varies in REPORT_FIELDS])
                     + " |")
    lines += ["", "Validation numbers are at the last step over the fixed validation windows. Wall time is the "
              "training loop (steps, evaluations, checkpoints; setup and compilation excluded). tokens/s and MFU are "
              "the median over logging intervals (MFU against the measured matmul peak on CPU, the device table "
              "otherwise; training FLOPs only). The dropped-token fraction is the mean over logged training steps "
              "(0 for dense arms).", "", "## Verdict", ""] + verdict(arms)
    lines += ["", "## Plots", "", "![val loss vs training FLOPs](plots/val_loss_vs_flops.png)", "",
              "![val loss vs wall time](plots/val_loss_vs_wall_time.png)", "",
              "![throughput per arm](plots/throughput.png)", ""]
    lines += routing_section(workdir, cmp, planned)
    with open(os.path.join(workdir, REPORT_FILE) + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(os.path.join(workdir, REPORT_FILE) + ".tmp", os.path.join(workdir, REPORT_FILE))
    results = {"command": command, "environment": env, "budget_flops": budget, "formula": FORMULA,
               "seeds": [int(s) for s in cmp.seeds],
               "plan": {n: {**{k: v for k, v in p.items() if k != "config"}, "config": p["config"].to_dict()}
                        for n, p in planned.items()},
               "runs": runs,
               "arms": {n: {k: v for k, v in a.items() if k != "runs"} for n, a in arms.items()}}
    metrics_lib.write_json(workdir, RESULTS_FILE, results)
    plot(workdir, runs)
    return results


def plot(workdir: str, runs: list[dict]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(arms)}
    markers = "osD^v<>"
    written = []
    for x, label, fname in (("training_flops", "training FLOPs", "val_loss_vs_flops.png"),
                            ("wall_time", "wall time (s)", "val_loss_vs_wall_time.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for r in runs:
            seeds = [q["seed"] for q in runs if q["arm"] == r["arm"]]
            ax.plot([q[x] for q in r["curve"]], [q["val_loss"] for q in r["curve"]],
                    marker=markers[seeds.index(r["seed"]) % len(markers)], color=colors[r["arm"]], alpha=0.75,
                    label=f"{r['arm']} seed {r['seed']}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.set_title(f"validation loss vs {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=100)
        plt.close(fig)
        written.append(os.path.join(out, fname))
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, a in enumerate(arms):
        vals = [r["tokens_per_s"] for r in runs if r["arm"] == a and r["tokens_per_s"]]
        if not vals:
            continue
        ax.bar(i, statistics.fmean(vals), color=colors[a], alpha=0.6,
               yerr=statistics.stdev(vals) if len(vals) > 1 else 0, capsize=4)
        ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("training tokens / s")
    ax.set_title("throughput per arm (bar: mean ± std; dots: seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput.png"), dpi=100)
    plt.close(fig)
    written.append(os.path.join(out, "throughput.png"))
    return written


def describe_plan(planned: dict) -> list[str]:
    budget = next(iter(planned.values()))["budget"]
    lines = [f"budget: {budget:.6e} training FLOPs per run", f"formula: {FORMULA}"]
    for n, p in planned.items():
        lines.append(f"arm {n}: {p['flops_per_token']['training']:.6e} training FLOPs/token x "
                     f"{p['tokens_per_step']:,} tokens/step = {p['flops_per_step']:.6e} FLOPs/step -> {p['steps']:,} "
                     f"steps = {p['training_flops']:.6e} FLOPs ({p['training_flops'] / budget - 1:+.3%} vs budget), "
                     f"{p['steps'] * p['tokens_per_step']:,} tokens; params {p['params']['total']:,} total, "
                     f"{p['params']['active']:,} active; capacity padding+dispatch "
                     f"{p['flops_per_token']['dispatch_overhead_training']:.4e} FLOPs/token (not counted)")
    return lines


def run(cmp, workdir: str, command: str = "", devices=None) -> dict:
    """Plan, train every arm x seed (skipping finished runs, resuming unfinished ones), and write the report."""
    planned = plan(cmp)
    if len(list(cmp.seeds)) < 1:
        raise config_lib.ConfigError("config.seeds: give at least one seed (>= 3 for a real comparison)")
    for line in describe_plan(planned):
        print(line, flush=True)
    runs = []
    for n, p in planned.items():
        for seed in cmp.seeds:
            c = _copy(p["config"])
            c.seed = int(seed)
            rdir = run_dir(workdir, n, seed)
            summary = run_one(c, rdir, devices=devices)
            print(f"{n} seed {seed}: {'skipped (finished)' if summary['skipped'] else 'trained'}; "
                  f"val_loss {summary.get('val_loss')}", flush=True)
            runs.append(record(n, seed, p, summary, rdir))
    results = write_report(workdir, cmp, planned, runs, command or " ".join(sys.argv))
    print(f"report: {os.path.join(workdir, REPORT_FILE)}", flush=True)
    return results


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program (see moe_jax/cli.py)."""
    from absl import flags

    from moe_jax import cli

    cli.config_flag(help_text="A comparison config, e.g. configs/compare.py; override its fields with "
                    "--config.x.y=value.")
    flags.DEFINE_string("workdir", "runs/compare", "Directory of the comparison (one sub-directory per run).")


def main(argv):
    from absl import flags, logging

    from moe_jax import cli

    cli.no_arguments(argv)
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run(FLAGS.config, FLAGS.workdir, " ".join(["python -m moe_jax.compare"] + sys.argv[1:]))  # ConfigError: 2


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags)
