"""Command line: evaluate a checkpoint on the fixed validation windows.

    python -m moe_jax.eval --workdir runs/moe [--step N] [--eval_batches 0]

Restores the orbax checkpoint (the newest intact step, or --step) onto this machine's devices (the run's mesh when it
fits, else all devices data-parallel: a model trained on 8 devices evaluates on 1), prints the result first, then
writes `eval_step<N>.json` with val_loss, val_accuracy, val_perplexity, val_tokens (the scored target tokens) and
`eval_step<N>_docs.npz` with every validation document's scored tokens and summed loss (a workdir it cannot write to
is a warning). With the run's data.max_val_windows = 0 and --eval_batches 0 every target token of the split is
scored exactly once (data/pipeline.py, tile_windows).
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


def result_paths(workdir: str, split: str, step: int) -> tuple[str, str]:
    """(the evaluation's JSON, its per-document .npz) in `workdir`: eval_step<N>.json (validation) or
    eval_<split>_step<N>.json, and the same name ending in _docs.npz instead of .json."""
    name = f"eval_step{step}" if split == "validation" else f"eval_{split}_step{step}"
    return os.path.join(workdir, name + ".json"), os.path.join(workdir, name + "_docs.npz")


def write_result(workdir: str, result: dict, docs: dict | None = None) -> str | None:
    """Write the evaluation's JSON (`result_paths`) into the workdir (process 0), and first, when given, its
    per-document arrays `docs` as the .npz beside it (so a JSON never names a file not yet written); a workdir that
    cannot be written to (read-only mount, permissions, disk full) gives a one-line warning on stderr instead of an
    error. Returns the JSON's path or None."""
    import jax
    import numpy as np

    if jax.process_index() != 0:
        return None
    path, docs_path = result_paths(workdir, result.get("split", "validation"), result["step"])
    try:
        if docs is not None:
            with open(docs_path + ".tmp", "wb") as f:
                np.savez(f, **docs)
            os.replace(docs_path + ".tmp", docs_path)
        with open(path, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    except OSError as e:
        print(f"warning: could not write {path} ({e.strerror or e}); the result above is not saved", file=sys.stderr)
        return None
    return path


def evaluate_run(workdir: str, step: int | None = None, eval_batches: int | None = None, devices=None,
                 split: str = "validation", whole_split: bool = False) -> tuple[dict, dict]:
    """Evaluate a run's checkpoint on its validation (or, split='test', its test) windows, per document
    (step.evaluate_documents). whole_split: every target token of the split exactly once, whatever the run's
    data.max_val_windows and train.eval_batches (both set to 0). Returns (result, docs): result {val_loss,
    val_accuracy, val_perplexity, val_tokens (the scored target tokens), documents, whole_split, seq_len, doc_losses
    (the .npz's file name), step, workdir, devices, split} (the keys keep the val_ prefix for either split); docs
    {'tokens' int64, 'loss_sum' float64 (nats), 'doc_ids' int64 (the source's document indices)}, one entry per
    document of the split in split order."""
    import jax

    from moe_jax.train import checkpoint as ckpt_lib
    from moe_jax import data
    from moe_jax.train import restore as inference
    from moe_jax.train import step as step_lib

    run = ckpt_lib.load_run(workdir)
    train = {"eval_batches": 0} if whole_split else {} if eval_batches is None else {"eval_batches": eval_batches}
    run = run.replace(data={"tokenizer_path": os.path.join(workdir, ckpt_lib.TOKENIZER_FILE)}
                      | ({"max_val_windows": 0} if whole_split else {}), train=train)
    mesh = inference.inference_mesh(run.mesh, devices)
    graphdef, state, step = inference.restore_train_state(workdir, run, mesh, step)
    ds = data.build(run)
    batches = list(ds.eval_batches(run.train.batch_size, split))
    if run.train.eval_batches:
        batches = batches[:run.train.eval_batches]
    doc_ids = ds.doc_ids(split)
    eval_like = step_lib.batch_like(batches[0], run.train.batch_size, step_lib.BATCH_KEYS + (step_lib.DOC_KEY,))
    eval_fn, shardings = step_lib.compile_eval_step(graphdef, state["params"], mesh, eval_like, per_token=True)
    with jax.set_mesh(mesh):
        result, docs = step_lib.evaluate_documents(eval_fn, state["params"], batches, shardings, len(doc_ids))
    result.update(step=step, workdir=workdir, devices=len(mesh.devices.flat), split=split, documents=len(doc_ids),
                  whole_split=run.data.max_val_windows == 0 and run.train.eval_batches == 0,
                  seq_len=run.train.seq_len, doc_losses=os.path.basename(result_paths(workdir, split, step)[1]))
    return result, docs | {"doc_ids": doc_ids}


def evaluate_workdir(workdir: str, step: int | None = None, eval_batches: int | None = None, devices=None,
                     split: str = "validation", write: bool = True, whole_split: bool = False) -> dict:
    """`evaluate_run`'s result; with `write`, also writes it and its per-document .npz (write_result)."""
    result, docs = evaluate_run(workdir, step, eval_batches, devices, split, whole_split)
    if write:
        write_result(workdir, result, docs)
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
        result, docs = evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.eval_batches)
    except FileNotFoundError as e:
        cli.fail(str(e))
    except ckpt_lib.CheckpointError as e:
        cli.fail(str(e), cli.EXIT_ERROR)
    print(json.dumps(result, indent=2, sort_keys=True), flush=True)  # the result first, whatever happens next
    write_result(FLAGS.workdir, result, docs)


if __name__ == "__main__":
    cli.run(main, define_flags)
