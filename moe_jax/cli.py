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
  by a signal before train.steps (trainer.EXIT_PREEMPTED), 4 another process of the job was lost
  (preemption.EXIT_PEER_LOST; README "Resuming, faults and exit codes").
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
    _CONFIG_FLAGS.append(name)
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


HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")
_CONFIG_FLAGS: list[str] = []  # names of the config-file flags the running command defined (config_flag)


def _flag_value(argv, name: str) -> str | None:
    """The value of `--name value` / `--name=value` in argv (the last one given), or None."""
    value = None
    for i, a in enumerate(argv[1:], start=1):
        if a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return value


def _load_given_config(name: str, spec: str):
    """The ConfigDict of `--name spec` ('path' or 'path:arg', as ml_collections reads it), or exit 2 with one line
    naming the file and what is wrong with it (missing, not Python, no get_config(), not a ConfigDict)."""
    import ml_collections

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        fail(f"--{name} {path}: no such file; give a config file such as configs/smoke.py")
    try:
        module = load_module(path)
    except SyntaxError as e:
        fail(f"--{name} {path}: line {e.lineno}: {e.msg} (SyntaxError); fix the file")
    except Exception as e:  # whatever the file's own code raises
        fail(f"--{name} {path}: cannot be loaded ({type(e).__name__}: {_first_line(e)}); fix the file")
    if not callable(getattr(module, "get_config", None)):
        fail(f"--{name} {path}: defines no get_config() function; a config file returns its "
             "ml_collections.ConfigDict from get_config() (see configs/smoke.py)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        fail(f"--{name} {spec}: get_config() failed ({type(e).__name__}: {_first_line(e)}); fix the file")
    if not isinstance(config, ml_collections.ConfigDict):
        fail(f"--{name} {path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict; "
             "return the config (see configs/smoke.py)")
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unknown_override(argv, configs: dict) -> str | None:
    """The first `--name.a.b=v` of argv whose path the loaded config `configs[name]` lacks, as one error line
    naming the nearest field (difflib), or None when every override names a field."""
    import difflib

    for a in argv[1:]:
        flag = a.split("=", 1)[0]
        name, dot, path = flag[2:].partition(".")
        if not (a.startswith("--") and dot and name in configs):
            continue
        node, done = configs[name], []
        for key in path.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if key not in fields:
                where = ".".join(done) or f"the --{name} file"
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f"did you mean {'.'.join(done + near)!r}? " if near else ""
                return (f"{flag}: {where} has no field {key!r}; {hint}override only fields the --{name} file "
                        "defines")
            node, done = node[key], done + [key]
    return None


def _parse_flags(argv):
    """absl's flag parsing, with every bad input reported as one `error: ...` line and exit status 2 (absl's
    default is 1 with a traceback for a config file that does not load): the config files are loaded first, each
    override is checked against the fields of its file, and --help prints the flags and exits 0."""
    from absl import app, flags

    if any(a in HELP_FLAGS for a in argv[1:]):
        app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)
    configs = {}
    for name in _CONFIG_FLAGS:
        spec = _flag_value(argv, name)
        if spec:
            configs[name] = _load_given_config(name, spec)
    message = _unknown_override(argv, configs)
    if message:
        fail(message)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)")


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
