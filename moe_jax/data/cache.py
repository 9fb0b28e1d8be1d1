"""The prepared-data cache: where it lives, atomic writes, integrity manifests and a per-source lock.

Layout (one directory per source, see docs/data.md):

    <cache_dir>/<source_key>/
        .lock                                   flock held while preparing (several processes on one host)
        tfds/moe_jax_text/1.0.0/...             array_record + dataset_info.json (sources 'bible' and 'files')
        tfds.manifest.json                      {"files": {relpath: {"size", "sha256"}}, ...} of that tree
        tokenizer-bpe<V>-val<F>.model           sentencepiece model trained on the training split
        tokenizer-bpe<V>-val<F>.manifest.json   size and sha256 of the .model
        stats-<model sha256[:12]>-<split>.json  document and token counts per split

`<cache_dir>` is `config.data.cache_dir`, else `$MOE_JAX_CACHE`, else `~/.cache/moe_jax`.

An artifact is valid only if its manifest exists, parses, and every listed file has the recorded size and SHA-256.
Manifests are written last, atomically (temporary file + `os.replace`), so a crash mid-preparation leaves no
manifest and the artifact is rebuilt; a file truncated or altered afterwards fails the check and is rebuilt too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

log = logging.getLogger("moe_jax.data")

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "moe_jax")
ENV_CACHE_DIR = "MOE_JAX_CACHE"


def cache_root(config) -> str:
    """config.data.cache_dir, else $MOE_JAX_CACHE, else ~/.cache/moe_jax (absolute, user-expanded). A path that is
    (or lies under) a file raises ConfigError naming where it came from and the fix (one line; exit status 2)."""
    from moe_jax.config.schema import ConfigError

    root = config.data.cache_dir or os.environ.get(ENV_CACHE_DIR) or DEFAULT_CACHE_DIR
    path = os.path.abspath(os.path.expanduser(root))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        origin = ("config.data.cache_dir" if config.data.cache_dir else
                  f"${ENV_CACHE_DIR}" if os.environ.get(ENV_CACHE_DIR) else "the default cache directory")
        raise ConfigError(f"{origin}: {root} is not a directory ({existing} is a file); give a directory (created "
                          f"if missing), e.g. --config.data.cache_dir=~/.cache/moe_jax")
    return path


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: str) -> Any | None:
    """The parsed JSON at `path`, or None when it is missing or unreadable (treated as absent, then rebuilt)."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def describe_files(paths: list[str], root: str) -> dict[str, dict[str, Any]]:
    """{path relative to root: {"size", "sha256"}} for manifests."""
    return {os.path.relpath(p, root): {"size": os.path.getsize(p), "sha256": file_sha256(p)} for p in sorted(paths)}


def write_manifest(manifest_path: str, paths: list[str], root: str, **extra) -> None:
    atomic_write_json(manifest_path, {"files": describe_files(paths, root), **extra})


def check_manifest(manifest_path: str, root: str) -> tuple[bool, str]:
    """(ok, reason). ok only if the manifest parses and every file matches its recorded size and sha256."""
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return False, f"no valid manifest at {manifest_path}"
    for rel, want in manifest["files"].items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return False, f"{path} is missing"
        size = os.path.getsize(path)
        if size != want.get("size"):
            return False, f"{path} has {size} bytes, the manifest says {want.get('size')}"
        if file_sha256(path) != want.get("sha256"):
            return False, f"{path} does not match its sha256"
    return True, "ok"


def remove(path: str) -> None:
    """Delete a file or a directory tree if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """Hold an exclusive flock on <directory>/.lock (released by the OS if the process dies)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
