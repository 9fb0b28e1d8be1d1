"""python -m moe_jax.studies --config configs/studies/<name>.py[:tiny] --workdir runs/studies/<name> (see
__init__.py). Bad configs end with one 'error:' line and exit status 2 (moe_jax/cli.py)."""

import sys

from absl import flags, logging

from moe_jax import cli
from moe_jax.studies import plan as plan_lib
from moe_jax.studies import report, runner
from moe_jax.train import cpu_pool, preemption


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program (see moe_jax/cli.py)."""
    cli.config_flag(help_text="A study config, e.g. configs/studies/dense_vs_moe.py (':tiny' for its tiny scale); "
                    "override its fields with --config.x.y=value.")
    flags.DEFINE_string("workdir", None, "Directory of the study (one sub-directory per run).")
    flags.DEFINE_bool("plan_only", False, "Print the plan (steps and costs per arm under each budget) and exit "
                      "(a wall_seconds budget calibrates first).")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    cli.no_arguments(argv)
    cpu_pool.start()  # XLA:CPU's thread pool, so the rounding, the same however the process is pinned (taskset)
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.plan_only:
        planned = (runner.plan_study(FLAGS.config, FLAGS.workdir)
                   if "wall_seconds" in plan_lib.budget_kinds(FLAGS.config) else plan_lib.plan(FLAGS.config,
                                                                                                FLAGS.workdir))
        for line in report.describe_plan(planned):
            print(line)
        return
    try:
        runner.run_study(FLAGS.config, FLAGS.workdir, " ".join(["python -m moe_jax.studies"] + sys.argv[1:]),
                         log=lambda m: print(m, flush=True))  # ConfigError: exit 2
    except runner.StudyStopped as e:  # a signal stopped a run after saving it: resubmit to resume, as for train
        print(f"study stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_PREEMPTED)


if __name__ == "__main__":
    cli.run(main, define_flags)
