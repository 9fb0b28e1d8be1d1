"""Command line: train (or resume) a model.

    python -m moe_jax.train --config configs/moe.py --workdir runs/moe [--config.train.steps=100 ...]

The config is parsed (validated, 'auto' resolved: config.typed.parse) before anything heavy starts; a bad field
exits with status 2 and a message naming it.
A workdir that already holds checkpoints is resumed from the newest intact one (--restore_step N: exactly step N;
newer steps are moved to checkpoints_set_aside/). Only safe config changes are accepted on resume
(--allow_config_change=optim.muon_lr,... allows others deliberately). One trainer per workdir (train.lock).

Exit status: 0 finished (or stopped by --config.train.steps being reached); 2 bad input (a config field, flag,
workdir, a changed config on resume, a workdir held by another trainer); 3 stopped by SIGTERM/SIGINT before
train.steps, after saving, or by a signal before the train loop began (nothing to save; resubmit the same command
to resume); 4 another process of a several-process job was lost (killed, out of memory: no heartbeat for 30 s;
resubmit the whole job); 1 anything else (a non-finite step, a failed save,
no usable checkpoint: one `error:` line; other failures with their traceback).

Several processes (one per host, or per GPU): run the same command everywhere with --distributed (Cloud TPU, SLURM
and Open MPI are auto-detected) or with --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from moe_jax import cli
from moe_jax.config import runs, typed
from moe_jax.train import cpu_pool, preemption

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program (importing this module defines none, so
    several CLI modules can be imported in one process, e.g. by the tests)."""
    cli.config_flag()
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots). Default: runs/<config.name>.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods and GPU "
                      "clusters: every host runs the same command; the coordinator is auto-detected on Cloud "
                      "TPU/SLURM).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator, for clusters JAX cannot "
                        "auto-detect (implies --distributed; JAX also reads JAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", None, "Number of JAX processes in the job (implies --distributed).")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (implies --distributed).")
    flags.DEFINE_integer("restore_step", None, "Resume from exactly this checkpoint step (default: the newest intact "
                         "one); newer steps are moved to <workdir>/checkpoints_set_aside/.")
    flags.DEFINE_list("allow_config_change", [], "Config fields (or sections) a resumed run may change beyond the "
                      "safe ones, e.g. optim.muon_lr,optim.adamw_lr or optim.")


def distributed_args(distributed: bool, coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> dict | None:
    """Keyword arguments for jax.distributed.initialize, or None for a single-process run. Any of the three flags
    implies a distributed run; flags left out stay None, so JAX auto-detects them (Cloud TPU, SLURM, Open MPI) or
    reads JAX_COORDINATOR_ADDRESS. Raises ValueError naming the flag when the given values cannot work."""
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if not distributed and all(v is None for v in explicit.values()):
        return None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: must be >= 1")
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise ValueError(f"--process_id={process_id}: must be in [0, --num_processes={num_processes})")
    if (num_processes is None) != (process_id is None):
        raise ValueError("--num_processes and --process_id: give both or neither (neither: auto-detected)")
    return explicit


def main(argv):
    watcher = preemption.SignalWatcher().start()  # from here on a signal ends the run with EXIT_PREEMPTED, one line
    cli.no_arguments(argv)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint operation at INFO
    config = cli.config_value()
    if FLAGS.restore_step is not None and FLAGS.restore_step < 0:
        cli.fail(f"--restore_step: must be a checkpoint step >= 0, got {FLAGS.restore_step}")
    if FLAGS.workdir is not None and not FLAGS.workdir.strip():
        cli.fail("--workdir: empty; give a directory (created if missing), or leave the flag out for "
                 f"runs/{config.name}")
    workdir = FLAGS.workdir or os.path.join("runs", config.name)
    if "://" in workdir:
        cli.fail(f"--workdir {workdir}: must be a local or mounted directory (config, metrics, plots and the "
                 "tokenizer are written through the filesystem); on a pod, mount the bucket on every host (gcsfuse, "
                 "e.g. --workdir /mnt/gcs/runs/moe) or use a shared filesystem")
    try:
        init_args = distributed_args(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
    except ValueError as e:
        cli.fail(str(e))
    if init_args is not None:  # before anything asks JAX for its backend (parse does, to resolve 'auto')
        from moe_jax.train import coordinator
        preemption.set_phase("connecting to the other processes")
        try:  # process 0 serves the coordination service from a child process, which outlives it
            coordinator.initialize(**init_args)
        except coordinator.ServiceError as e:
            cli.fail(f"--coordinator_address: {e}: is its port taken? choose a free one")
        watcher.install()  # initialize replaced the SIGTERM handler with its coordination client's own
        watchdog = preemption.PeerWatchdog().start()  # a lost process ends the others in one line (EXIT_PEER_LOST)
    preemption.set_phase("starting the backend")
    cpu_pool.start()  # XLA:CPU's thread pool, so the rounding, the same however the process is pinned
    preemption.set_phase("checking the config")
    run = typed.parse(config)  # the one validation; a ConfigError exits with status 2 (cli.run)
    runs.check_allow(FLAGS.allow_config_change, run)
    from moe_jax.train import checkpoint as ckpt_lib
    from moe_jax.train import loop as trainer  # heavy imports only after the config is known to be good
    try:
        summary = trainer.train(run, workdir, restore_step=FLAGS.restore_step,
                                allow_config_change=FLAGS.allow_config_change)
    except ckpt_lib.WorkdirError as e:  # (a ConfigError, e.g. a refused config change, exits 2 through cli.run)
        cli.fail(str(e))
    except (ckpt_lib.CheckpointError, trainer.NonFiniteError) as e:
        cli.fail(str(e), cli.EXIT_ERROR)
    except Exception:
        if init_args is not None:  # a collective failing because a peer died: the watchdog names it and exits
            watchdog.settle()
        raise
    print(f"done: step {summary['step']}, workdir {workdir}, "
          f"val_loss {summary.get('val_loss', float('nan')):.4f}; {trainer.tensorboard_hint(workdir)}")
    if summary.get("stop_reason") and not summary["finished"]:
        sys.exit(trainer.EXIT_PREEMPTED)  # stopped by a signal/maintenance event after saving: resubmit to resume


if __name__ == "__main__":
    cli.run(main, define_flags)
