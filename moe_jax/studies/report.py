"""A study's results: one record per run, learning-rate selection on the validation split, per-arm statistics,
verdicts, a ranking with intervals, per-layer routing, report.md (linking the figures of plots.py) and results.json.

Selection and reporting. For an arm with a learning-rate grid, the learning rate whose runs have the lowest mean
final *validation* loss over the replicates is selected; only the selected runs are evaluated on the *test* split,
once each, and the tables, verdicts and ranking read that test loss. Arms without a grid have all runs selected.
With no test split (data.test_fraction = 0, no grid) the report reads the validation loss and says so.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from moe_jax.model import flops
from moe_jax.train import metrics as metrics_lib
from moe_jax.studies import budget as budget_lib
from moe_jax.studies import plan as plan_lib
from moe_jax.studies import plots as plots_lib
from moe_jax.studies import stats

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
ENVIRONMENT_FILE = "environment.json"  # in a settled study run dir (runner.settle): the machine that finished it
ROUTING_KEYS = (("moe/dropped_fraction", "dropped fraction"), ("moe/load_cv", "load CV"),
                ("moe/router_confidence", "router confidence"), ("moe/router_entropy", "router entropy (nats)"))


def fields(split: str) -> tuple:
    """(key, column label, format, varies with the replicate) of the results table."""
    head = (("params_total", "parameters", "{:,.0f}", False),
            ("params_active", "active parameters", "{:,.0f}", False),
            ("steps", "steps", "{:,.0f}", False),
            ("tokens", "training tokens", "{:,.0f}", False),
            ("model_flops", "model FLOPs", "{:.4e}", False),
            ("executed_flops", "executed FLOPs", "{:.4e}", False))
    test = (("test_loss", "test loss", "{:.4f}", True), ("test_accuracy", "test accuracy", "{:.4f}", True)) \
        if split == "test" else ()
    tail = (("val_loss", "val loss", "{:.4f}", True),
            ("val_accuracy", "val accuracy", "{:.4f}", True),
            ("val_perplexity", "val perplexity", "{:.2f}", True),
            ("wall_time", "wall seconds", "{:.1f}", True),
            ("tokens_per_s", "tokens/s", "{:,.0f}", True),
            ("mfu", "MFU", "{:.4f}", True),
            ("dropped_fraction", "dropped-token fraction", "{:.4f}", True))
    return head + test + tail


def metric_key(split: str) -> str:
    return "test_loss" if split == "test" else "val_loss"


def _median(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(xs)) if xs else None


def record(run: plan_lib.Run, summary: dict) -> dict:
    """One run's result: the summary plus numbers recomputed from its metrics.jsonl (compact curves included)."""
    c = run.config
    records = metrics_lib.read(run.run_dir)
    log_every = c.train.log_every
    train_recs = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    final = evals[-1] if evals else {}
    # Throughput: median over whole logging intervals after the first (the first holds warm-up).
    full = [r for r in train_recs if r["step"] % log_every == 0 and r["step"] > log_every] or train_recs
    dropped = [r["moe/dropped_fraction_mean"] for r in train_recs if "moe/dropped_fraction_mean" in r]
    routing = {}
    for key, _ in ROUTING_KEYS:
        per_layer = [r[key] for r in train_recs if isinstance(r.get(key), list)]
        if per_layer:
            routing[key] = [float(v) for v in np.mean(np.asarray(per_layer, dtype=float), axis=0)]
    step = int(summary["step"])
    per_model = flops.flops_per_step(c)
    per_exec = flops.executed_flops_per_step(c)
    p = flops.param_counts(c.model)
    return {
        "kind": run.kind, "arm": run.arm, "lr": run.lr, "label": run.label, "seed": run.seed, "order": run.order,
        "replicate": run.replicate, "run_dir": run.run_dir, "steps": step, "tokens": int(summary["tokens"]),
        "model_flops": step * per_model, "executed_flops": step * per_exec,
        "optimizer_flops": step * flops.optimizer_flops_per_step(c.model, c.optim),
        "params_total": p["total"], "params_active": p["active"],
        **{k: summary.get(k, final.get(k)) for k in ("val_loss", "val_accuracy", "val_perplexity")},
        "wall_time": summary.get("wall_time"),
        "tokens_per_s": _median(r.get("tokens_per_s") for r in full),
        "mfu": _median(r.get("mfu") for r in full),
        "dropped_fraction": float(np.mean(dropped)) if dropped else 0.0,
        "routing": routing,
        "machine": run_machine(run.run_dir),
        "skipped": bool(summary.get("skipped", False)),
        "selected": True,
        "curve": [{"step": r["step"], "tokens": r["tokens"], "val_loss": round(float(r["val_loss"]), 6),
                   "wall_time": round(float(r["wall_time"]), 3), "model_flops": r["step"] * per_model,
                   "executed_flops": r["step"] * per_exec} for r in evals],
    }


