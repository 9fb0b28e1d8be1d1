"""A study config -> the list of runs to train: arms, learning-rate grids, replicates (seeds x data orders), budgets.

A study config (see moe_jax/studies/__init__.py for the whole schema) names arms as overrides of a base config.
`plan(study)` resolves every arm, applies each arm's learning-rate grid, crosses them with the replicates and the
budget conventions, and sets every run's steps so that all runs of one budget spend the same budget (budget.py).

Replicates. `seeds` are initialisation seeds. With data_orders = 'paired' (the default) replicate k uses seed k for
both the initialisation (config.seed) and the training-document order (config.data.shuffle_seed = seed k): seeds
vary both, and arm A's replicate k and arm B's replicate k share both, so arm differences are paired. With
data_orders = a tuple of shuffle seeds, every seed is crossed with every order (replicate = (seed, order)).

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
    """The arm's learning-rate grid (values of study.lr_field, default optim.muon_lr), or None (base value)."""
    grids = study.get("lr_grid") or {}
    grid = grids.get(arm, grids.get("all"))
    if grid is None:
        return None
    grid = [float(v) for v in grid]
    if not grid or any(not (v > 0 and math.isfinite(v)) for v in grid) or len(set(grid)) != len(grid):
        raise config_lib.ConfigError(f"config.lr_grid.{arm}: give distinct learning rates > 0, got {grid}")
    return grid


def lr_field(study) -> str:
    return str(study.get("lr_field", "optim.muon_lr"))


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

    @property
    def label(self) -> str:
        return arm_label(self.arm, self.lr)


def run_dir(workdir: str, kinds: list[str], kind: str, arm: str, lr: float | None, replicate: str) -> str:
    parts = [workdir] + ([kind] if len(kinds) > 1 else []) + [arm] + ([f"lr{lr:g}"] if lr is not None else [])
    return os.path.join(*parts, replicate)


def plan(study, workdir: str = "", seconds_per_step: dict | None = None) -> dict:
    """Resolve the study into runs. `seconds_per_step` {arm label: seconds} is needed for a wall_seconds budget
    (runner.calibrate measures it). Returns {kinds, budgets {kind: amount}, per_step {kind: {label: cost}},
    arms {name: config}, grids {name: [lr] | None}, replicates [(seed, order)], runs [Run], report_split}."""
    parsed = parsed_arms(study)
    arms = {name: c for name, (c, _) in parsed.items()}
    kinds = budget_kinds(study)
    reps = replicates(study)
    field = lr_field(study)
    section, key = field.split(".")
    variants = {}  # label -> (arm, lr, config without steps)
    variant_runs = {}  # label -> its RunConfig (the arm's own, or the arm with the grid value, parsed once)
    grids = {}
    for name, (c, arm_run) in parsed.items():
        grids[name] = lr_grid(study, name)
        for lr in grids[name] or [None]:
            v = copy_config(c)
            if lr is not None:
                if key not in v[section]:
                    raise config_lib.ConfigError(f"config.lr_field: {field!r} is not a config field")
                v[section][key] = lr
            variants[arm_label(name, lr)] = (name, lr, v)
            variant_runs[arm_label(name, lr)] = arm_run if lr is None else typed.parse(v)
    b = study.budget
    per_step: dict[str, dict[str, float]] = {}
    budgets: dict[str, float] = {}
    for kind in kinds:
        if kind == "wall_seconds" and seconds_per_step is None:
            raise config_lib.ConfigError("config.budget.kinds: a wall_seconds budget needs measured seconds per "
                                         "step; run the study through moe_jax.studies.runner (it calibrates first)")
        per_step[kind] = {lab: budget_lib.cost_per_step(variant_runs[lab], kind, (seconds_per_step or {}).get(lab))
                          for lab in variants}
        amount = float(b.get("amount", 0.0) or 0.0)
        if amount <= 0:
            ref = b.get("reference_arm")
            if ref not in arms:
                raise config_lib.ConfigError(f"config.budget.reference_arm: {ref!r} is not one of {list(arms)}")
            if int(b.get("reference_steps", 0)) < 1:
                raise config_lib.ConfigError("config.budget: set amount > 0 or reference_steps >= 1")
            ref_labels = [lab for lab, (a, _, _) in variants.items() if a == ref]
            # with a grid the reference is its middle learning rate (the LR does not change a step's FLOPs or tokens)
            amount = per_step[kind][ref_labels[len(ref_labels) // 2]] * int(b.reference_steps)
        budgets[kind] = amount
    num_evals = int(study.get("num_evals", 0) or 0)
    runs = []
    for kind in kinds:
        for seed, order in reps:
            rep = replicate_key(study, seed, order)
            for lab, (name, lr, v) in variants.items():
                steps = budget_lib.steps_for(budgets[kind], per_step[kind][lab])
                c = copy_config(v)
                c.train.steps = steps
                if num_evals > 0:
                    c.train.eval_every = max(1, math.ceil(steps / num_evals))
                c.seed = seed
                c.data.shuffle_seed = order
                rc = typed.parse(c)  # the run's one parse: the runner trains it as is
                runs.append(Run(kind, name, lr, seed, order, rep, run_dir(workdir, kinds, kind, name, lr, rep), rc,
                                steps, budget_lib.costs(rc, steps)))
    split = str(study.get("report_split", "auto"))
    test = float(study.base.data.test_fraction) > 0
    if split == "auto":
        split = "test" if test else "validation"
    if split not in ("test", "validation"):
        raise config_lib.ConfigError(f"config.report_split: 'auto', 'test' or 'validation', got {split!r}")
    if split == "test" and not test:
        raise config_lib.ConfigError("config.report_split='test' needs base.data.test_fraction > 0")
    if split == "validation" and any(g for g in grids.values()):
        raise config_lib.ConfigError("config.lr_grid: a learning rate chosen on the validation split must be "
                                     "reported on a test split; set base.data.test_fraction > 0 (e.g. 0.05)")
    return {"kinds": kinds, "budgets": budgets, "per_step": per_step, "arms": arms, "grids": grids,
            "replicates": reps, "runs": runs, "report_split": split, "lr_field": field,
            "variants": {lab: {"arm": a, "lr": lr} for lab, (a, lr, _) in variants.items()}}
