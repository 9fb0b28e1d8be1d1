"""Command line: evaluate a checkpoint on the fixed validation windows.

    python -m moe_jax.eval --workdir runs/moe [--step N] [--eval_batches 0]

Restores the orbax checkpoint (latest or --step) onto this machine's devices (the run's mesh when it fits, else all
devices data-parallel: a model trained on 8 devices evaluates on 1), and prints and writes
`eval_step<N>.json` with val_loss, val_accuracy, val_perplexity.
"""

from __future__ import annotations

import json
import os

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


def evaluate_workdir(workdir: str, step: int | None = None, eval_batches: int | None = None, devices=None,
                     split: str = "validation") -> dict:
    """Evaluate a run's checkpoint on its validation (or, split='test', its test) windows; writes and returns
    {val_loss, val_accuracy, val_perplexity, step, workdir, devices, split} (the keys keep the val_ prefix for either
    split)."""
    import jax

    from moe_jax import checkpoint as ckpt_lib, data, inference, train_step as step_lib

    config = ckpt_lib.load_config(workdir)
    config.data.tokenizer_path = os.path.join(workdir, ckpt_lib.TOKENIZER_FILE)
    if eval_batches is not None:
        config.train.eval_batches = eval_batches
    mesh = inference.inference_mesh(config, devices)
    graphdef, state, step = inference.restore_train_state(workdir, config, mesh, step)
    ds = data.build(config)
    batches = list(ds.eval_batches(config.train.batch_size, split))
    if config.train.eval_batches:
        batches = batches[:config.train.eval_batches]
    eval_like = step_lib.batch_like(batches[0], config.train.batch_size)
    eval_fn, shardings = step_lib.compile_eval_step(config, graphdef, state["params"], mesh, eval_like)
    with jax.set_mesh(mesh):
        result = step_lib.evaluate(eval_fn, state["params"], batches, shardings)
    result.update(step=step, workdir=workdir, devices=len(mesh.devices.flat), split=split)
    path = os.path.join(workdir, f"eval_step{step}.json" if split == "validation" else f"eval_{split}_step{step}.json")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    return result


def main(argv):
    cli.no_arguments(argv)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every restore at INFO and read-only mode at WARNING
    try:
        result = evaluate_workdir(FLAGS.workdir, FLAGS.step, FLAGS.eval_batches)
    except FileNotFoundError as e:
        cli.fail(str(e))
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    cli.run(main, define_flags)
