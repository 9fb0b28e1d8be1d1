"""Command line: train (or resume) a model.

    python -m moe_jax.train --config configs/moe.py --workdir runs/moe [--config.train.steps=100 ...]

The config is validated before anything heavy starts; a bad field exits with status 2 and a message naming it.
A workdir that already holds checkpoints is resumed from the latest one.
"""

from __future__ import annotations

import os

from absl import flags, logging

from moe_jax import cli, config_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program (importing this module defines none, so
    several CLI modules can be imported in one process, e.g. by the tests)."""
    cli.config_flag()
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots). Default: runs/<config.name>.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods and GPU "
                      "clusters: every host runs the same command; the coordinator is auto-detected on Cloud TPU/SLURM).")


def main(argv):
    cli.no_arguments(argv)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    config = config_lib.validate(FLAGS.config)  # a ConfigError exits with status 2 (cli.run)
    workdir = FLAGS.workdir or os.path.join("runs", config.name)
    if "://" in workdir:
        cli.fail(f"--workdir {workdir}: must be a local or mounted directory (config, metrics, plots and the "
                 "tokenizer are written through the filesystem); on a pod, mount the bucket on every host (gcsfuse, "
                 "e.g. --workdir /mnt/gcs/runs/moe) or use a shared filesystem")
    import jax
    if FLAGS.distributed:
        jax.distributed.initialize()
    from moe_jax import trainer  # heavy imports only after the config is known to be good
    summary = trainer.train(config, workdir)
    print(f"done: step {summary['step']}, workdir {workdir}, "
          f"val_loss {summary.get('val_loss', float('nan')):.4f}")


if __name__ == "__main__":
    cli.run(main, define_flags)
