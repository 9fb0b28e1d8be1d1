"""Restoring a trained model for evaluation and generation, on whatever devices are here.

A checkpoint saved from any mesh restores onto `inference_mesh(run.mesh)`: the run's own mesh when it fits the devices
here, else all devices on 'data' (a model trained on 8 devices evaluates and generates on 1).
"""

from __future__ import annotations

import os
import sys

import jax

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax import data
from moe_jax.model import transformer as model_lib
from moe_jax.optim import chain as optimizer_lib
from moe_jax import sharding as sharding_lib
from moe_jax.train import step as step_lib


def inference_mesh(mesh, devices=None):
    """The run's mesh (a MeshConfig) when it fits the devices here, else all devices on 'data' (e.g. trained on 8,
    run on 1)."""
    try:
        return sharding_lib.build_mesh(mesh, devices)
    except ValueError:
        return sharding_lib.build_mesh((-1, 1, 1), devices)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


def restore_train_state(workdir: str, run, mesh, step: int | None = None, log=_note):
    """Restore the full train state of `workdir` (the newest intact step, or exactly `step`) onto `mesh`, whatever
    mesh it was saved from, through checkpoint.restore_verified (a damaged step is named in one `log` line and the
    previous one is tried; nothing in the workdir is moved). `run`: the run's RunConfig. Returns (graphdef, state,
    step)."""
    graphdef, abstract_nnx = model_lib.abstract(run.model)
    target = step_lib.abstract_train_state(abstract_nnx, optimizer_lib.build(run.optim, run.train.steps), mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        with jax.set_mesh(mesh):
            state, _, step = ckpt_lib.restore_verified(checkpointer, target, step=step, log=log)
    finally:
        checkpointer.close()
    return graphdef, state, step


def load_for_inference(workdir: str, step: int | None = None, mesh=None, run=None):
    """(run, graphdef, params, tokenizer, step) from a run directory, for evaluation and generation (run: its
    config.json parsed, checkpoint.load_run, unless the caller has already parsed it)."""
    run = ckpt_lib.load_run(workdir) if run is None else run
    mesh = inference_mesh(run.mesh) if mesh is None else mesh
    graphdef, state, step = restore_train_state(workdir, run, mesh, step)
    tokenizer = data.load_tokenizer(os.path.join(workdir, ckpt_lib.TOKENIZER_FILE))
    return run, graphdef, state["params"], tokenizer, step
