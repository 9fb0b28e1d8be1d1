"""The command-line convention every command follows (moe_jax.train, eval, generate, compare, bench, budget,
routing and the scripts in scripts/): how flags are defined, how config files are loaded, how errors are reported,
exit codes.

- Flags are defined only when a module runs as a program: each command has a `define_flags()` that `run` calls
  before parsing, so several command modules can be imported in one process (the tests do).
- A config is a Python file with `get_config()` returning an ml_collections.ConfigDict, given as
  `--config path` with field overrides `--config.x.y=value` (`config_flag`). Code and tests load config files
  through `load_config_file` only.
- Errors: one line `error: <what is wrong, naming the flag or field, and the fix>` on stderr (`fail`).
- Exit codes: 0 success; 2 bad input or usage (a bad flag or flag value, a config that does not validate, a missing
  input the user named); 1 anything else (an uncaught exception, with its traceback). moe_jax.train adds 3: stopped
  by a signal before train.steps, after saving (trainer.EXIT_PREEMPTED; README "Resuming, faults and exit codes").
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, NoReturn

from absl import flags as _absl_flags

# Flags defined through the helpers here (config_flag) belong to the command that calls them, so `--help` lists them.
_absl_flags.disclaim_key_flags()

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line: `run` prints `error: <message>` and exits with status 2."""


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    """Print `error: <message>` to stderr and exit with `status` (2: bad input or usage, 1: anything else)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def load_module(path: str | os.PathLike, name: str = ""):
    """The Python file at `path` executed as a module (config files live outside any package). Raises
    FileNotFoundError naming the path when there is no such file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path!r}")
    name = name or "moe_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str | os.PathLike):
    """`get_config()` of the config file at `path` (an ml_collections.ConfigDict). The one config-file loader of the
    repository: commands get theirs through `config_flag` (which also applies `--config.x=y` overrides), code and
    tests call this. Raises FileNotFoundError naming the path when there is no such file."""
    path = os.fspath(path)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config() function")
    return module.get_config()


def config_flag(name: str = "config", help_text: str = "Path to a config file in configs/; override its fields "
                "with --config.x.y=value.", required: bool = True) -> None:
    """Define the flag `--<name> path` (and its field overrides `--<name>.x.y=value`), unlocked so commands may set
    derived fields."""
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(name, None, help_text, lock_config=False)
    if required:
        flags.mark_flags_as_required([name])


def config_path(name: str = "config") -> str:
    """The file given to the config flag `--<name>`."""
    from absl import flags
    from ml_collections import config_flags

    return config_flags.get_config_filename(flags.FLAGS[name])


def config_value(name: str = "config"):
    """The config of `--<name>` (file loaded, overrides applied). A missing file, or one that fails to load (which
    ml_collections reports only when the value is first read), exits with status 2 in one line naming it."""
    from absl import flags

    path = config_path(name)
    if not os.path.isfile(path):
        fail(f"--{name} {path}: no such file; give a config file such as configs/smoke.py")
    try:
        return getattr(flags.FLAGS, name)
    except OSError as e:
        fail(f"--{name} {path}: cannot be loaded ({str(e).strip().splitlines()[0]}); fix the file")


def override_values(name: str = "config") -> dict:
    """{'x.y': value} of the overrides given as `--<name>.x.y=value`, in command-line order."""
    from absl import flags
    from ml_collections import config_flags

    return dict(config_flags.get_override_values(flags.FLAGS[name]))


def no_arguments(argv) -> None:
    """Refuse positional arguments (every command takes flags only)."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}: every input is a flag (--help lists them)")


def _parse_flags(argv):
    """absl's flag parsing, with a bad flag reported as `error: ...` and exit status 2 (absl's default is 1)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config does not have
        field = str(e).strip("\"'")
        flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]
                     and field in a.split("=")[0].split(".")[1:]), None)
        if flag is None:
            raise
        name, path = flag[2:].split(".", 1)
        fail(f"{flag}: {path} is not a config field of the --{name} file; override only fields it defines")


def run(main: Callable, define_flags: Callable[[], None]) -> None:
    """Define the command's flags, parse them and run `main(argv)`; a UsageError, absl's app.UsageError and
    config_lib.ConfigError exit with status 2 and `error: <message>`; any other exception propagates (status 1)."""
    from absl import app

    from moe_jax.config import schema as config_lib

    def wrapped(argv):
        try:
            return main(argv)
        except (UsageError, app.UsageError, config_lib.ConfigError) as e:
            fail(str(e))

    define_flags()
    home = sys.modules.get(define_flags.__module__)
    if home is not None and home is not sys.modules["__main__"]:  # e.g. moe_jax/bench.py runs tools/bench's flags
        from absl import flags
        flags.adopt_module_key_flags(home)
    app.run(wrapped, flags_parser=_parse_flags)
