"""Checkpoints (orbax) and the run directory.

Layout of a workdir:
  config.json       the resolved, validated config (written before training starts)
  tokenizer.model   the sentencepiece model the run was trained with
  checkpoints/<step>/{state,data,meta}
                    state: {'params', 'opt_state', 'step', 'rng'} (orbax StandardSave, restorable into any mesh);
                    data:  the grain train-iterator state (exact resume of the token order);
                    meta:  JSON (step, tokens seen, wall time, validation loss when evaluated at that step).
Kept: the last `train.keep_checkpoints` steps plus the best one by validation loss (orbax preservation policies).
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save never damages an
earlier checkpoint; a half-written step is ignored on restore.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from moe_jax import config_lib

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"


def write_run_files(workdir: str, config, tokenizer_path: str | None) -> None:
    """Write config.json and copy the tokenizer into the workdir (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))
    if tokenizer_path:
        dst = os.path.join(workdir, TOKENIZER_FILE)
        if os.path.abspath(tokenizer_path) != os.path.abspath(dst):
            shutil.copyfile(tokenizer_path, dst + ".tmp")
            os.replace(dst + ".tmp", dst)


def _tuples(x):
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _fill_defaults(saved: dict, defaults: ml_collections.ConfigDict) -> dict:
    """`saved` with every field of `defaults` it lacks added (recursively)."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
        elif isinstance(v, ml_collections.ConfigDict) and isinstance(out[k], dict):
            out[k] = _fill_defaults(out[k], v)
    return out


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's saved config. Fields added to the schema after the run was written take their defaults from
    config_lib.base_config() (so an older run still restores for eval and generation)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by moe_jax.train")
    with open(path) as f:
        saved = _tuples(json.load(f))
    return ml_collections.ConfigDict(_fill_defaults(saved, config_lib.base_config()))


class Checkpointer:
    """One orbax CheckpointManager for a run: save, restore the latest (or a given) step, keep last K + best."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=async_save,
                                               preservation_policy=policy)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_args=None, meta: dict | None = None, val_loss: float | None = None,
             force: bool = True) -> None:
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_args is not None:
            items["data"] = data_args
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, abstract_state, step: int | None = None, data_args=None) -> tuple[Any, dict, int]:
        """Restore `state` into the shardings of `abstract_state` (ShapeDtypeStructs with .sharding), the meta JSON,
        and the data iterator in place when `data_args` (restore args) is given. Returns (state, meta, step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_args is not None:
            items["data"] = data_args
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], dict(out["meta"] or {}), step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

