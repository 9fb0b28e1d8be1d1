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
from moe_jax.config import runs

WorkdirError = ckpt_lib.WorkdirError

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


def check_resume_config(saved, run, allow=(), log=print) -> list[str]:
    """Compare a resumed run's config (`run`, a RunConfig) with the workdir's saved config.json (`saved`): safe
    changes pass and are printed, others need `allow` (--allow_config_change), structural ones are refused
    (config.runs.check_resume: SAFE_FIELDS, STRUCTURAL_FIELDS)."""
    return runs.check_resume(saved, run, allow, log)
