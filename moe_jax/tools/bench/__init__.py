"""`python -m moe_jax.bench --mode MODE`: every benchmark of the project, one module per mode, sharing the config
preparation, variants, timing, interleaving and reporting of common.py.

    --mode step            (the default) the compiled train step: tokens/s, TFLOP/s, MFU, step time (step.py)
    --mode update          the optimizer update alone per config and variant (update.py)
    --mode decode          KV-cache decoding tokens/s of a config's shapes (decode.py)
    --mode newton-schulz   accuracy and speed of the Newton-Schulz chains (newton_schulz.py)
    --mode stop-agreement  the multi-process stop agreement's cost (stop_agreement.py)

    python -m moe_jax.bench --config configs/moe.py --baseline configs/dense.py --batch 4 --seq 512
    python -m moe_jax.bench --mode update --config configs/moe.py --baseline configs/dense.py --rounds 5
    python -m moe_jax.bench --mode decode --config configs/moe.py --batch 1,3
    python -m moe_jax.bench --mode newton-schulz --rows 384 --cols 1536
    python -m moe_jax.bench --mode stop-agreement --processes 2

Each mode prints its report; --json PATH also writes what it returns. A flag the chosen mode does not read is refused
(exit status 2, naming the flags it reads). Variants (step, update) are config overrides in the config's own field
names: `--variant optim.ns_dtype=float32,optim.ns_stack=none` (repeatable) or a name of common.VARIANTS.
"""

from __future__ import annotations

from moe_jax.tools.bench import decode, newton_schulz, step, stop_agreement, update
from moe_jax.tools.bench.common import VARIANTS, apply_overrides, prepare  # noqa: F401  (the package's API)
from moe_jax.tools.bench.step import Bench, StepOptions, benchmark  # noqa: F401
from moe_jax.tools.bench.update import time_updates  # noqa: F401

MODES = {"step": step, "update": update, "decode": decode, "newton-schulz": newton_schulz,
         "stop-agreement": stop_agreement}
ALWAYS = ("mode", "json")  # flags every mode reads


def define_flags() -> None:
    """Define the command-line flags (cli.run calls it before parsing)."""
    from absl import flags

    from moe_jax import cli

    flags.DEFINE_enum("mode", "step", list(MODES), "What to benchmark (the module docstring lists the modes).")
    flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
    cli.config_flag(help_text="(step, update, decode) The config file to benchmark; override its fields with "
                    "--config.x.y=value (applied to the --baseline too).", required=False)
    cli.config_flag("baseline", "(step, update) Optional second config file timed together with --config "
                    "(interleaved) and reported first, e.g. configs/dense.py; --config.x.y=value overrides apply to it "
                    "too unless --baseline.x.y=value sets the same field.", required=False)
    flags.DEFINE_multi_string("variant", [], "(step, update) Time every config with these overrides, "
                              "e.g. optim.ns_dtype=float32,optim.ns_stack=none, or a named variant "
                              f"({', '.join(VARIANTS)}); repeatable. update: default all named ones.")
    flags.DEFINE_list("dispatch", [], "(step) Time every MoE config once per moe.dispatch mode, e.g. "
                      "capacity,dropless (labels get ' [mode]').")
    flags.DEFINE_list("batch", None, "(step) Sequences per micro-batch (train.batch_size; default 4); "
                      "(decode) batch sizes to time, comma-separated (default 1,3).")
    flags.DEFINE_integer("seq", None, "(step) Sequence length (train.seq_len; default 512).")
    flags.DEFINE_integer("grad_accum", 1, "(step) Micro-batches per step (train.grad_accum); 0 keeps the config's.")
    flags.DEFINE_integer("steps", 10, "(step) Timed steps per round.")
    flags.DEFINE_integer("warmup", 2, "(step) Untimed steps after compilation.")
    flags.DEFINE_integer("rounds", None, "(step, update, newton-schulz) Timing rounds (configs interleaved); the "
                         "median is reported. Default: step 1, update 5, newton-schulz 5.")
    flags.DEFINE_integer("matmul_n", 2048, "(step) Size of the square matmul timed as the CPU peak.")
    flags.DEFINE_float("peak_tflops", 0.0, "(step) Peak TFLOP/s of all timed devices together (0: table / measured).")
    flags.DEFINE_integer("devices", 1, "(step) Devices to time on (data-parallel mesh of the config's shape); 0: all.")
    flags.DEFINE_bool("breakdown", False, "(step) Also time the forward pass, forward+backward and the optimizer "
                      "alone.")
    flags.DEFINE_integer("prompt_len", 16, "(decode) Prompt tokens.")
    flags.DEFINE_integer("max_new_tokens", 200, "(decode) New tokens (capped by the context).")
    flags.DEFINE_integer("repeats", 3, "(decode) Timed runs per batch size (the median is reported).")
    flags.DEFINE_integer("rows", 384, "(newton-schulz) Rows of the matrices (the smaller side).")
    flags.DEFINE_integer("cols", 1536, "(newton-schulz) Columns of the matrices.")
    flags.DEFINE_integer("stack", 8, "(newton-schulz) Matrices per batched chain (the accuracy table uses this many "
                         "too).")
    flags.DEFINE_integer("groups", 2, "(newton-schulz) Chains timed together in one jit.")
    flags.DEFINE_integer("processes", 2, "(stop-agreement) Local processes.")
    flags.DEFINE_integer("checks", 200, "(stop-agreement) Timed AgreedStop.check calls per process.")


def check_flags(mode: str) -> None:
    """Refuse a flag given on the command line that `mode` does not read."""
    from absl import flags

    from moe_jax import cli

    FLAGS = flags.FLAGS
    reads = set(MODES[mode].FLAGS_READ) | set(ALWAYS)
    ours = set(ALWAYS).union(*(m.FLAGS_READ for m in MODES.values()))
    stray = sorted(name for name in ours - reads if FLAGS[name].present)
    if stray:
        raise cli.UsageError(f"{', '.join('--' + s for s in stray)}: not read by --mode {mode}, which reads "
                             f"{', '.join('--' + s for s in MODES[mode].FLAGS_READ)}")


def main(argv) -> None:
    """absl entry point: run the chosen mode (it prints its report); --json writes its results."""
    run_from_flags(argv)


def run_from_flags(argv) -> dict:
    from absl import flags

    from moe_jax import cli
    from moe_jax.tools.bench import common

    cli.no_arguments(argv)
    FLAGS = flags.FLAGS
    check_flags(FLAGS.mode)
    results = MODES[FLAGS.mode].from_flags()  # a ConfigError or UsageError exits with status 2 (cli.run)
    if FLAGS.json:
        common.write_json(FLAGS.json, results)
    return results
