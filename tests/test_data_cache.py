"""Tests for moe_jax/data/cache.py's cache root: a path that cannot be a directory is one ConfigError line (exit 2)
naming where the path came from and the fix."""

import os
import subprocess
import sys

import pytest

from moe_jax.config import schema as config_lib
from moe_jax.data import cache as cache_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(cache_dir):
    c = config_lib.base_config()
    c.data.cache_dir = cache_dir
    return c


def test_cache_root_is_the_field_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache_lib.ENV_CACHE_DIR, str(tmp_path / "env"))
    assert cache_lib.cache_root(_config(str(tmp_path / "a" / "b"))) == str(tmp_path / "a" / "b")  # created later
    assert cache_lib.cache_root(_config("")) == str(tmp_path / "env")


@pytest.mark.parametrize("under", [False, True])
def test_a_file_as_cache_dir_names_the_field_and_the_fix(tmp_path, under):
    regular = tmp_path / "notes.txt"
    regular.write_text("x")
    path = str(regular / "sub") if under else str(regular)
    with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.cache_dir: .*notes\.txt.* is not a directory "
                                                     r"\(.*notes\.txt is a file\); give a directory"):
        cache_lib.cache_root(_config(path))


def test_a_file_as_the_cache_environment_names_the_variable(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv(cache_lib.ENV_CACHE_DIR, str(tmp_path / "f"))
    with pytest.raises(config_lib.ConfigError, match=r"^\$MOE_JAX_CACHE: "):
        cache_lib.cache_root(_config(""))


def test_train_with_a_file_as_cache_dir_is_one_line_and_status_2(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "moe_jax.train", "--config", "configs/smoke.py", "--workdir",
                        str(tmp_path / "w"), "--config.data.cache_dir=README.md"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: config.data.cache_dir: README.md is not a directory"), r.stderr
