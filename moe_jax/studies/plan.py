"""A study config -> the list of runs to train: arms, learning-rate grids, replicates (seeds x data orders), budgets.

A study config (see moe_jax/studies/__init__.py for the whole schema) names arms as overrides of a base config.
`plan(study)` resolves every arm, applies each arm's learning-rate grid, crosses them with the replicates and the
budget conventions, and sets every run's steps so that all runs of one budget spend the same budget (budget.py).

Replicates. `seeds` are initialisation seeds. With data_orders = 'paired' (the default) replicate k uses seed k for
both the initialisation (config.seed) and the training-document order (config.data.shuffle_seed = seed k): seeds
vary both, and arm A's replicate k and arm B's replicate k share both, so arm differences are paired. With
data_orders = a tuple of shuffle seeds, every seed is crossed with every order (replicate = (seed, order)).

Shared runs. A run whose whole config equals a run of an earlier budget (e.g. the reference arm, given
reference_steps under every convention) is that run: it names the same run dir (Run.same_as says whose), so it is
trained once and scored under both budgets. Nothing is lost by it: training is deterministic on one machine (a rerun
of a config is bit-identical: tests/test_trainer.py), so a second training would only repeat the first.

Arms may differ in anything, batch size and sequence length included, but must read the same data (the data
section, vocab). The numbers the verdicts read are scored on the whole validation and test splits, every target token
once, by the runner (runner.evaluate_split), whatever the arms' sequence lengths; when arms differ in batch size or
sequence length, their curves during training must also cover the validation split alike: the whole of it
(data.max_val_windows = 0) or windows spread evenly over it (data.val_window_sampling = 'even'), with
train.eval_batches = 0 (no first-N truncation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections

from moe_jax.config import schema as config_lib
from moe_jax.config import typed
from moe_jax.config.runs import flatten
from moe_jax.studies import budget as budget_lib

_DERIVE_KEYS = {"same_active": {"derive", "from_arm", "num_experts", "top_k", "every"},
                "same_total": {"derive", "from_arm"}}


def merge(base: ml_collections.ConfigDict, overrides, where: str) -> None:
    """Apply nested `overrides` to `base` in place; unknown fields raise ConfigError naming `where`.<field>."""
    for k, v in overrides.items():
        if k not in base:
            raise config_lib.ConfigError(f"{where}.{k}: unknown config field (not in the base config)")
        if isinstance(v, (dict, ml_collections.ConfigDict)):
            merge(base[k], v, f"{where}.{k}")
        else:
            base[k] = v


def to_dict(x) -> dict:
    return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def copy_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(c.to_dict())


def config_json(c) -> dict:
    """The config as config.json holds it (tuples as lists), flattened to dotted keys."""
    return flatten(json.loads(c.to_json_best_effort(sort_keys=True)))


def arm_names(study) -> list[str]:
    names = [n.strip() for n in str(study.arm_names).split(",") if n.strip()]
    if not names:
        raise config_lib.ConfigError("config.arm_names: no arms in the study")
    if len(set(names)) != len(names):
        raise config_lib.ConfigError(f"config.arm_names: an arm is listed twice in {names}")
    return names


def arm_configs(study) -> dict[str, ml_collections.ConfigDict]:
    """Every arm in study.arm_names as a full config (steps not yet set), validated (`parsed_arms`)."""
    return {name: c for name, (c, _) in parsed_arms(study).items()}


def parsed_arms(study) -> dict[str, tuple[ml_collections.ConfigDict, typed.RunConfig]]:
    """Resolve every arm in study.arm_names into a full config (steps not yet set) and its RunConfig: each arm is
    parsed once, which validates it (before another arm is derived from it). An arm is a partial config (nested
    overrides of base) or a derived arm:
        {'derive': 'same_active', 'from_arm': 'dense', 'num_experts': 8, 'top_k': 2, 'every': 1}
            MoE whose active FFN parameters equal the dense arm's (expert d_ff = dense d_ff / top_k);
        {'derive': 'same_total', 'from_arm': 'moe'}
            dense whose total parameters equal the MoE arm's (d_ff = the MoE model's FFN parameters spread evenly
            over its layers; the router's M*E per layer is ignored)."""
    names = arm_names(study)
    resolved: dict[str, tuple[ml_collections.ConfigDict, typed.RunConfig]] = {}
    resolving: list[str] = []

    def resolve(name):
        if name in resolved:
            return resolved[name][0]
        if name not in study.arms:
            raise config_lib.ConfigError(f"config.arm_names: arm {name!r} is not defined in config.arms "
                                         f"(defined: {sorted(study.arms.keys())})")
        if name in resolving:
            raise config_lib.ConfigError(f"config.arms.{name}: derived arms form a cycle {resolving + [name]}")
        resolving.append(name)
        spec = to_dict(study.arms[name])
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
            c = copy_config(study.base)
            merge(c, spec, f"config.arms.{name}")
        elif derive == "same_active":
            src = resolve(spec["from_arm"])
            if src.moe.num_experts:
                raise config_lib.ConfigError(f"config.arms.{name}.from_arm: 'same_active' derives an MoE from a "
                                             f"dense arm; {spec['from_arm']!r} is already MoE")
            c = copy_config(src)
            c.moe.num_experts = int(spec.get("num_experts", 8))
            c.moe.top_k = int(spec.get("top_k", 2))
            c.moe.every = int(spec.get("every", 1))
            if c.model.d_ff % c.moe.top_k:
                raise config_lib.ConfigError(f"config.arms.{name}: dense d_ff {c.model.d_ff} of "
                                             f"{spec['from_arm']!r} is not divisible by top_k {c.moe.top_k}")
            c.moe.d_ff = c.model.d_ff // c.moe.top_k
        else:  # same_total
            src = resolve(spec["from_arm"])
            c = copy_config(src)
            n = src.model.n_layers
            n_moe = sum(config_lib.is_moe_layer(src, i) for i in range(n))
            ffn_total = n_moe * src.moe.num_experts * src.moe.d_ff + (n - n_moe) * src.model.d_ff
            c.model.d_ff = int(round(ffn_total / n))
            c.moe.num_experts = 0
        c.name = name
        resolved[name] = (c, typed.parse(c))  # the arm's one validation
        resolving.pop()
        return c

    for n in names:
        resolve(n)
    arms = {n: resolved[n] for n in names}
    check_same_data({n: c for n, (c, _) in arms.items()})
    return arms


