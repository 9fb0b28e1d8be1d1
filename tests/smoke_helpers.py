"""Helpers shared by the tests that train the smoke config in-process (tests/test_trainer.py, tests/test_faults.py)."""

from __future__ import annotations

import os

from moe_jax.config import schema as config_lib
from moe_jax.train import metrics as metrics_lib
from moe_jax.cli import load_config_file

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py")


def smoke_config(cache_dir, **train):
    """configs/smoke.py with the data cache at `cache_dir`, no progress bar, and `train.<k> = v` for each override."""
    c = load_config_file(SMOKE)
    c.data.cache_dir = cache_dir
    c.train.progress_bar = False
    for k, v in train.items():
        c.train[k] = v
    return config_lib.validate(c)


def train_losses(workdir):
    """{step: loss} of a run's train records."""
    return {r["step"]: r["loss"] for r in metrics_lib.read(workdir) if r["kind"] == "train"}