def run_machine(rdir: str) -> str | None:
    """'<CPU model> / <device kind>' of the machine that finished the run (its environment.json, runner.settle), or
    None for a run settled before the file existed."""
    path = os.path.join(rdir, ENVIRONMENT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        env = json.load(f)
    return f"{env['cpu']} / {env['device_kind']}"


def machines_line(records: list[dict]) -> list[str]:
    """The report's sentence when the runs were finished on more than one machine (a study resumed elsewhere), else
    nothing: a rerun is bit-identical only on the machine that ran it, and speeds compare only within one."""
    count: dict = {}
    for r in records:
        if r.get("machine"):
            count[r["machine"]] = count.get(r["machine"], 0) + 1
    if len(count) < 2:
        return []
    return [f"Runs were finished on {len(count)} machines: " + "; ".join(f"{m} ({n} runs)" for m, n in count.items())
            + " (each run's `machine` in results.json). A rerun reproduces a run bit for bit only on its own "
            "machine's CPU, and wall seconds and tokens/s compare only between runs of one machine.", ""]


def select_lrs(planned: dict, records: list[dict]) -> dict:
    """Per budget and arm with a grid: the learning rate of lowest mean final validation loss over the selection
    replicates (plan's select_replicates; the other replicates run only the chosen rate, so they cannot move the
    choice) and its status: 'bracketed' (grid values on both sides) or 'edge' (the lowest or highest value: the
    runner extends the grid while lr_extend allows, plan.extended; one left at the edge has its verdicts withheld).
    An lr_from arm takes its source's choice and status. Marks the records of every other rate as not selected.
    Returns {kind: {arm: {lr, status, grid: {lr: summary}, initial, extensions, from}}}."""
    sel_keys = set(planned["replicate_keys"][:planned["select_replicates"]])
    out: dict = {}
    for kind in planned["kinds"]:
        out[kind] = {}
        for arm, grid in planned["kind_grids"][kind].items():
            if not grid:
                continue
            table = {lr: stats.summary(r["val_loss"] for r in records if r["kind"] == kind and r["arm"] == arm
                                       and r["lr"] == lr and r["replicate"] in sel_keys) for lr in grid}
            best = min(grid, key=lambda lr: (table[lr]["mean"] if table[lr]["mean"] is not None else math.inf))
            inside = min(grid) < best < max(grid)
            out[kind][arm] = {"lr": best, "status": "bracketed" if inside else "edge",
                              "grid": {f"{lr:g}": table[lr] for lr in grid}, "initial": planned["grids"][arm],
                              "extensions": len(grid) - len(planned["grids"][arm]), "from": None}
        for arm, src in planned["lr"]["from"].items():
            if src in out[kind]:
                out[kind][arm] = {**out[kind][src], "grid": {}, "from": src}
        for r in records:
            if r["kind"] == kind and r["arm"] in out[kind]:
                r["selected"] = r["lr"] == out[kind][r["arm"]]["lr"]
    return out


def aggregate(records: list[dict], split: str) -> dict[str, dict]:
    """arm -> {runs, <field>: stats.summary} over the selected runs of one budget."""
    arms: dict[str, dict] = {}
    for r in records:
        if r["selected"]:
            arms.setdefault(r["arm"], {"runs": []})["runs"].append(r)
    for a in arms.values():
        for key, *_ in fields(split):
            a[key] = stats.summary([r.get(key) for r in a["runs"]])
    return arms


def fmt_stats(s: dict, fmt: str, varies: bool = True) -> str:
    if s["mean"] is None:
        return "n/a"
    if not varies and s["min"] == s["max"]:
        return fmt.format(s["mean"])
    if s["n"] > 1:
        return f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"
    return fmt.format(s["mean"])


def by_replicate(arm: dict, key: str) -> dict:
    return {r["replicate"]: r.get(key) for r in arm["runs"] if r.get(key) is not None}


def docs_key(key: str) -> str:
    """The record field of a metric's per-document losses: test_loss -> test_documents."""
    return key.replace("_loss", "_documents")


def resamples(records: list[dict], key: str, seed: int = stats.BOOTSTRAP_SEED):
    """The study's document resamples (stats.resample_counts) for the split of `key`, drawn once and shared by
    every interval of the study; None when no run has per-document losses."""
    docs = next((r[docs_key(key)] for r in records if r.get(docs_key(key))), None)
    return None if docs is None else stats.resample_counts(len(docs["doc_ids"]), seed=seed)


def comparisons(study, names: list[str]) -> list[tuple[str, str]]:
    """The comparisons a study draws (study.comparisons): 'pairwise' (default: every pair, in arm order) or
    'reference' (every arm against the first: planned comparisons, a smaller family)."""
    mode = str(study.get("comparisons", "pairwise"))
    if mode == "pairwise":
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    if mode == "reference":
        return [(n, names[0]) for n in names[1:]]
    raise plan_lib.config_lib.ConfigError(f"config.comparisons: 'pairwise' or 'reference', got {mode!r}")


def withheld_arms(selected: dict) -> dict:
    """{arm: reason} for the arms of one budget whose learning rate stayed on its grid's edge."""
    out = {}
    for arm, s in selected.items():
        if s["status"] == "edge":
            grid = ", ".join(s["grid"]) or ", ".join(f"{v:g}" for v in s["initial"] or ())
            out[arm] = (f"{arm}'s learning rate {s['lr']:g} is on the edge of its grid" +
                        (f" ({s['from']}'s, whose rate it runs)" if s["from"] else f" {{{grid}}}") +
                        f" after {s['extensions']} extension(s)")
    return out


def verdicts(arms: dict, key: str, pairs, counts=None, withheld: dict | None = None) -> list[dict]:
    """One stats.verdict per comparison (x - y) whose arms both ran, with the per-document bootstrap when the runs
    carry per-document losses; not yet Holm-adjusted (the family is the whole study: `write`)."""
    dk, withheld = docs_key(key), withheld or {}
    return [stats.verdict(a, by_replicate(arms[a], key), b, by_replicate(arms[b], key), key.replace("_", " "),
                          withheld=withheld.get(a) or withheld.get(b), x_docs=by_replicate(arms[a], dk),
                          y_docs=by_replicate(arms[b], dk), counts=counts)
            for a, b in pairs if a in arms and b in arms]


def ranking(arms: dict, key: str, counts=None) -> list[dict]:
    """Arms by mean `key` (lower first), each with the interval of its mean and its difference from the first arm
    listed (stats.mean_interval, stats.difference: replicate + document variance where known)."""
    names = list(arms)
    ref, dk = names[0], docs_key(key)
    rows = []
    for n in names:
        x, x_docs = by_replicate(arms[n], key), by_replicate(arms[n], dk)
        d = (stats.difference(x, by_replicate(arms[ref], key), x_docs=x_docs, y_docs=by_replicate(arms[ref], dk),
                              counts=counts) if n != ref else None)
        rows.append({"arm": n, **arms[n][key], "interval": stats.mean_interval(x, x_docs=x_docs, counts=counts),
                     "vs": ref, "diff": d})
    return sorted(rows, key=lambda r: (r["mean"] is None, r["mean"] if r["mean"] is not None else 0.0))


BASELINES = ("unigram", "bigram")


def versus_baselines(arms: dict, key: str, baselines: dict | None, counts=None) -> dict:
    """{arm: {baseline: stats.difference(arm - baseline)}}: the baseline's loss and per-document losses stand for
    every replicate (it has no seed), so the difference is paired and its variance is the arm's replicate variance
    plus the document bootstrap of (arm - baseline). Empty without baselines."""
    if not baselines:
        return {}
    dk = docs_key(key)
    out = {}
    for n, a in arms.items():
        x, x_docs = by_replicate(a, key), by_replicate(a, dk)
        docs = baselines.get("documents") or {}
        out[n] = {b: stats.difference(x, {k: baselines[b] for k in x}, x_docs=x_docs,
                                      y_docs={k: docs.get(b) for k in x}, counts=counts)
                  for b in BASELINES}
    return out


def beats_bigram(rows: dict) -> dict:
    """{arm: whether the upper end of its interval of (arm - bigram) is below 0}."""
    return {n: v["bigram"]["hi"] is not None and v["bigram"]["hi"] < 0 for n, v in rows.items()}


def _arm_shape(c) -> str:
    m, moe = c.model, c.moe
    s = f"d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, vocab {m.vocab_size}, "
    n_moe = sum(plan_lib.config_lib.is_moe_layer(c, i) for i in range(m.n_layers))
    if n_moe:
        s += (f"{moe.num_experts} experts (d_ff {moe.d_ff}) top-{moe.top_k} in {n_moe} of {m.n_layers} layers"
              + (f", dense d_ff {m.d_ff} in the others" if n_moe < m.n_layers else "")
              + f", capacity factor {moe.capacity_factor}")
    else:
        s += f"dense FFN d_ff {m.d_ff}"
    t, o = c.train, c.optim
    lr = f"Muon lr {o.muon_lr:g}, AdamW lr {o.adamw_lr:g}" if o.name == "muon" else f"AdamW lr {o.adamw_lr:g}"
    return s + f"; dropout {m.dropout:g}; batch {t.batch_size} x accum {t.grad_accum} x seq {t.seq_len}; {lr}"


def randomness(study, planned: dict) -> str:
    """What the seeds vary, in words (dropout and router noise named only when they are on in some arm)."""
    arms = planned["arms"].values()
    what = ["model initialisation"]
    if any(c.model.dropout > 0 for c in arms):
        what.append("dropout")
    if any(c.moe.num_experts and c.moe.router_noise_std > 0 for c in arms):
        what.append("router noise")
    seeds = [int(s) for s in study.seeds]
    orders = study.get("data_orders", "paired")
    if orders == "paired":
        return (f"Seeds {seeds}: replicate k uses seed k for the {' and '.join(what)} **and** the training-document "
                "order (data.shuffle_seed = k); arms share replicates, so differences between arms are paired.")
    orders = [int(o) for o in orders]
    if len(orders) == 1:
        return (f"Seeds {seeds} vary the {' and '.join(what)} only; the training-document order is fixed (shuffle "
                f"seed {orders[0]}) for every run, so the spread below does not include data-order variation.")
    return (f"Seeds {seeds} (the {' and '.join(what)}) crossed with data orders {orders} (shuffle seeds): "
            f"{len(seeds) * len(orders)} replicates per arm, paired across arms.")


def evaluation(c, split: str, tokens: dict | None = None) -> str:
    """The report's sentence on what was scored; `tokens` (scored_tokens): the runs were scored on whole splits."""
    d, t = c.data, c.train
    if d.max_val_windows == 0 and t.eval_batches == 0:
        cover = "every window of the split (the whole split)"
    elif d.val_window_sampling == "even":
        cover = f"{d.max_val_windows} windows spread evenly over the split"
    else:
        cover = f"the first {d.max_val_windows} windows of the split (not spread over it)"
    if t.eval_batches:
        cover += f", of which the first {t.eval_batches} batches of {t.batch_size} windows during training"
    split_docs = (f"validation {d.val_fraction:g} and test {d.test_fraction:g} of the documents, hash-chosen whole "
                  "documents never trained on" if d.test_fraction > 0 else
                  f"validation {d.val_fraction:g} of the documents (hash-chosen whole documents never trained on); "
                  "no test split")
    read = ("learning rates and any setting are chosen on validation; the tables read the **test** split, evaluated "
            "once per selected run" if split == "test" else
            "the tables read the **validation** split (no setting was chosen on it)")
    if tokens:
        counts = " and ".join(f"{n:,} {s} tokens" for s, n in tokens.items())
        return (f"Evaluation: every run's final checkpoint on the whole split, every target token exactly once "
                f"({counts}, the same for every arm), each arm at its own sequence length; the curves during "
                f"training read {cover}. Split: {split_docs}; {read}. Losses are at the last step, not the best "
                "step.")
    return f"Evaluation: {cover}. Split: {split_docs}; {read}. Losses are at the last step, not the best step."


TOKEN_KEYS = (("validation", "val_tokens"), ("test", "test_tokens"))


def scored_tokens(records: list[dict]) -> dict:
    """{split: the target tokens the runs were scored on} from the runs' val_tokens (every run) and test_tokens
    (the selected runs), for the splits whose runs carry a count (none: results written before counts were kept).
    ValueError (one line) when the counts of one split differ or some runs lack one: their arms were not scored on
    the same tokens."""
    out = {}
    for split, key in TOKEN_KEYS:
        runs = [r for r in records if split == "validation" or r["selected"]]
        counts = {r["run_dir"]: r.get(key) for r in runs}
        if all(v is None for v in counts.values()):
            continue
        if None in counts.values() or len(set(counts.values())) > 1:
            raise ValueError(f"the runs were scored on different {split} tokens ({key} by run: {counts}); every arm "
                             f"must score the whole split (studies.runner.evaluate_split)")
        out[split] = int(next(iter(counts.values())))
    return out


def baseline_summary(base: dict, split: str) -> dict:
    """baselines.evaluate's result as results.json keeps it: {split, tokens, unigram, bigram (nats per token),
    lambda, smoothing, documents: {unigram, bigram: {'tokens', 'loss_sum', 'doc_ids'} as lists}} (the per-document
    losses serve the paired bootstrap of arm - baseline)."""
    docs = {b: {k: np.asarray(v).tolist() for k, v in base[b]["documents"].items()} for b in BASELINES}
    return {"split": split, "tokens": base["bigram"]["tokens"], "unigram": base["unigram"]["loss"],
            "bigram": base["bigram"]["loss"], "lambda": base["lambda"], "smoothing": base["smoothing"],
            "documents": docs}


def check_baselines(baselines: dict, tokens: dict) -> None:
    """ValueError (one line) unless the baselines were scored on as many tokens as the runs on that split."""
    if baselines["tokens"] != tokens.get(baselines["split"]):
        raise ValueError(f"the baselines scored {baselines['tokens']} {baselines['split']} tokens, the runs "
                         f"{tokens.get(baselines['split'])}: not the same tokens")


def describe_plan(planned: dict) -> list[str]:
    lines = []
    for kind in planned["kinds"]:
        lines.append(f"budget ({kind}): {planned['budgets'][kind]:.6e} {budget_lib.UNITS[kind]} per run; "
                     f"{budget_lib.FORMULAS[kind]}")
        for lab, cost in planned["per_step"][kind].items():
            run = next(r for r in planned["runs"] if r.kind == kind and r.label == lab)
            lines.append(f"  {lab}: {cost:.6e} per step -> {run.steps:,} steps; model FLOPs "
                         f"{run.costs['model_flops']:.4e}, executed FLOPs {run.costs['executed_flops']:.4e}, tokens "
                         f"{run.costs['tokens']:,}" + (f"; the same runs as under {run.same_as} (identical configs: "
                                                      "trained once)" if run.same_as else ""))
    later = sum(1 for _ in planned["kinds"] for a, g in planned["grids"].items() if g) * (
        len(planned["replicates"]) - planned["select_replicates"])
    later += len(planned["kinds"]) * len(planned["lr"]["from"]) * len(planned["replicates"])
    shared = sum(1 for r in planned["runs"] if r.same_as)
    lines.append(f"runs: {len(planned['runs'])} planned now ({len(planned['replicates'])} replicates, "
                 f"{planned['select_replicates']} choosing the learning rate"
                 + (f"; {shared} of them another budget's identical runs, trained once" if shared else "") +
                 f"); {later} more once the rates are chosen, and one more per grid extension; report split: "
                 f"{planned['report_split']}")
    return lines


def budget_table(planned: dict, kind: str) -> list[str]:
    budget = planned["budgets"][kind]
    lines = [f"Budget **{kind}**: {budget:.4e} {budget_lib.UNITS[kind]} per run. {budget_lib.FORMULAS[kind]}. "
             "steps = max(1, round(budget / cost per step)).", "",
             "| arm | lr | tokens/step | training FLOPs/token | padding+dispatch FLOPs/token | optimizer FLOPs/step "
             "| model FLOPs/step | executed FLOPs/step | steps | model FLOPs | executed FLOPs | tokens | vs budget |",
             "|" + "---|" * 13]
    seen, notes = set(), []
    for run in planned["runs"]:
        if run.kind != kind or run.arm in seen:
            continue
        seen.add(run.arm)
        c = run.config
        fpt = flops.run_flops_per_token(c)
        grid, src = planned["grids"][run.arm], planned["lr"]["from"].get(run.arm)
        lr = ("grid " + ", ".join(f"{v:g}" for v in grid) if grid else f"{src}'s choice" if src else
              f"{_lr_of(c, planned['lr_field']):g}")
        used = planned["per_step"][kind][run.label] * run.steps
        by = planned["steps_by"].get(run.arm)
        notes += [f"{run.arm}: steps set by the {by} convention, as many {budget_lib.UNITS[by]} as the reference "
                  f"arm ({run.costs[by]:,.0f}), so it spends {used / budget - 1:+.1%} of the budget."] if by else []
        notes += [f"{run.arm}: the same runs as under the {run.same_as} budget (the same steps and config: trained "
                  "once and scored under both; a rerun is bit-identical)."] if run.same_as else []
        lines.append(f"| {run.arm} | {lr} | {budget_lib.tokens_per_step(c):,} | {fpt['training']:.6e} | "
                     f"{fpt['dispatch_overhead_training']:.4e} | {flops.optimizer_flops_per_step(c.model, c.optim):.4e} | "
                     f"{flops.flops_per_step(c):.6e} | {flops.executed_flops_per_step(c):.6e} | {run.steps:,} | "
                     f"{run.costs['model_flops']:.6e} | {run.costs['executed_flops']:.6e} | {run.costs['tokens']:,} | "
                     f"{used / budget - 1:+.3%} |")
    return lines + ([""] + notes if notes else [])


def _lr_of(c, field: str) -> float:
    section, key = field.split(".")
    return float(getattr(getattr(c, section), key))


def _header(study, planned: dict, split: str, env: dict, command: str, name: str, tokens: dict | None = None,
            baselines: dict | None = None) -> list[str]:
    """Title, command, machine, randomness, evaluation (with the scored tokens and baselines when known), budgets
    and the arms."""
    first_cfg = next(iter(planned["arms"].values()))
    lines = [f"# Study {name}: {' vs '.join(planned['arms'])}", "",
             f"Command: `{command}`", "", machine(env), "",
             randomness(study, planned), "", evaluation(first_cfg, split, tokens), "",
             *([f"Baselines on the same {baselines['tokens']:,} {baselines['split']} tokens, fitted on the training "
                f"split: unigram {baselines['unigram']:.4f}, interpolated bigram {baselines['bigram']:.4f} nats/token "
                f"({baselines['smoothing']}: lambda {baselines['lambda']:.4f}).", ""] if baselines else []),
             "Budgets: " + "; ".join(f"**{k}** {planned['budgets'][k]:.4e} {budget_lib.UNITS[k]} per run"
                                     for k in planned["kinds"]) + ". Every table names the budget its steps were "
             "set by and shows each run's cost under the others.", "", "## Arms", ""]
    for n, c in planned["arms"].items():
        grid = planned["grids"][n]
        lines.append(f"- **{n}**: {_arm_shape(c)}" + (f"; {planned['lr_field']} grid {list(grid)}" if grid else ""))
    return lines


def _lr_table(kind: str, selected: dict, planned: dict) -> list[str]:
    """The learning-rate grid of each arm on the validation split, the chosen one marked, with its status."""
    n_sel = planned["select_replicates"]
    tied = "; ".join(f"{f} = {r:g} x {planned['lr_field']}" for f, r in planned["lr"]["tied"])
    lines = ["", f"### Learning rate chosen on the validation split ({kind})", "",
             f"Each arm's {planned['lr_field']} is the grid value of lowest mean validation loss over the first "
             f"{n_sel} replicate(s) (the others run only the chosen value). A choice on the grid's edge extends the "
             f"grid by a factor {planned['lr']['step']:g} beyond it, at most {planned['lr']['extend']} time(s); an "
             "arm still on the edge is marked **edge** and its verdicts are withheld. "
             + (f"Tied to the swept rate: {tied}." if tied else "No other learning rate is tied to it or swept."), "",
             "| arm | lr | val loss (mean ± std [min, max]) | runs | chosen | status |", "|---|---|---|---|---|---|"]
    for arm in (a for a in planned["arms"] if a in selected):  # config order, not results.json's sorted keys
        sel = selected[arm]
        if sel["from"]:
            lines.append(f"| {arm} | {sel['lr']:g} | (runs {sel['from']}'s choice) | | **yes** | {sel['status']} |")
            continue
        status = f"{sel['status']} ({sel['extensions']} extension(s))"
        for lr, s in sorted(sel["grid"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {arm} | {lr} | {fmt_stats(s, '{:.4f}')} | {s['n']} | "
                         f"{'**yes**' if float(lr) == sel['lr'] else ''} | {status if float(lr) == sel['lr'] else ''} |")
    return lines


def _results_table(arms: dict, split: str, kind: str) -> list[str]:
    fl = fields(split)
    lines = ["", f"## Results ({kind} budget; {split} split; mean ± sample std [min, max] over replicates; single "
                 "values are the same for every replicate)", "",
             "| " + " | ".join(["arm", "runs"] + [label for _, label, *_ in fl]) + " |",
             "|" + "---|" * (len(fl) + 2)]
    for n, a in arms.items():
        lines.append("| " + " | ".join([n, str(len(a["runs"]))]
                                       + [fmt_stats(a[k], fmt, varies) for k, _, fmt, varies in fl]) + " |")
    return lines + ["", "Wall seconds are the training loop (steps, evaluations, checkpoints; setup and compilation "
                        "excluded), runs executed replicate-major so machine load falls on every arm alike. tokens/s "
                        "and MFU are medians over logging intervals (MFU: model FLOPs only, against the measured "
                        "matmul peak on CPU). The dropped-token fraction is the mean over logged training steps."]


def _interval_text(d: dict | None) -> str:
    if d is None or d["lo"] is None:
        return "n/a"
    return f"[{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _baselines_table(rows: dict, baselines: dict | None, split: str, kind: str) -> list[str]:
    """Each arm against the unigram and bigram baselines on the same tokens."""
    if not baselines:
        return ["", f"### Against the baselines ({kind} budget)", "",
                f"No unigram or bigram baseline was scored on the {split} split of this study."]
    lines = ["", f"### Against the baselines ({kind} budget; the same {baselines['tokens']:,} {split} tokens)", "",
             f"Unigram {baselines['unigram']:.4f}, interpolated bigram {baselines['bigram']:.4f} "
             "nats/token, both fitted on the training split. Differences arm - baseline with 95% intervals "
             "(replicate variance + document bootstrap); an arm **beats** a baseline when the interval's upper end "
             "is below 0.", "",
             "| arm | - unigram | interval | - bigram | interval | beats the bigram |", "|---|---|---|---|---|---|"]
    for n, r in rows.items():
        u, b = r["unigram"], r["bigram"]
        beats = b["hi"] is not None and b["hi"] < 0
        lines.append(f"| {n} | {u['diff']:+.4f} | {_interval_text(u)} | {b['diff']:+.4f} | {_interval_text(b)} | "
                     f"{'yes' if beats else '**no**'} |")
    return lines


def _ranking_table(arms: dict, key: str, kind: str, counts, given: bool) -> list[str]:
    head = ["", f"### Ranking by {key.replace('_', ' ')} ({kind} budget; {100 * stats.LEVEL:.0f}% intervals: "
                "replicate variance + document bootstrap where per-document losses exist)", ""]
    if not given:
        return head + ["Ranking withheld: not every arm beats the interpolated bigram on this split (or no baseline "
                       "was scored), so an order of the arms would describe models that have not learned more than "
                       "bigram statistics."]
    lines = head + ["| rank | arm | mean | interval of the mean | runs | difference vs " + next(iter(arms), "") +
                    " | interval of the difference |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(ranking(arms, key, counts), 1):
        mean = "n/a" if r["mean"] is None else f"{r['mean']:.4f}"
        m = r["interval"]
        ci = f"[{m['lo']:.4f}, {m['hi']:.4f}]" if m["lo"] is not None else "n/a"
        d = r["diff"]
        if d is None:
            dd, di = "(reference)", ""
        else:
            dd = "n/a" if d["diff"] is None else f"{d['diff']:+.4f}"
            di = ("n/a" if d["lo"] is None else
                  f"{_interval_text(d)} ({'paired' if d['paired'] else 'Welch'}, df {d['df']:.1f})")
        lines.append(f"| {i} | {r['arm']} | {mean} | {ci} | {r['n']} | {dd} | {di} |")
    return lines


def family_text(analysis: dict, planned: dict) -> str:
    """The verdict rule and the family it is applied over, in words."""
    m = sum(v["family"] is not None for vs in analysis["verdicts"].values() for v in vs)
    counts = analysis["counts"]
    boot = (f"{counts.shape[0]} resamples of the {counts.shape[1]} test documents, the same resamples for every "
            f"arm (seed {analysis['bootstrap_seed']})" if counts is not None else "no per-document losses: "
            "replicate variance only")
    return (f"Rule: with fewer than {stats.MIN_RUNS} runs per arm, no verdict; an arm whose learning rate stayed on "
            f"its grid's edge, verdict withheld. The family is every verdict drawn in this study: {m} comparisons "
            f"({analysis['comparisons']}, under every budget: {', '.join(planned['kinds'])}); their p-values are "
            f"Holm-adjusted over it and an arm is better where its adjusted p < {stats.ALPHA:.2f}. Intervals are "
            "the unadjusted 95% ones: se^2 = replicate variance of the difference / n + variance of the difference "
            f"over document resamples ({boot}), t with Satterthwaite degrees of freedom (replicates n - 1, "
            "documents D - 1).")


def _budget_section(planned: dict, kind: str, analysis: dict, selected: dict, split: str, key: str,
                    baselines: dict | None) -> list[str]:
    """One budget's part of the report: its plan, learning rates, results, baselines, ranking, verdicts, routing."""
    arms = analysis["tables"][kind]
    lines = ["", f"## Budget: {kind}", ""] + budget_table(planned, kind)
    if selected.get(kind):
        lines += _lr_table(kind, selected[kind], planned)
    lines += _results_table(arms, split, kind)
    lines += _baselines_table(analysis["baselines"][kind], baselines, split, kind)
    lines += _ranking_table(arms, key, kind, analysis["counts"], analysis["ranked"][kind])
    lines += ["", f"### Verdicts ({kind} budget)", "", family_text(analysis, planned), ""]
    lines += [f"- {v['text']}" for v in analysis["verdicts"][kind]]
    routing = routing_lines(arms)
    if routing:
        lines += ["", f"### Routing per MoE layer ({kind} budget; mean over logged training steps and replicates)",
                  ""] + routing
    return lines


def analyse(study, planned: dict, records: list[dict], selected: dict, key: str, baselines: dict | None) -> dict:
    """What the report states, computed once: per budget the arm table, each arm against the baselines, the
    verdicts (Holm-adjusted over the whole study's family) and whether a ranking may be given (every arm beats
    the bigram)."""
    seed = int(study.get("bootstrap_seed", stats.BOOTSTRAP_SEED))
    out = {"counts": resamples(records, key, seed), "bootstrap_seed": seed,
           "comparisons": str(study.get("comparisons", "pairwise")), "tables": {}, "baselines": {}, "verdicts": {},
           "withheld": {}, "ranked": {}}
    pairs = comparisons(study, list(planned["arms"]))
    for kind in planned["kinds"]:
        t = out["tables"][kind] = aggregate([r for r in records if r["kind"] == kind], planned["report_split"])
        out["baselines"][kind] = versus_baselines(t, key, baselines, out["counts"])
        out["withheld"][kind] = withheld_arms(selected.get(kind, {}))
        out["verdicts"][kind] = verdicts(t, key, pairs, out["counts"], out["withheld"][kind])
        out["ranked"][kind] = bool(baselines) and all(beats_bigram(out["baselines"][kind]).values())
    stats.adjust([v for vs in out["verdicts"].values() for v in vs])
    return out


def headline(analysis: dict, baselines: dict | None, split: str) -> list[str]:
    """The report's first section: per budget, whether every arm beats the interpolated bigram (if not, it says so
    and gives no ranking), then the verdicts resolved after Holm, those not resolved and those withheld."""
    lines = ["## Headline", ""]
    for kind, rows in analysis["baselines"].items():
        if not baselines:
            lines.append(f"- **{kind}**: no unigram/bigram baseline was scored on the {split} split, so whether the "
                         "arms learned more than n-gram statistics is unknown: **no ranking is given**.")
            continue
        big = baselines["bigram"]
        beats = beats_bigram(rows)
        if not all(beats.values()):
            lagging = ", ".join(f"{n} {rows[n]['bigram']['diff']:+.4f} {_interval_text(rows[n]['bigram'])}"
                                for n, ok in beats.items() if not ok)
            lines.append(f"- **{kind}**: **{sum(not ok for ok in beats.values())} of {len(beats)} arms do not beat "
                         f"the interpolated bigram** ({big:.4f} nats/token on the {split} split; arm - bigram: "
                         f"{lagging}): **no ranking is given**.")
            continue
        margins = sorted(-r["bigram"]["diff"] for r in rows.values())
        lines.append(f"- **{kind}**: every arm beats the interpolated bigram ({big:.4f} nats/token on the {split} "
                     f"split) by {margins[0]:.3f} to {margins[-1]:.3f} nats/token (95% intervals below it).")
        vs = analysis["verdicts"][kind]
        won = [v for v in vs if v["decision"] in (v["x"], v["y"])]
        lines += [f"  - **{v['decision']} is better** than {v['y'] if v['decision'] == v['x'] else v['x']}: "
                  f"{v['x']} - {v['y']} = {v['diff']:+.4f} {_interval_text(v)}, Holm-adjusted p = "
                  f"{v['p_holm']:.2g}." for v in won]
        rest = [f"{v['x']} vs {v['y']}" for v in vs if v["decision"] == "none"]
        if rest:
            lines.append(f"  - No resolved difference: {', '.join(rest)}.")
        held = [f"{v['x']} vs {v['y']}" for v in vs if v["decision"] in ("withheld", "no verdict")]
        if held:
            lines.append(f"  - Withheld or no verdict: {', '.join(held)} (see the verdicts).")
    return lines + [""]


def _results(study, planned: dict, records: list[dict], selected: dict, analysis: dict, command: str, env: dict,
             name: str, split: str, key: str, baselines: dict | None, head: list[str]) -> dict:
    """The results.json content."""
    counts = analysis["counts"]
    results = {"command": command, "environment": env, "study": name, "split": split, "metric": key,
               "kinds": planned["kinds"], "budgets": planned["budgets"],
               "formulas": {k: budget_lib.FORMULAS[k] for k in planned["kinds"]},
               "seeds": [int(s) for s in study.seeds], "data_orders": _orders(study),
               "replicates": [list(r) for r in planned["replicates"]], "lr_field": planned["lr_field"],
               "lr_protocol": {"select_replicates": planned["select_replicates"], "extend": planned["lr"]["extend"],
                               "step": planned["lr"]["step"], "tied": planned["lr"]["tied"],
                               "from": planned["lr"]["from"]},
               "selected_lrs": selected,
               "plans": {k: plan_summary(planned, k) for k in planned["kinds"]},
               "runs": records,
               "tables": {k: {n: {f: v for f, v in a.items() if f != "runs"} for n, a in t.items()}
                          for k, t in analysis["tables"].items()},
               "comparisons": analysis["comparisons"],
               "bootstrap": None if counts is None else {"samples": int(counts.shape[0]), "documents":
                                                          int(counts.shape[1]), "seed": analysis["bootstrap_seed"]},
               "baselines": baselines, "versus_baselines": analysis["baselines"], "ranking_given": analysis["ranked"],
               "verdicts": analysis["verdicts"], "headline": head}
    # the first budget's plan and table under the names moe_jax.compare has always used
    results["budget_flops"] = planned["budgets"][planned["kinds"][0]]
    results["plan"] = results["plans"][planned["kinds"][0]]
    results["arms"] = results["tables"][planned["kinds"][0]]
    return results


def write(workdir: str, study, planned: dict, records: list[dict], selected: dict, command: str,
          env: dict | None = None, baselines: dict | None = None) -> dict:
    """report.md (headline, tables, verdicts, links to the plots of plots.py) and results.json in `workdir`.
    `baselines`: baseline_summary (with the per-document losses), checked to be scored on the runs' tokens, or None.
    Returns the results dict."""
    split = planned["report_split"]
    key = metric_key(split)
    env = env or environment()
    name = str(study.get("name", "") or "study")
    tokens = scored_tokens(records)
    if baselines:
        check_baselines(baselines, tokens)
    analysis = analyse(study, planned, records, selected, key, baselines)
    head = headline(analysis, baselines, split)
    lines = _header(study, planned, split, env, command, name, tokens, baselines)
    lines = lines[:2] + head + lines[2:6] + machines_line(records) + lines[6:]
    for kind in planned["kinds"]:
        lines += _budget_section(planned, kind, analysis, selected, split, key, baselines)
    lines += routing_section(workdir, planned, records)
    lines += ["", "## Plots", ""]
    for path in plots_lib.plot(workdir, planned, records, analysis["tables"], key, study):
        rel = os.path.relpath(path, workdir)
        lines += [f"![{os.path.splitext(os.path.basename(rel))[0]}]({rel})", ""]
    conclusions = study.get("conclusions", "")
    if conclusions:
        lines += ["## What this supports and what it does not", "", str(conclusions).strip(), ""]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, REPORT_FILE) + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(os.path.join(workdir, REPORT_FILE) + ".tmp", os.path.join(workdir, REPORT_FILE))
    results = _results(study, planned, records, selected, analysis, command, env, name, split, key, baselines, head)
    if tokens:
        results["scored_tokens"] = tokens
    metrics_lib.write_json(workdir, RESULTS_FILE, results)
    return results


def _orders(study):
    o = study.get("data_orders", "paired")
    return o if isinstance(o, str) else [int(x) for x in o]


def plan_summary(planned: dict, kind: str) -> dict:
    """Per arm (its first variant; a learning rate changes no cost): steps and costs under every convention."""
    out = {}
    for run in planned["runs"]:
        if run.kind != kind or run.arm in out:
            continue
        c = run.config
        out[run.arm] = {"steps": run.steps, "budget": planned["budgets"][kind], "kind": kind,
                        "flops_per_token": flops.run_flops_per_token(c), "tokens_per_step": budget_lib.tokens_per_step(c),
                        "flops_per_step": flops.flops_per_step(c), "training_flops": run.costs["model_flops"],
                        "executed_flops_per_step": flops.executed_flops_per_step(c),
                        "optimizer_flops_per_step": flops.optimizer_flops_per_step(c.model, c.optim), **run.costs,
                        "params": flops.param_counts(c.model), "grid": planned["grids"][run.arm],
                        "config": c.to_dict()}
    return out


def routing_lines(arms: dict) -> list[str]:
    lines = []
    for n, a in arms.items():
        per = {k: [r["routing"][k] for r in a["runs"] if k in r.get("routing", {})] for k, _ in ROUTING_KEYS}
        if not any(per.values()):
            continue
        if not lines:
            lines = ["| arm | " + " | ".join(label for _, label in ROUTING_KEYS) + " |",
                     "|---" * (len(ROUTING_KEYS) + 1) + "|"]
        cells = []
        for k, _ in ROUTING_KEYS:
            vals = np.mean(np.asarray(per[k], dtype=float), axis=0) if per[k] else []
            cells.append(", ".join(f"L{i}: {v:.3f}" for i, v in enumerate(vals)))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def routing_section(workdir: str, planned: dict, records: list[dict]) -> list[str]:
    """Report lines pointing each selected MoE run at its routing diagnostics (moe_jax.routing): a link to
    <run>/routing/routing.json when it was written, else the command that writes it. Empty without MoE arms."""
    multi = len(planned["kinds"]) > 1
    lines = []
    for r in records:
        if not (r["selected"] and planned["arms"][r["arm"]].moe.num_experts):
            continue
        rdir = r["run_dir"]
        rel = os.path.relpath(rdir, workdir)
        name = (f"{r['label']} seed {r['seed']}" + (f" order {r['order']}" if "_order" in r["replicate"] else "")
                + (f" ({r['kind']})" if multi else ""))
        if os.path.exists(os.path.join(rdir, "routing", "routing.json")):
            lines.append(f"- {name}: [routing.json]({rel}/routing/routing.json), "
                         f"[load heatmap]({rel}/routing/load_heatmap.png), "
                         f"[specialisation]({rel}/routing/specialisation.txt)")
        else:
            lines.append(f"- {name}: `python -m moe_jax.routing --workdir {rdir}` writes {rel}/routing/")
    if not lines:
        return []
    return ["", "## Routing diagnostics", "", "Per-layer loads, drops at the eval and train capacity, router "
            "confidence and expert specialisation of each MoE run (`python -m moe_jax.routing`; README: Inside the "
            "router):", ""] + lines


def machine(env: dict) -> str:
    """The report's machine line (the code commit and library versions when the environment records them)."""
    line = (f"Machine: {env['device_count']} x {env['device_kind']} ({env['platform']}, {env['cpu_count']} CPU "
            f"cores), jax {env['jax']}.")
    if "commit" in env:
        line = (line[:-1] + f", jaxlib {env['jaxlib']}, flax {env['flax']}, optax {env['optax']}; CPU {env['cpu']}; "
                f"code commit {env['commit']}" + (" (with uncommitted changes)." if env.get("dirty") else "."))
    return line


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor(), else the machine type)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def code_commit() -> tuple[str, bool]:
    """(git commit of the checkout holding this package, whether it has uncommitted changes); ('unknown', False)
    outside a git checkout."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    return commit or "unknown", dirty


def environment() -> dict:
    """The machine and software a study ran on: devices, CPU model and cores, jax/jaxlib/flax/optax versions and
    the code commit (results.json's 'environment')."""
    import flax
    import jax
    import jaxlib
    import optax

    d = jax.devices()[0]
    commit, dirty = code_commit()
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "commit": commit, "dirty": dirty}