def check_same_data(arms: dict) -> None:
    """Every arm must read the same documents with the same tokenizer and be scored on the same held-out tokens."""
    flat = {n: config_json(c) for n, c in arms.items()}
    first = next(iter(flat))
    keys = [k for k in flat[first] if k.startswith("data.")] + ["model.vocab_size"]
    for n, f in flat.items():
        for k in keys:
            if f.get(k) != flat[first].get(k):
                raise config_lib.ConfigError(
                    f"config.arms.{n}: {k} = {f.get(k)!r} differs from arm {first!r} ({flat[first].get(k)!r}); all "
                    "arms must share the data section and vocab_size so that they read the same documents with the "
                    "same tokenizer")
    for field in ("train.seq_len", "train.batch_size"):
        values = {n: f[field] for n, f in flat.items()}
        if len(set(values.values())) > 1:
            for n, f in flat.items():
                spread = f["data.max_val_windows"] == 0 or f["data.val_window_sampling"] == "even"
                if not spread or f["train.eval_batches"] != 0:
                    raise config_lib.ConfigError(
                        f"config.arms.{n}: arms differ in {field} ({values}), so every arm must be scored over the "
                        f"whole validation split (base.data.max_val_windows = 0) or windows spread evenly over it "
                        f"(base.data.val_window_sampling = 'even'), with base.train.eval_batches = 0 (now "
                        f"max_val_windows {f['data.max_val_windows']}, sampling {f['data.val_window_sampling']!r}, "
                        f"eval_batches {f['train.eval_batches']})")


def lr_grid(study, arm: str) -> list[float] | None:
    """The arm's initial learning-rate grid (values of study.lr_field, default optim.muon_lr), or None (base value)."""
    grids = study.get("lr_grid") or {}
    grid = grids.get(arm, grids.get("all"))
    if grid is None or arm in (study.get("lr_from") or {}):
        return None
    grid = [float(v) for v in grid]
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid) or len(set(grid)) != len(grid):
        raise config_lib.ConfigError(f"config.lr_grid.{arm}: give distinct learning rates > 0, got {grid}")
    return sorted(grid)


def lr_field(study) -> str:
    return str(study.get("lr_field", "optim.muon_lr"))


