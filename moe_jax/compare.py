"""FLOP-matched comparisons of architectures (dense vs MoE): a thin wrapper over moe_jax.studies.

    python -m moe_jax.compare --config configs/compare.py --workdir runs/cmp

A comparison config (see configs/compare.py) is a study config (moe_jax/studies/__init__.py) in the older spelling:
  base, arms, arm_names - as in a study (arms may be derived: 'same_active', 'same_total');
  seeds     - model-initialisation seeds (>= 3 for a verdict);
  data_orders - optional; default: the base's data.shuffle_seed for every run, so the seeds vary the initialisation
              only (give 'paired' to let seed k choose the data order too, as studies do by default);
  budget    - flops (total model FLOPs per run) or, when 0, reference_arm x reference_steps; optional kinds (e.g.
              ('model_flops', 'executed_flops')) to plan and report under several conventions side by side;
  num_evals - evaluations per run (0: keep base.train.eval_every).

Budget rule (studies/budget.py): steps(a) = max(1, round(budget / cost per step(a))), so any two arms differ by at
most one step's cost. Each run lives in <workdir>/<arm>/seed<k>/ (an ordinary moe_jax.train workdir): re-running
skips finished runs and resumes unfinished ones; a run dir started with a different config is refused. Output:
report.md, results.json and plots/*.png in the workdir.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from moe_jax.config import schema as config_lib
from moe_jax.model import flops
from moe_jax.studies import budget as budget_lib
from moe_jax.studies import plan as plan_lib
from moe_jax.studies import report as report_lib
from moe_jax.studies import runner

REPORT_FILE = report_lib.REPORT_FILE
RESULTS_FILE = report_lib.RESULTS_FILE
FORMULA = budget_lib.FORMULAS["model_flops"]
REPORT_FIELDS = report_lib.fields("validation")
run_one = runner.run_one


def to_study(cmp) -> ml_collections.ConfigDict:
    """The study a comparison config describes."""
    s = ml_collections.ConfigDict()
    s.name = str(cmp.get("name", "") or "comparison")
    s.base = cmp.base
    s.arms = cmp.arms
    s.arm_names = cmp.arm_names
    s.seeds = tuple(int(x) for x in cmp.seeds)
    orders = cmp.get("data_orders", None)
    s.data_orders = (int(cmp.base.data.shuffle_seed),) if orders is None else orders
    if cmp.get("lr_grid"):
        s.lr_grid = cmp.lr_grid
    b = cmp.budget
    s.budget = ml_collections.ConfigDict({
        "kinds": tuple(b.get("kinds", ("model_flops",))), "amount": float(b.get("flops", 0.0)),
        "reference_arm": b.get("reference_arm", ""), "reference_steps": int(b.get("reference_steps", 0))})
    s.num_evals = int(cmp.get("num_evals", 0))
    s.report_split = str(cmp.get("report_split", "auto"))
    if cmp.get("conclusions"):
        s.conclusions = cmp.conclusions
    return s


def arm_configs(cmp) -> dict[str, ml_collections.ConfigDict]:
    return plan_lib.arm_configs(to_study(cmp))


def plan(cmp) -> dict[str, dict]:
    """Steps per arm under the first budget convention: name -> {config, steps, budget, flops_per_token,
    tokens_per_step, flops_per_step, training_flops (model FLOPs), executed_flops, padding_flops, params}."""
    if len(list(cmp.seeds)) < 1:
        raise config_lib.ConfigError("config.seeds: give at least one seed (>= 3 for a verdict)")
    planned = plan_lib.plan(to_study(cmp))
    kind = planned["kinds"][0]
    out = {}
    for run in planned["runs"]:
        if run.kind != kind or run.arm in out:
            continue
        c = run.config
        out[run.arm] = {"config": c, "steps": run.steps, "budget": planned["budgets"][kind],
                        "flops_per_token": flops.run_flops_per_token(c),
                        "tokens_per_step": budget_lib.tokens_per_step(c), "flops_per_step": flops.flops_per_step(c),
                        "training_flops": run.costs["model_flops"], "executed_flops": run.costs["executed_flops"],
                        "padding_flops": run.costs["padding_flops"], "params": flops.param_counts(c.model)}
    return out


def run_dir(workdir: str, arm: str, seed) -> str:
    return os.path.join(workdir, arm, f"seed{seed}")


def run(cmp, workdir: str, command: str = "", devices=None) -> dict:
    """Plan, train every arm x seed (skipping finished runs, resuming unfinished ones), and write the report."""
    if len(list(cmp.seeds)) < 1:
        raise config_lib.ConfigError("config.seeds: give at least one seed (>= 3 for a verdict)")
    return runner.run_study(to_study(cmp), workdir, command or " ".join(sys.argv), devices=devices,
                            log=lambda m: print(m, flush=True))


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

    from moe_jax.train import cpu_pool

    cli.no_arguments(argv)
    cpu_pool.start()  # XLA:CPU's thread pool, so the rounding, the same however the process is pinned (taskset)
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    run(FLAGS.config, FLAGS.workdir, " ".join(["python -m moe_jax.compare"] + sys.argv[1:]))  # ConfigError: 2


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags)
