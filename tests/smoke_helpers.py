"""Helpers shared by the tests: a config file (or ConfigDict) with overrides as a ConfigDict or a parsed RunConfig
(`config_dict`, `run_config`), and the smoke config the in-process training tests use (tests/test_trainer.py,
tests/test_faults.py, ...)."""

from __future__ import annotations

import os

import ml_collections

from moe_jax.cli import load_config_file
from moe_jax.config.typed import RunConfig, parse
from moe_jax.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")


def config_dict(config="smoke", **overrides) -> ml_collections.ConfigDict:
    """A fresh ConfigDict: `config` is a name in configs/ ('smoke'), a path ('configs/smoke.py', relative to the
    repository) or a ConfigDict (copied). Each override is 'section.field'=value (`**{'train.steps': 5}`),
    section=dict(field=value, ...) or a top-level field (seed=1). Not validated (parse does that)."""
    if isinstance(config, ml_collections.ConfigDict):
        c = config.copy_and_resolve_references()
    else:
        path = config if config.endswith(".py") else os.path.join("configs", f"{config}.py")
        c = load_config_file(path if os.path.isabs(path) else os.path.join(ROOT, path))
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        if section:
            c[section][field] = value
        elif isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    return c


def run_config(config="smoke", backend=None, **overrides) -> RunConfig:
    """parse(config_dict(config, **overrides), backend): the RunConfig of a config file or ConfigDict with
    overrides, e.g. run_config('configs/smoke.py', **{'train.steps': 5}) or run_config(c, train=dict(steps=5))."""
    return parse(config_dict(config, **overrides), backend)


def smoke_config(cache_dir, **train) -> ml_collections.ConfigDict:
    """configs/smoke.py with the data cache at `cache_dir`, no progress bar, and `train.<k> = v` for each override
    (a ConfigDict; `smoke_run_config` parses it)."""
    return config_dict("smoke", data=dict(cache_dir=cache_dir), train=dict(progress_bar=False, **train))


def smoke_run_config(cache_dir, **train) -> RunConfig:
    """parse(smoke_config(cache_dir, **train)): the smoke RunConfig."""
    return parse(smoke_config(cache_dir, **train))


def train_losses(workdir):
    """{step: loss} of a run's train records."""
    return {r["step"]: r["loss"] for r in metrics_lib.read(workdir) if r["kind"] == "train"}