def lr_settings(study, arms) -> dict:
    """The learning-rate protocol, validated (moe_jax/studies/__init__.py):
        extend  - study.lr_extend: grid steps an arm's grid may grow by when its best rate sits on the grid's edge
                  (one geometric step of lr_step beyond that edge each time); 0: an edge choice is marked 'edge';
        step    - study.lr_step (> 1, default 2): the factor of one extension;
        select  - study.lr_select_replicates: the first k replicates run every grid value and choose the rate
                  (0: all); the other replicates run only the chosen one;
        tied    - study.lr_tied: ((field, ratio), ...): fields set to ratio x the swept rate in every run;
        from    - study.lr_from: {arm: source arm}: the arm runs the rate chosen for the source arm (no grid)."""
    extend, step = int(study.get("lr_extend", 0) or 0), float(study.get("lr_step", 2.0) or 2.0)
    select = int(study.get("lr_select_replicates", 0) or 0)
    if extend < 0 or not step > 1 or select < 0:
        raise config_lib.ConfigError(f"config.lr_extend/lr_step/lr_select_replicates: give lr_extend >= 0, "
                                     f"lr_step > 1, lr_select_replicates >= 0 (got {extend}, {step}, {select})")
    tied = [(str(f), float(r)) for f, r in (study.get("lr_tied") or ())]
    base = study.base
    for f, r in tied:
        section, _, key = f.partition(".")
        if section not in base or key not in base[section] or not r > 0 or f == lr_field(study):
            raise config_lib.ConfigError(f"config.lr_tied: ({f!r}, {r}) must name another config field "
                                         "(section.key) and a ratio > 0")
    sources = {str(a): str(s) for a, s in (study.get("lr_from") or {}).items()}
    for a, s in sources.items():
        if a not in arms or s not in arms or lr_grid(study, s) is None:
            raise config_lib.ConfigError(f"config.lr_from.{a}: {a!r} and its source {s!r} must be arms of the "
                                         "study, the source with a learning-rate grid")
    return {"extend": extend, "step": step, "select": select, "tied": tied, "from": sources}


def with_lr(c: ml_collections.ConfigDict, field: str, lr: float, tied) -> ml_collections.ConfigDict:
    """A copy of `c` with `field` = lr and every tied field = its ratio x lr."""
    v = copy_config(c)
    for f, ratio in [(field, 1.0)] + list(tied):
        section, key = f.split(".")
        if key not in v[section]:
            raise config_lib.ConfigError(f"config.lr_field: {f!r} is not a config field")
        v[section][key] = lr * ratio
    return v


def extended(grid: list[float], best: float, step: float) -> float | None:
    """The next learning rate beyond the edge of `grid` where `best` sits (None when it is inside): best x step at
    the top, best / step at the bottom (6 significant digits). A one-value grid extends upwards."""
    if best == max(grid):
        return float(f"{best * step:.6g}")
    if best == min(grid):
        return float(f"{best / step:.6g}")
    return None


