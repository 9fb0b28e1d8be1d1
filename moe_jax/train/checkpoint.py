"""Checkpoints (orbax) and the run directory.

Layout of a workdir:
  config.json       the resolved, validated config (RunConfig.config_json; written before training starts)
  tokenizer.model   the sentencepiece model the run was trained with
  config_history.jsonl  every config the run was started or resumed with (one JSON line each, with the step)
  checkpoint_errors.log  orbax's tracebacks of a failed save (the error itself is one line)
  train.lock        the one-writer lock (fcntl.flock; JSON: host, pid, start time of the holder)
  checkpoints/<step>/{state,data,meta,fingerprint.json}
                    state: {'params', 'opt_state', 'step', 'rng'} (orbax StandardSave, restorable into any mesh);
                    data:  the grain train-iterator state (exact resume of the token order);
                    meta:  JSON (step, tokens seen, wall time, validation loss when evaluated at that step);
                    fingerprint.json: sha256 and size of every other file of the step, written after orbax finalized
                    the step (for an async save: as soon as the trainer sees it finished, at the latest at the next
                    save or at close).
  fingerprints_required   JSON {"since_step": N}: written when the run saves its first fingerprinted step N; from
                    then on a step >= N without fingerprint.json is treated as damaged (deleting the fingerprints does
                    not make a run restore unverified).
  checkpoints_set_aside/<step>.<time>
                    steps restore found damaged, or newer than an explicit `--restore_step`, moved out of the way so
                    the resumed run can save those steps again (kept for inspection; delete them by hand).
Kept: the last `train.keep_checkpoints` steps plus the best one by validation loss (orbax preservation policies).
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save never damages an
earlier checkpoint; a half-written step is ignored on restore.

Restore (`restore_verified`, used by train, eval and generate) tries the newest step first and checks it against its
fingerprint; a step that is incomplete, damaged (a file missing, truncated or with changed bytes) or fails to restore
is named in one line with the reason and the next older step is tried. A step without fingerprint.json is a save that
did not complete (killed between orbax's rename and the fingerprint) and is skipped, when the run requires fingerprints:
when fingerprints_required says so for that step, or (runs from before the marker) any step has a fingerprint. Else
(a run written before fingerprints existed) it restores unverified, and one warning line says so.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from moe_jax.config import schema as config_lib
from moe_jax.data import cache as cache_lib

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"
SET_ASIDE_DIR = "checkpoints_set_aside"
FINGERPRINT_FILE = "fingerprint.json"
FINGERPRINTS_MARKER = "fingerprints_required"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = "train.lock"
ERRORS_FILE = "checkpoint_errors.log"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or no checkpoint could be restored; the message is one line naming the path."""


class WorkdirError(ValueError):
    """The workdir cannot be used (not a directory, not writable, locked by another trainer): one line with the fix."""


def write_run_files(workdir: str, run, tokenizer_path: str | None, step: int | None = None) -> None:
    """Write config.json, append it to config_history.jsonl (with the step it starts from) and copy the tokenizer into
    the workdir (process 0 only). `run`: the config.typed.RunConfig (config.json holds its resolved values). The
    trainer calls this only after a successful restore (or a fresh start)."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    text = run.config_json()
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))
    if step is not None:
        with open(os.path.join(workdir, CONFIG_HISTORY_FILE), "a") as f:
            f.write(json.dumps({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                "start_step": step, "config": json.loads(text)}, sort_keys=True) + "\n")
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


def _last_history_config(workdir: str) -> tuple[dict, int] | None:
    """(config, start step) of the last line of config_history.jsonl, or None when there is none that parses."""
    try:
        with open(os.path.join(workdir, CONFIG_HISTORY_FILE)) as f:
            lines = [x for x in f.read().splitlines() if x.strip()]
        last = json.loads(lines[-1])
        return dict(last["config"]), int(last["start_step"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def load_config(workdir: str, warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
                ) -> ml_collections.ConfigDict:
    """The run's saved config. Fields added to the schema after the run was written take their defaults from
    config_lib.base_config() (so an older run still restores for eval and generation). A config.json that is not
    valid JSON (a damaged disk, a hand edit) falls back to the last config of config_history.jsonl (the same config
    written at the last start) with one `warn` line; when that does not parse either, ConfigError (one line)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by moe_jax.train")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        fallback = _last_history_config(workdir)
        if fallback is None:
            raise config_lib.ConfigError(
                f"{path} is not valid JSON ({_one_line(e)}) and {CONFIG_HISTORY_FILE} has no readable config "
                "either; restore config.json from a backup, or start a new --workdir") from e
        saved, start = fallback
        warn(f"warning: {path} is not valid JSON ({_one_line(e)}); using the last config of {CONFIG_HISTORY_FILE} "
             f"(the run's start at step {start})")
    return ml_collections.ConfigDict(_fill_defaults(_tuples(saved), config_lib.base_config()))


