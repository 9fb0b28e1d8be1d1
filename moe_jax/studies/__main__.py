"""python -m moe_jax.studies --config configs/studies/<name>.py --workdir runs/studies/<name> (see __init__.py)."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moe_jax import config_lib
from moe_jax.studies import runner

config_flags.DEFINE_config_file("config", None, "A study config, e.g. configs/studies/dense_vs_moe.py.",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Directory of the study (one sub-directory per run).")
flags.DEFINE_bool("plan_only", False, "Print the plan (steps and costs per arm under each budget) and exit.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if FLAGS.plan_only:
            from moe_jax.studies import plan as plan_lib, report
            for line in report.describe_plan(plan_lib.plan(FLAGS.config, FLAGS.workdir, seconds_per_step={})
                                             if "wall_seconds" not in plan_lib.budget_kinds(FLAGS.config) else
                                             runner.plan_study(FLAGS.config, FLAGS.workdir)):
                print(line)
            return
        runner.run_study(FLAGS.config, FLAGS.workdir, " ".join(["python -m moe_jax.studies"] + sys.argv[1:]),
                         log=lambda m: print(m, flush=True))
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
