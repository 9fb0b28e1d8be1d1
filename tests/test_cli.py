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
                         "error: --config.model.nope: model has no field 'nope'")):
        p = run_program(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.strip().splitlines()[-1].startswith(words), (args, p.stderr)
    crash = run_program("--config", smoke, "--what", "crash")
    assert crash.returncode == 1 and "RuntimeError: boom" in crash.stderr


BAD_CONFIG_FILES = {  # file text -> the start of its one error line (after 'error: --config <path>')
    "def get_config(:\n": ": line 1: ",
    "": ": defines no get_config() function",
    "def get_config():\n    return 3\n": ": get_config() returned int, not an ml_collections.ConfigDict",
    "import nowhere_such_module\n": ": cannot be loaded (ModuleNotFoundError: ",
    "def get_config():\n    raise ValueError('bad')\n": ": get_config() failed (ValueError: bad)",
}


@pytest.mark.parametrize("text", list(BAD_CONFIG_FILES), ids=["syntax", "empty", "returns_int", "import_fails",
                                                               "raises"])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, text):
    path = tmp_path / "bad.py"
    path.write_text(text)
    p = run_program("--config", str(path))
    assert p.returncode == 2 and p.stderr.splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(f"error: --config {path}{BAD_CONFIG_FILES[text]}"), p.stderr


@pytest.mark.parametrize("override, words", [
    ("--config.train.stepz=5", "error: --config.train.stepz: train has no field 'stepz'; did you mean 'train.steps'?"),
    ("--config.trian.steps=5", "error: --config.trian.steps: the --config file has no field 'trian'; did you mean "
                               "'train'?"),
    ("--config.model.d_modle=8", "error: --config.model.d_modle: model has no field 'd_modle'; did you mean "
                                 "'model.d_model'?"),
    ("--config.model.d_model.x=8", "error: --config.model.d_model.x: model.d_model has no field 'x'"),
])
def test_a_misspelt_override_is_one_line_naming_the_nearest_field(override, words):
    """ml_collections' own 'Did you mean' errors are tracebacks; near and far misspellings alike get one line."""
    p = run_program("--config", os.path.join(ROOT, "configs", "smoke.py"), override)
    assert p.returncode == 2 and p.stderr.splitlines() == [p.stderr.strip()], p.stderr
    assert p.stderr.startswith(words), p.stderr


def test_help_prints_the_flags_and_exits_0():
    p = run_program("--help")
    assert p.returncode == 0 and "--config" in p.stdout and "--what" in p.stdout, p.stderr


def test_every_command_defines_its_flags_only_when_run():
    """Importing every command defines none of its own flags, so they import together in one process (the libraries
    they import, absl.logging, grain and orbax, define theirs on import: those are not the commands')."""
    from absl import flags

    import importlib
    for name in ("train.__main__", "eval", "generate", "compare", "bench", "budget", "routing", "studies.__main__"):
        module = importlib.import_module(f"moe_jax.{name}")
        assert callable(module.define_flags) and callable(module.main), name
    ours = {f: flags.FLAGS.find_module_defining_flag(f) for f in flags.FLAGS}
    assert not {f: m for f, m in ours.items() if m and m.startswith("moe_jax")}
