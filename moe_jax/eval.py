"""Command line: evaluate a checkpoint on the fixed validation windows.

    python -m moe_jax.eval --workdir runs/moe [--step N] [--eval_batches 0]

Restores the orbax checkpoint (the newest intact step, or --step) onto this machine's devices (the run's mesh when it
fits, else all devices data-parallel: a model trained on 8 devices evaluates on 1), prints the result first, then
writes `eval_step<N>.json` with val_loss, val_accuracy, val_perplexity (a workdir it cannot write to is a warning).
Exit status: 0 done, 2 bad input (a flag value, no run at --workdir, no such --step), 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags, logging

from moe_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program (importing this module defines none, so
    several CLI modules can be imported in one process, e.g. by the tests)."""
    flags.DEFINE_string("workdir", None, "Run directory written by moe_jax.train.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("eval_batches", None, "Validation batches (default: the run's train.eval_batches; 0 = all).")
    flags.mark_flags_as_required(["workdir"])


def write_result(workdir: str, result: dict) -> str | None:
    """Write `eval_step<N>.json` (validation) or `eval_<split>_step<N>.json` into the workdir (process 0); a workdir
    that cannot be written to (read-only mount, permissions, disk full) gives a one-line warning on stderr instead of
    an error. Returns the path or None."""
    import jax

    if jax.process_index() != 0:
        return None
    split, step = result.get("split", "validation"), result["step"]
    path = os.path.join(workdir, f"eval_step{step}.json" if split == "validation" else f"eval_{split}_step{step}.json")
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    except OSError as e:
        print(f"warning: could not write {path} ({e.strerror or e}); the result above is not saved", file=sys.stderr)
        return None
    return path


def evaluate_workdir(workdir: str, step: int | None = None, eval_batches: int | None = None, devices=None,
                     split: str = "validation", write: bool = True) -> dict:
    """Evaluate a run's checkpoint on its validation (or, split='test', its test) windows; returns {val_loss,
    val_accuracy, val_perplexity, step, workdir, devices, split} (the keys keep the val_ prefix for either split) and,
    with `write`, also writes it (write_result)."""
    import jax

    from moe_jax.train import checkpoint as ckpt_lib
    from moe_jax import data
    from moe_jax.train import restore as inference
    from moe_jax.train import step as step_lib

    run = ckpt_lib.load_run(workdir)
    run = run.replace(data={"tokenizer_path": os.path.join(workdir, ckpt_lib.TOKENIZER_FILE)},
                      train={} if eval_batches is None else {"eval_batches": eval_batches})
    mesh = inference.inference_mesh(run.mesh, devices)
    graphdef, state, step = inference.restore_train_state(workdir, run, mesh, step)
    ds = data.build(run)
    batches = list(ds.eval_batches(run.train.batch_size, split))
    if run.train.eval_batches:
        batches = batches[:run.train.eval_batches]
    eval_like = step_lib.batch_like(batches[0], run.train.batch_size)
    eval_fn, shardings = step_lib.compile_eval_step(graphdef, state["params"], mesh, eval_like)
    with jax.set_mesh(mesh):
        result = step_lib.evaluate(eval_fn, state["params"], batches, shardings)
    result.update(step=step, workdir=workdir, devices=len(mesh.devices.flat), split=split)
    if write:
        write_result(workdir, result)
    return result


def main(argv):
    cli.no_arguments(argv)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every restore at INFO and read-only mode at WARNING
    if FLAGS.eval_batches is not None and FLAGS.eval_batches < 0:
        cli.fail(f"--eval_batches: must be >= 0 (0 = the whole validation set), got {FLAGS.eval_batches}")
    if FLAGS.step is not None and FLAGS.step < 0:
        cli.fail(f"--step: must be a checkpoint step >= 0, got {FLAGS.step}")
    from moe_jax.train import checkpoint as ckpt_lib

    try:
        result = evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.eval_batches, write=False)
    except FileNotFoundError as e:
        cli.fail(str(e))
    except ckpt_lib.CheckpointError as e:
        cli.fail(str(e), cli.EXIT_ERROR)
    print(json.dumps(result, indent=2, sort_keys=True), flush=True)  # the result first, whatever happens next
    write_result(FLAGS.workdir, result)


if __name__ == "__main__":
    cli.run(main, define_flags)