def replicates(study) -> list[tuple[int, int]]:
    """(init seed, data order) pairs: paired (order = seed) or crossed (every seed x every order)."""
    seeds = [int(s) for s in study.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise config_lib.ConfigError(f"config.seeds: give distinct seeds (>= 3 for a verdict), got {seeds}")
    orders = study.get("data_orders", "paired")
    if orders == "paired":
        return [(s, s) for s in seeds]
    if isinstance(orders, str):
        raise config_lib.ConfigError(f"config.data_orders: 'paired' or a tuple of shuffle seeds, got {orders!r}")
    orders = [int(o) for o in orders]
    if not orders or len(set(orders)) != len(orders):
        raise config_lib.ConfigError(f"config.data_orders: give distinct shuffle seeds, got {orders}")
    return [(s, o) for s in seeds for o in orders]


def replicate_key(study, seed: int, order: int) -> str:
    orders = study.get("data_orders", "paired")
    if orders == "paired" or len(list(orders)) == 1:
        return f"seed{seed}"
    return f"seed{seed}_order{order}"


def budget_kinds(study) -> list[str]:
    b = study.budget
    kinds = b.get("kinds") or (b.get("kind", "model_flops"),)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for k in kinds:
        if k not in budget_lib.KINDS:
            raise config_lib.ConfigError(f"config.budget.kinds: unknown {k!r}; choose from {budget_lib.KINDS}")
    if len(set(kinds)) != len(kinds):
        raise config_lib.ConfigError(f"config.budget.kinds: listed twice in {kinds}")
    return kinds


def arm_label(arm: str, lr: float | None) -> str:
    return arm if lr is None else f"{arm}@lr{lr:g}"


@dataclasses.dataclass
class Run:
    """One training run of the study."""

    kind: str  # budget convention its steps were set by
    arm: str
    lr: float | None  # the grid value (None: no grid for this arm)
    seed: int
    order: int
    replicate: str
    run_dir: str
    config: typed.RunConfig
    steps: int
    costs: dict
    same_as: str = ""  # the budget whose identical run this is (trained once, in that budget's run dir); "" if none

    @property
    def label(self) -> str:
        return arm_label(self.arm, self.lr)


def run_dir(workdir: str, kinds: list[str], kind: str, arm: str, lr: float | None, replicate: str) -> str:
    parts = [workdir] + ([kind] if len(kinds) > 1 else []) + [arm] + ([f"lr{lr:g}"] if lr is not None else [])
    return os.path.join(*parts, replicate)


def grow_grids(planned: dict, selected: dict) -> dict | None:
    """planned's grids ({kind: {arm: [lr]}}) with one more value (plan.extended) for every arm whose chosen rate
    sits on its grid's edge and that has extensions left (lr_extend); None when no grid grows."""
    grids = {k: dict(v) for k, v in planned["kind_grids"].items()}
    grew = False
    for kind, per in selected.items():
        for arm, s in per.items():
            if s["from"] or s["status"] != "edge" or s["extensions"] >= planned["lr"]["extend"]:
                continue
            grids[kind][arm] = sorted(grids[kind][arm] + [extended(grids[kind][arm], s["lr"], planned["lr"]["step"])])
            grew = True
    return grids if grew else None


def initial_grids(study, kinds: list[str], arms) -> dict:
    """{kind: {arm: sorted initial grid | None}}: every budget starts from the configured grids."""
    return {k: {a: lr_grid(study, a) for a in arms} for k in kinds}


def run_lrs(kind: str, arm: str, i: int, grids: dict, chosen: dict, lrs: dict, n_select: int) -> list:
    """The learning rates replicate number `i` of `arm` runs under budget `kind`: every grid value for the
    selection replicates (i < n_select), else the chosen value once known (nothing before); an lr_from arm runs its
    source's chosen value once known; an arm without a grid runs its own (None)."""
    grid = grids[kind].get(arm)
    if grid:
        if i < n_select:
            return list(grid)
        c = chosen.get(kind, {}).get(arm)
        return [] if c is None else [c]
    src = lrs["from"].get(arm)
    if src is not None:
        c = chosen.get(kind, {}).get(src)
        return [] if c is None else [c]
    return [None]


def _budgets(study, kinds, parsed, seconds_per_step) -> tuple[dict, dict]:
    """({kind: {arm: cost per step}}, {kind: budget per run}); a learning rate changes no step's cost."""
    b = study.budget
    per_arm: dict[str, dict[str, float]] = {}
    budgets: dict[str, float] = {}
    for kind in kinds:
        if kind == "wall_seconds" and seconds_per_step is None:
            raise config_lib.ConfigError("config.budget.kinds: a wall_seconds budget needs measured seconds per "
                                         "step; run the study through moe_jax.studies.runner (it calibrates first)")
        per_arm[kind] = {a: budget_lib.cost_per_step(rc, kind, (seconds_per_step or {}).get(a))
                         for a, (_, rc) in parsed.items()}
        amount = float(b.get("amount", 0.0) or 0.0)
        if amount <= 0:
            ref = b.get("reference_arm")
            if ref not in parsed:
                raise config_lib.ConfigError(f"config.budget.reference_arm: {ref!r} is not one of {list(parsed)}")
            if int(b.get("reference_steps", 0)) < 1:
                raise config_lib.ConfigError("config.budget: set amount > 0 or reference_steps >= 1")
            amount = per_arm[kind][ref] * int(b.reference_steps)
        budgets[kind] = amount
    return per_arm, budgets


def arm_steps(study, parsed, kind: str, per_arm: dict, budgets: dict) -> dict:
    """{arm: steps} under budget `kind`. An arm named in budget.arm_kinds ({arm: convention}) instead spends what
    the reference arm's runs spend under that convention (e.g. 'micro_batches': as many micro-batches)."""
    steps = {a: budget_lib.steps_for(budgets[kind], per_arm[kind][a]) for a in parsed}
    for arm, other in (study.budget.get("arm_kinds") or {}).items():
        ref = study.budget.get("reference_arm")
        if arm not in parsed or other not in budget_lib.KINDS or other == "wall_seconds" or ref not in parsed:
            raise config_lib.ConfigError(f"config.budget.arm_kinds.{arm}: {other!r} needs an arm of the study, a "
                                         "convention known before running and budget.reference_arm")
        amount = steps[ref] * budget_lib.cost_per_step(parsed[ref][1], other)
        steps[arm] = budget_lib.steps_for(amount, budget_lib.cost_per_step(parsed[arm][1], other))
    return steps


def _report_split(study, grids) -> str:
    split = str(study.get("report_split", "auto"))
    test = float(study.base.data.test_fraction) > 0
    if split == "auto":
        split = "test" if test else "validation"
    if split not in ("test", "validation"):
        raise config_lib.ConfigError(f"config.report_split: 'auto', 'test' or 'validation', got {split!r}")
    if split == "test" and not test:
        raise config_lib.ConfigError("config.report_split='test' needs base.data.test_fraction > 0")
    if split == "validation" and any(g for per in grids.values() for g in per.values()):
        raise config_lib.ConfigError("config.lr_grid: a learning rate chosen on the validation split must be "
                                     "reported on a test split; set base.data.test_fraction > 0 (e.g. 0.05)")
    return split


def plan(study, workdir: str = "", seconds_per_step: dict | None = None, grids: dict | None = None,
         chosen: dict | None = None) -> dict:
    """Resolve the study into runs. `seconds_per_step` {arm: seconds} is needed for a wall_seconds budget
    (runner.calibrate measures it). `grids` {kind: {arm: [lr]}} replace the initial grids (the runner extends
    them, lr_settings); `chosen` {kind: {arm: lr}} adds the runs of the replicates that only run the chosen rate.
    Returns {kinds, budgets {kind: amount}, per_step {kind: {label: cost}}, arms {name: config}, grids (initial)
    {name: [lr] | None}, kind_grids, chosen, lr {lr_settings}, replicates [(seed, order)], select_replicates,
    runs [Run] (replicate-major), report_split, lr_field, variants {label: {arm, lr}}, steps_by {arm: kind}}."""
    parsed = parsed_arms(study)
    kinds, reps, field = budget_kinds(study), replicates(study), lr_field(study)
    lrs = lr_settings(study, parsed)
    grids = grids or initial_grids(study, kinds, parsed)
    chosen = chosen or {}
    n_select = min(lrs["select"] or len(reps), len(reps))
    per_arm, budgets = _budgets(study, kinds, parsed, seconds_per_step)
    num_evals = int(study.get("num_evals", 0) or 0)
    runs, variant_cfgs, variants = [], {}, {}
    trained_as: dict[str, tuple[str, str]] = {}  # config.json text -> (budget, run dir) of its first run
    for kind in kinds:
        steps = arm_steps(study, parsed, kind, per_arm, budgets)
        for i, (seed, order) in enumerate(reps):
            rep = replicate_key(study, seed, order)
            for name, (c, _) in parsed.items():
                for lr in run_lrs(kind, name, i, grids, chosen, lrs, n_select):
                    label = arm_label(name, lr)
                    if label not in variant_cfgs:
                        variant_cfgs[label] = c if lr is None else with_lr(c, field, lr, lrs["tied"])
                        variants[label] = {"arm": name, "lr": lr}
                    v = copy_config(variant_cfgs[label])
                    v.train.steps = steps[name]
                    if num_evals > 0:
                        v.train.eval_every = max(1, math.ceil(steps[name] / num_evals))
                    v.seed, v.data.shuffle_seed = seed, order
                    rc = typed.parse(v)  # the run's one parse: the runner trains it as is
                    own = run_dir(workdir, kinds, kind, name, lr, rep)
                    first, where = trained_as.setdefault(rc.config_json(), (kind, own))
                    same_as = "" if first == kind else first  # within one budget, identical arms stay apart
                    runs.append(Run(kind, name, lr, seed, order, rep, where if same_as else own, rc, steps[name],
                                    budget_lib.costs(rc, steps[name]), same_as))
    return {"kinds": kinds, "budgets": budgets, "arms": {n: c for n, (c, _) in parsed.items()},
            "per_step": {k: {lab: per_arm[k][v["arm"]] for lab, v in variants.items()} for k in kinds},
            "grids": {a: lr_grid(study, a) for a in parsed}, "kind_grids": grids, "chosen": chosen, "lr": lrs,
            "replicates": reps, "replicate_keys": [replicate_key(study, s, o) for s, o in reps],
            "select_replicates": n_select, "runs": runs, "report_split": _report_split(study, grids),
            "lr_field": field, "variants": variants,
            "steps_by": {a: k for a, k in (study.budget.get("arm_kinds") or {}).items()}}
