"""What every benchmark mode shares: a config prepared for a benchmark (overrides and batch shape applied to the
ConfigDict, then parsed into a RunConfig: validated, 'auto' resolved), variants written as config overrides, the
configs named on the command line, timing, interleaving and the reported summaries."""

from __future__ import annotations

import ast
import json
import os
import re
import statistics
import time
from typing import Callable

import jax

from moe_jax.config import schema as config_lib
from moe_jax.config import typed

# Named variants: overrides in the config's own field names. `--variant NAME` picks one, `--variant k=v,k2=v2` writes
# one out; `--mode update` times all of these by default (optax's per-leaf Muon against the batched one, float32 /
# bfloat16 Newton-Schulz, stacked across layers or one chain per parameter, X or Gram space: docs/optimizer.md).
# Settings a variant leaves out keep the config's value ('auto': the backend's, config/resolve.py NS_*).
VARIANTS = {
    "optax-float32": {"optim.muon_impl": "optax", "optim.ns_dtype": "float32"},
    "batched-float32-layers": {"optim.muon_impl": "batched", "optim.ns_dtype": "float32",
                               "optim.ns_stack": "layers", "optim.ns_method": "standard"},
    "batched-float32-none": {"optim.muon_impl": "batched", "optim.ns_dtype": "float32", "optim.ns_stack": "none",
                             "optim.ns_method": "standard"},
    "batched-bfloat16-layers": {"optim.muon_impl": "batched", "optim.ns_dtype": "bfloat16",
                                "optim.ns_stack": "layers", "optim.ns_method": "standard"},
    "batched-bfloat16-none": {"optim.muon_impl": "batched", "optim.ns_dtype": "bfloat16", "optim.ns_stack": "none",
                              "optim.ns_method": "standard"},
    "batched-bfloat16-layers-gram": {"optim.muon_impl": "batched", "optim.ns_dtype": "bfloat16",
                                     "optim.ns_stack": "layers", "optim.ns_method": "gram"},
    "batched-bfloat16-none-gram": {"optim.muon_impl": "batched", "optim.ns_dtype": "bfloat16",
                                   "optim.ns_stack": "none", "optim.ns_method": "gram"},
}

_FIELD = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"


def apply_overrides(config, overrides: dict) -> None:
    """{'moe.group_size': 256} -> config.moe.group_size = 256, in place. A path that is not a config field, or a
    value of the wrong type, raises ConfigError naming the field."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise config_lib.ConfigError(f"{key} is not a config field of {config.get('name', 'the config')}")
            node = node[p]
        if leaf not in node:
            raise config_lib.ConfigError(f"{key} is not a config field of {config.get('name', 'the config')}")
        try:
            node[leaf] = value
        except TypeError as e:
            raise config_lib.ConfigError(f"{key}={value!r}: {e}") from None


def prepare(config, batch: int | None = None, seq: int | None = None, grad_accum: int = 0, overrides=None,
            backend: str | None = None):
    """A copy of `config` with the overrides ({'x.y': value}) and the benchmark's batch shape (None / 0 keeps the
    config's), parsed (config.typed.parse: validated, 'auto' resolved for `backend`, default JAX's default backend)
    into a RunConfig. The one place the benchmark validates and resolves a config."""
    config = config.copy_and_resolve_references()
    apply_overrides(config, overrides or {})
    if batch:
        config.train.batch_size = batch
    if seq:
        config.train.seq_len = seq
    if grad_accum:
        config.train.grad_accum = grad_accum
    return typed.parse(config, backend)


def _value(text: str):
    """A --variant value: true/false, a Python literal (number, tuple, quoted string), else the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(text: str, named: dict = VARIANTS) -> tuple[str, dict]:
    """'--variant' text -> (label, {'x.y': value}): a name of `named`, or comma-separated field=value overrides
    (labelled by the text itself). Raises ConfigError saying what a variant is."""
    text = text.strip()
    if "=" not in text:
        if text in named:
            return text, dict(named[text])
        raise config_lib.ConfigError(f"--variant {text!r}: not a named variant ({', '.join(named)}) nor field=value "
                                     "overrides such as optim.ns_dtype=float32,optim.ns_stack=none")
    overrides = {}
    for item in re.split(rf",(?=\s*{_FIELD}\s*=)", text):
        key, _, value = (s.strip() for s in item.partition("="))
        if not re.fullmatch(_FIELD, key):
            raise config_lib.ConfigError(f"--variant {text!r}: {item.strip()!r} is not field=value, e.g. "
                                         "optim.ns_dtype=float32")
        overrides[key] = _value(value)
    return text, overrides


