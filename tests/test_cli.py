"""The command-line convention (moe_jax/cli.py): the one config loader, `error:` lines and exit codes (0 ok, 2 bad
input or usage, 1 anything else), flags defined only when a command runs, and every command following it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from moe_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_config_file_returns_get_config(tmp_path):
    c = cli.load_config_file(os.path.join(ROOT, "configs", "smoke.py"))
    assert isinstance(c, ml_collections.ConfigDict) and c.name == "smoke" and c.model.d_model == 64
    assert cli.load_config_file(os.path.join(ROOT, "configs", "smoke.py")) is not c  # a fresh config per call
    cmp = cli.load_config_file(os.path.join(ROOT, "configs", "compare_smoke.py"))  # loads smoke.py itself
    assert cmp.base.name == "smoke" and cmp.base.train.checkpoint_every == 10


def test_load_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file .*nowhere.py"):
        cli.load_config_file(tmp_path / "nowhere.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="empty.py.* has no get_config"):
        cli.load_config_file(tmp_path / "empty.py")


PROGRAM = textwrap.dedent('''
    import sys
    from absl import flags
    from moe_jax import cli
    from moe_jax.config import schema as config_lib

    def define_flags():
        cli.config_flag()
        flags.DEFINE_string("what", "ok", "what main does")

    def main(argv):
        cli.no_arguments(argv)
        what = flags.FLAGS.what
        if what == "usage":
            raise cli.UsageError("--what usage: a bad value; use ok")
        if what == "config":
            raise config_lib.ConfigError("config.model.d_model: must be positive")
        if what == "crash":
            raise RuntimeError("boom")
        print("ran", flags.FLAGS.config.name, flags.FLAGS.config.model.d_model)

    cli.run(main, define_flags)
''')


def run_program(*args):
    return subprocess.run([sys.executable, "-c", PROGRAM, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": ROOT})


def test_exit_codes_and_error_lines():
    smoke = os.path.join(ROOT, "configs", "smoke.py")
    ok = run_program("--config", smoke, "--config.model.d_model=32")
    assert ok.returncode == 0 and "ran smoke 32" in ok.stdout, ok.stderr
    for args, words in ((["--config", smoke, "--what", "usage"], "error: --what usage: a bad value; use ok"),
                        (["--config", smoke, "--what", "config"], "error: config.model.d_model: must be positive"),
                        (["--config", smoke, "stray"], "error: unexpected arguments ['stray']"),
                        (["--config", smoke, "--nope=1"], "error: Unknown command line flag 'nope'"),
                        ([], "error: flag --config=None: Flag --config must have a value other than None"),
                        (["--config", smoke, "--config.model.nope=1"],
                         "error: --config.model.nope: model.nope is not a config field of the --config file")):
        p = run_program(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.strip().splitlines()[-1].startswith(words), (args, p.stderr)
    crash = run_program("--config", smoke, "--what", "crash")
    assert crash.returncode == 1 and "RuntimeError: boom" in crash.stderr


def test_every_command_defines_its_flags_only_when_run():
    """Importing every command (and the scripts' modules) defines no flag, so they import together in one process."""
    from absl import flags

    import importlib
    before = set(flags.FLAGS)
    for name in ("train.__main__", "eval", "generate", "compare", "bench", "budget", "routing", "studies.__main__"):
        module = importlib.import_module(f"moe_jax.{name}")
        assert callable(module.define_flags) and callable(module.main), name
    assert set(flags.FLAGS) == before
