"""Guards of a run directory before training writes to it: it is a writable directory, one trainer holds it, and a
resumed run's config does not silently change what the saved state means.

The lock: `<workdir>/train.lock`, held with fcntl.flock(LOCK_EX | LOCK_NB) for the life of the trainer and holding
JSON {host, pid, start} of the holder. The operating system releases a flock when its process dies (kill -9
included), so no stale lock is ever left: the file stays, only the flock counts. Multi-process runs: only process 0
takes it (the others write nothing of their own to the workdir).
Shared filesystems: flock is honoured across hosts on NFSv4 and Lustre (and on NFSv3 with lockd); on gcsfuse and
other object-store mounts it is local to the host, so two trainers on two hosts are NOT excluded there: start one
trainer per workdir yourself (see docs/reliability.md).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

import jax

from moe_jax.train import checkpoint as ckpt_lib
from moe_jax.config import schema as config_lib

WorkdirError = ckpt_lib.WorkdirError

# Fields a resumed run may change freely: they change cadence, logging, bookkeeping or the length of the run, not the
# shapes, the token stream or the meaning of the saved params and optimizer state. (train.steps also stretches the
# learning-rate schedule, which follows it: the change is printed.)
SAFE_FIELDS = (
    "name", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
    "train.keep_checkpoints", "train.async_checkpoint", "train.peak_tflops", "train.plots", "train.progress_bar",
    "train.inject_nan_at_step", "train.inject_nan_mode", "train.on_nonfinite", "train.max_skipped_steps",
    "data.cache_dir", "data.worker_count", "data.max_val_windows", "mesh.shape", "model.remat", "model.attention",
    "model.attention_block", "optim.ns_stack",  # stacking Newton-Schulz chains changes rounding only (tested 1e-6)
)
# Fields that change the shapes or structure of the saved state: no flag can allow them (the restore cannot work).
STRUCTURAL_FIELDS = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.d_ff", "model.mlp",
    "model.tie_embeddings", "moe.num_experts", "moe.d_ff", "moe.every", "optim.name", "optim.router_muon",
)


def lock(workdir: str):
    """Create `workdir` if needed, check it is a writable directory, and take its one-writer lock (process 0 only).
    Returns the open lock file descriptor (release: `unlock`) or None on other processes. Raises WorkdirError (one
    line naming the path and the fix) when the workdir is a file, not writable, or held by another trainer."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir}: is a file, not a directory; give a directory path (created if "
                           "missing)")
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, ckpt_lib.LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir}: cannot write there ({e.strerror}); choose a writable directory "
                           "or fix its permissions") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirError(f"--workdir {workdir}: cannot lock {path} ({e.strerror}); use a local or NFSv4 "
                               "directory") from e
        try:
            h = json.loads(holder)
            holder = f"host {h['host']}, pid {h['pid']}, started {h['start']}"
        except (ValueError, KeyError, TypeError):
            pass
        raise WorkdirError(f"--workdir {workdir}: another trainer is writing to it ({holder}); wait for it to "
                           f"finish, stop it, or use another --workdir") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "start": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def unlock(fd) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def flatten(d: dict, prefix: str = "") -> dict:
    """{'model': {'d_model': 64}} -> {'model.d_model': 64} (nested dicts to dotted keys)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _comparable(config) -> dict:
    return flatten(json.loads(config.to_json_best_effort()))


def _allowed(field: str, allow) -> bool:
    return any(field == a or field.startswith(a + ".") for a in allow)


def check_resume_config(saved, config, allow=(), log=print) -> list[str]:
    """Compare the config of a resumed run with the run's saved one (both ConfigDicts). Safe changes (SAFE_FIELDS) and
    those named in `allow` (fields or whole sections, e.g. ('optim.muon_lr', 'optim.adamw_lr') or ('optim',)) are
    printed through `log` and returned as 'field: old -> new' lines; any other change raises ConfigError listing
    every one as `field: old -> new` with the fix. STRUCTURAL_FIELDS cannot be allowed."""
    old, new = _comparable(saved), _comparable(config)
    changed = [(f, old.get(f, "<absent>"), new.get(f, "<absent>")) for f in sorted(set(old) | set(new))
               if old.get(f, "<absent>") != new.get(f, "<absent>")]
    structural = [c for c in changed if c[0] in STRUCTURAL_FIELDS]
    refused = [c for c in changed if c[0] not in SAFE_FIELDS and not _allowed(c[0], allow)]
    fmt = "; ".join
    if structural:
        raise config_lib.ConfigError(
            "resuming with a changed model: " + fmt(f"config.{f}: {o!r} -> {n!r}" for f, o, n in structural)
            + " changes the shapes of the saved state; undo the change or start a new --workdir")
    if refused:
        raise config_lib.ConfigError(
            "resuming with a changed config: " + fmt(f"config.{f}: {o!r} -> {n!r}" for f, o, n in refused)
            + " changes the data stream or the meaning of the saved state; undo it, start a new --workdir, or allow "
            "it deliberately with --allow_config_change=" + ",".join(f for f, _, _ in refused))
    lines = [f"config.{f}: {o!r} -> {n!r}" for f, o, n in changed]
    if lines:
        log("resuming with config changes: " + "; ".join(lines))
    return lines
