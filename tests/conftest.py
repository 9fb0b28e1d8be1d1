"""Test session setup and shared fixtures.

- 8 simulated CPU devices (set before JAX is imported), so sharding tests see a real mesh. Tests that want one
  device pass `devices=jax.devices()[:1]` (or a mesh shape of (1, 1, 1)) explicitly.
- JAX's persistent compilation cache in <repo>/.cache/jax (ignored by git), for this process and the command-line
  subprocesses the tests start (through the environment), with the thresholds at zero so the small CPU programs of
  the tests are cached too: a second run of the suite loads them instead of compiling.
- `load_config`: configs/<name>.py through the repository's one config loader (moe_jax.cli.load_config_file);
  tests/smoke_helpers.py's `config_dict` / `run_config` add overrides and parse.
- `smoke_run`: ONE smoke run (configs/smoke.py, 4 steps, a checkpoint and an evaluation at step 4) trained once per
  session and shared by every test that needs a trained checkpoint; tests read it and must not change it.
- The `slow` marker (pytest.ini): long end-to-end runs, multi-config comparisons and subprocess tests of training.
  The quick check is `python -m pytest -q -m "not slow"`; the full suite `python -m pytest -q tests`.
"""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Read by JAX at import, here and in subprocesses (they inherit the environment).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))

from moe_jax import cli  # noqa: E402


def config(name: str):
    """configs/<name>.py's get_config(), through the one loader."""
    return cli.load_config_file(CONFIGS / f"{name}.py")


@pytest.fixture(scope="session")
def load_config():
    """name -> configs/<name>.py's get_config() (a fresh ConfigDict per call)."""
    return config


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """The data/tokenizer cache: $MOE_JAX_CACHE when set (reused between runs), else a session temporary dir."""
    return os.environ.get("MOE_JAX_CACHE") or str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_cache) -> dict:
    """The shared trained run: {'workdir', 'config' (its RunConfig), 'summary'} of configs/smoke.py trained 4 steps
    on all 8 devices (log every 2 steps; checkpoint, evaluation and summary at step 4; no plots), with its
    config.json and tokenizer.model. Read-only for the tests."""
    from moe_jax.train import loop as trainer
    from smoke_helpers import smoke_run_config

    c = smoke_run_config(data_cache, plots=False, steps=4, checkpoint_every=4, eval_every=4, log_every=2)
    workdir = str(tmp_path_factory.mktemp("smoke_run") / "run")
    summary = trainer.train(c, workdir)
    return {"workdir": workdir, "config": c, "summary": summary}