def with_variant(config, label: str, overrides: dict):
    """A copy of `config` with the overrides of variant `label`; a bad one raises ConfigError naming the variant."""
    config = config.copy_and_resolve_references()
    try:
        apply_overrides(config, overrides)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"--variant {label}: {e}") from None
    return config


def variant_configs(config, variants) -> list[tuple[str, object]]:
    """[(variant label, a copy of `config` with the variant's overrides)] for variants [(label, overrides)]."""
    return [(label, with_variant(config, label, overrides)) for label, overrides in variants]


def with_variants(entries, variants) -> list:
    """Every (label, config) once per variant [(label, overrides)], labelled 'label [variant]'."""
    return [(f"{label} [{v}]", c) for label, config in entries for v, c in variant_configs(config, variants)]


def describe_variants(variants, out: Callable = print) -> None:
    """One line per variant: its label and overrides in the config's field names."""
    for label, overrides in variants:
        out(f"variant {label}: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))


# ---------------------------------------------------------------------------------------------------------------
# Timing


def time_call(fn: Callable, n: int = 1) -> float:
    """Seconds per call of fn() over n calls in a row, waiting for the last result (JAX dispatches
    asynchronously)."""
    result = None
    t0 = time.perf_counter()
    for _ in range(n):
        result = fn()
    jax.block_until_ready(result)
    return (time.perf_counter() - t0) / n


def interleave(timers: dict, rounds: int) -> dict[object, list[float]]:
    """{key: [seconds per round]}: every timer (a callable returning seconds) runs once per round, in turn. On a
    shared machine only numbers taken together compare, so no timer gets a quiet stretch of its own."""
    times: dict = {k: [] for k in timers}
    for _ in range(rounds):
        for key, timer in timers.items():
            times[key].append(timer())
    return times


def summary(times: list[float]) -> dict:
    """{'median_s', 'min_s', 'max_s', 'rounds_s'} of one timer's rounds."""
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), rounds_s=list(times))


def write_json(path: str, results: dict) -> None:
    """The results of a mode as JSON at `path` (its directory made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# The command line (the flags are defined in moe_jax/tools/bench/__init__.py)


def entries_from_flags() -> list:
    """[(label, config)] of --baseline (when given; with the --config overrides it does not set itself) and
    --config, in report order. --config is required by the modes that call this."""
    from absl import flags

    from moe_jax import cli

    FLAGS = flags.FLAGS
    if FLAGS.config is None:
        raise cli.UsageError(f"--config: --mode {FLAGS.mode} needs a config file, e.g. --config configs/moe.py")
    entries = []
    if FLAGS.baseline is not None:
        baseline = cli.config_value("baseline").copy_and_resolve_references()
        own = cli.override_values("baseline")
        apply_overrides(baseline, {k: v for k, v in cli.override_values("config").items() if k not in own})
        entries.append((f"{baseline.name} ({cli.config_path('baseline')})", baseline))
    config = cli.config_value("config")
    entries.append((f"{config.name} ({cli.config_path('config')})", config))
    return entries


def variants_from_flags(default=()) -> list[tuple[str, dict]]:
    """[(label, overrides)] of the --variant flags in order, else of the named variants in `default`."""
    from absl import flags

    given = flags.FLAGS.variant
    return [parse_variant(v) for v in given] if given else [(name, dict(VARIANTS[name])) for name in default]


def int_list(name: str, values, default: list[int]) -> list[int]:
    """The integers of the list flag --`name` (None: `default`)."""
    from moe_jax import cli

    if values is None:
        return list(default)
    try:
        return [int(v) for v in values]
    except ValueError:
        raise cli.UsageError(f"--{name} {','.join(values)}: expected comma-separated integers, e.g. 1,3") from None