def load_run(workdir: str, backend: str | None = None,
             warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)):
    """The run's saved config (load_config: its fallback to config_history.jsonl, `warn`ed) parsed
    (config.typed.parse) into a RunConfig for this backend. An implementation the run chose for another backend
    (attention 'cudnn' in a GPU run's config.json) is kept: the model falls back where it cannot run
    (layers.cudnn_attention), so a run trained on a GPU still evaluates and generates elsewhere."""
    from moe_jax.config import typed

    return typed.parse(load_config(workdir, warn), backend, check_backend=False)


def fingerprint(step_dir: str) -> dict:
    """{relative path: {'size', 'sha256'}} of every file under `step_dir` but the fingerprint itself."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
    return cache_lib.describe_files(
        [p for p in paths if not os.path.relpath(p, step_dir).startswith(FINGERPRINT_FILE)], step_dir)


def write_fingerprint(step_dir: str) -> None:
    """Write `<step_dir>/fingerprint.json` atomically (temporary file, fsync, rename)."""
    tmp = os.path.join(step_dir, FINGERPRINT_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": fingerprint(step_dir)}, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, FINGERPRINT_FILE))


def check_fingerprint(step_dir: str, required: bool = True) -> str | None:
    """None when the files of `step_dir` match its fingerprint (or it has none and `required` is False), else the
    reason, e.g. 'state/_METADATA is missing' or 'state/d/abc has 1234 bytes, 4096 when saved (truncated)'."""
    if not os.path.isdir(step_dir):
        return "the step directory is missing"
    path = os.path.join(step_dir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        return "no fingerprint.json (the save did not complete)" if required else None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"fingerprint.json is unreadable ({e})"
    for rel, want in sorted(files.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.exists(p):
            return f"{rel} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} when saved (truncated or overwritten)"
        if cache_lib.file_sha256(p) != want["sha256"]:
            return f"{rel} differs from its fingerprint (sha256): the bytes changed after the save"
    return None


def _marker_path(checkpoint_dir: str) -> str:
    return os.path.join(os.path.dirname(checkpoint_dir), FINGERPRINTS_MARKER)


def fingerprints_required_since(checkpoint_dir: str) -> int | None:
    """The first step of the run saved with a fingerprint (from the workdir's fingerprints_required marker), or None
    when the run never wrote one. An unreadable marker requires fingerprints for every step (0)."""
    path = _marker_path(checkpoint_dir)
    if not os.path.exists(path):
        return None
    data = cache_lib.read_json(path)
    since = data.get("since_step") if isinstance(data, dict) else None
    return since if isinstance(since, int) else 0


class _OrbaxErrors(logging.Filter):
    """Holds back orbax's ERROR records (a failed save logs its traceback from each background thread: 100-300 lines
    for one disk-full) while a Checkpointer is open: the Checkpointer reports the failure in one line and writes these
    records to checkpoint_errors.log; records of a checkpointer that did not fail are logged at close."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.records.append(record)
            return False
        return True


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


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
        self.async_save = async_save
        self._unfingerprinted: list[int] = []  # saved steps whose fingerprint is not written yet
        self._failed = False  # a CheckpointError was raised: close() adds nothing to it
        self._last_save = 0  # the step of the newest save() call
        self._orbax_errors = _OrbaxErrors()
        logging.getLogger("absl").addFilter(self._orbax_errors)

    def _save_failed(self, step: int, e: BaseException, noticed: str = "") -> CheckpointError:
        """The one-line error of a failed save of `step`; orbax's held-back tracebacks go to checkpoint_errors.log
        (named in the line when it could be written: the disk may be full)."""
        self._failed = True
        details = ""
        if self._orbax_errors.records and jax.process_index() == 0:
            path = os.path.join(os.path.dirname(self.directory), ERRORS_FILE)
            formatter = logging.Formatter("%(asctime)s %(levelname)s %(pathname)s:%(lineno)d %(message)s")
            try:
                with open(path, "a") as f:
                    f.writelines(formatter.format(r) + "\n" for r in self._orbax_errors.records)
                details = f"; orbax's tracebacks in {path}"
            except OSError:
                pass
            self._orbax_errors.records.clear()
        return CheckpointError(f"saving step {step} to {self.step_dir(step)} failed ({_one_line(e)}{noticed}); free "
                               f"disk space or fix the permissions of {self.directory}, then rerun to resume from "
                               f"step {self.latest_finished()}{details}")

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

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
        self.poll(block=True)  # the previous save's failure surfaces here at the latest, its fingerprint is written
        self._last_save = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
        except Exception as e:
            raise self._save_failed(step, e) from e
        self._unfingerprinted.append(step)
        if not self.async_save:
            self.poll(block=True)

    def latest_finished(self) -> int | None:
        """The newest step whose save completed and whose fingerprint is written."""
        done = [s for s in self.all_steps() if s not in self._unfingerprinted
                and os.path.exists(os.path.join(self.step_dir(s), FINGERPRINT_FILE))]
        return max(done) if done else None

    def poll(self, block: bool = False, step: int | None = None) -> None:
        """Finish the bookkeeping of completed saves: raise CheckpointError if an async save failed (called every
        step by the trainer, so a failure is reported at the step it is noticed), and write the fingerprint of every
        step whose save has completed. `block`: wait for a save in progress first. `step`: the train step now (named in
        the error)."""
        if not self._unfingerprinted:
            return
        if not block and self.manager.is_saving_in_progress():
            return
        steps, self._unfingerprinted = self._unfingerprinted, []
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(steps[-1], e, "" if step is None else f"; noticed at step {step}") from e
        if jax.process_index() == 0:
            for s in steps:
                if os.path.isdir(self.step_dir(s)):  # a step deleted meanwhile by the keep policy has no fingerprint
                    write_fingerprint(self.step_dir(s))
                    if fingerprints_required_since(self.directory) is None:
                        cache_lib.atomic_write_json(_marker_path(self.directory), {"since_step": s})

    def set_aside(self, step: int, workdir: str) -> str:
        """Move step `step` out of checkpoints/ into checkpoints_set_aside/<step>.<time> (process 0), so it can be
        saved again; returns the new path."""
        dst = os.path.join(workdir, SET_ASIDE_DIR, f"{step}.{time.strftime('%Y%m%dT%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(self.step_dir(step), dst)
        self.manager.reload()
        return dst

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
        """Finish the saves in progress and close orbax. After a CheckpointError was raised, orbax's own errors on
        closing (the same failed save, re-raised) are dropped rather than replacing that one-line error."""
        try:
            self.poll(block=True)
        finally:
            try:
                self.manager.close()
            except Exception as e:
                if not self._failed:
                    raise self._save_failed(self._last_save, e) from e
            finally:
                logging.getLogger("absl").removeFilter(self._orbax_errors)
                for record in self._orbax_errors.records:  # errors of saves that did not fail: not hidden
                    logging.getLogger("absl").handle(record)


def restore_verified(checkpointer: Checkpointer, abstract_state, step: int | None = None, data_args=None,
                     log: Callable[[str], None] = print, workdir: str | None = None) -> tuple[Any, dict, int]:
    """Restore the newest intact step (or exactly `step`) of `checkpointer`: the one function train, eval and generate
    restore through. Each candidate is checked against its fingerprint, then restored; a step that is incomplete,
    damaged or fails to restore is named in one `log` line with the reason and the next older step is tried (with an
    explicit `step`, CheckpointError instead). `workdir` given (train): the skipped steps, and with an explicit `step`
    every newer step, are moved to checkpoints_set_aside/ once a step restored, so the run can save them again.
    Returns (state, meta, step) as Checkpointer.restore."""
    steps = sorted(checkpointer.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpointer.directory}; have {sorted(steps)}")
    # Fingerprints are required from the run's first fingerprinted step on (the marker), or, for a run from before the
    # marker, once it has any; steps of a run from before fingerprints restore unverified, with one warning line.
    since = fingerprints_required_since(checkpointer.directory)
    any_fingerprint = any(os.path.exists(os.path.join(checkpointer.step_dir(s), FINGERPRINT_FILE)) for s in steps)
    skipped, any_unverified = [], False
    for s in ([step] if step is not None else steps):
        required = any_fingerprint if since is None else s >= since
        reason = check_fingerprint(checkpointer.step_dir(s), required)
        if reason is None and not os.path.exists(os.path.join(checkpointer.step_dir(s), FINGERPRINT_FILE)) \
                and not any_unverified:
            any_unverified = True
            log(f"warning: checkpoint {checkpointer.step_dir(s)} has no {FINGERPRINT_FILE} (saved before "
                "fingerprints existed): restoring unverified, damaged bytes can go unnoticed (training on from it "
                "writes fingerprints)")
        if reason is None:
            try:
                out = checkpointer.restore(abstract_state, s, data_args)
            except Exception as e:  # orbax/tensorstore errors on damage the fingerprint cannot see (legacy runs)
                reason = f"restore failed ({_one_line(e)})"
            else:
                if workdir is not None:
                    for bad in skipped + [n for n in steps if n > s and n not in skipped]:
                        log(f"set aside step {bad}: moved to {checkpointer.set_aside(bad, workdir)}")
                return out
        if step is not None:
            raise CheckpointError(f"checkpoint {checkpointer.step_dir(s)} is unusable: {reason}; choose another "
                                  f"step of {sorted(steps)} or leave the step flag out to take the newest intact one")
        log(f"checkpoint {checkpointer.step_dir(s)} is unusable: {reason}; trying the previous step")
        skipped.append(s)
    raise CheckpointError(f"no usable checkpoint in {checkpointer.directory}: all of steps {sorted(steps)} are "
                          "damaged (see above); restore the directory from a backup or start a new --workdir")

