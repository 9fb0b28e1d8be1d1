"""`python -m moe_jax.aot`: compile the trainer's steps for a TPU slice or GPU node that is not attached and predict
memory, FLOPs, collectives and a roofline step time (the command; its code is moe_jax/tools/aot.py, the prediction
table moe_jax/tools/aot_table.py, the targets moe_jax/tools/targets.py).

    python -m moe_jax.aot --config configs/gpu_moe.py --target v5p-128 --mesh 16,4,1 [--slices 2] [--decode]
                          [--config.x=y ...] [--json out.json]
    python -m moe_jax.aot --table --configs configs/smoke.py,configs/gpu_moe.py --targets v4-8,h100-8 \
                          --markdown docs/aot_table.md

The compilers run on this CPU host: JAX_PLATFORMS is set to 'cpu' (unless set already) before JAX is imported, so
the CUDA plugin does not look for a GPU, and libtpu is told not to take its lockfile. Flags, errors and exit codes
follow moe_jax/cli.py.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile only: libtpu never opens a TPU here, so it need not hold its one-process lockfile (another aot process, a
# test process that compiled for a TPU, or a trainer on a TPU VM may hold it).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from moe_jax import cli  # noqa: E402


def define_flags() -> None:
    from absl import flags

    from moe_jax.tools import targets
    cli.config_flag(required=False)
    flags.DEFINE_string("target", None, f"One of: {', '.join(targets.TARGETS)}.")
    flags.DEFINE_string("mesh", None, "Mesh shape data,expert,model within one slice (one -1 fills it); default "
                        "the config's mesh.shape.")
    flags.DEFINE_integer("slices", 1, "Slices (TPU) or nodes (GPU) joined by the slow links (DCN); the 'data' axis "
                         "spans them.")
    flags.DEFINE_bool("decode", False, "Also compile the decode prefill (moe_jax/model/decode.py).")
    flags.DEFINE_string("json", None, "Write the result as JSON to this file.")
    flags.DEFINE_bool("table", False, "Compute the prediction table of --configs x --targets (resumable).")
    flags.DEFINE_list("configs", [], "With --table: config files.")
    flags.DEFINE_list("targets", [], "With --table: target names.")
    flags.DEFINE_string("markdown", None, "With --table: write the table here as Markdown.")
    flags.DEFINE_string("table_json", None, "With --table: the rows computed so far (default: --markdown's path "
                        "with .json); rows already there are not recompiled.")


def _mesh(text):
    if text is None:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise cli.UsageError(f"--mesh {text}: give three integers data,expert,model, e.g. 4,2,1 or -1,4,1") from None


def _table(f) -> None:
    from moe_jax.tools import aot_table
    if not f.configs or not f.targets or not f.markdown:
        raise cli.UsageError("--table needs --configs, --targets and --markdown")
    path = f.table_json or os.path.splitext(f.markdown)[0] + ".json"
    rows = aot_table.compute(list(f.configs), list(f.targets), path, slices=f.slices, mesh=_mesh(f.mesh))
    os.makedirs(os.path.dirname(os.path.abspath(f.markdown)), exist_ok=True)
    with open(f.markdown, "w") as out:
        out.write(aot_table.markdown(rows))
    print(f"wrote {f.markdown} ({len(rows)} rows; cache {path})")


def main(argv) -> None:
    import json

    from absl import flags

    from moe_jax.tools import aot, targets
    cli.no_arguments(argv)
    f = flags.FLAGS
    if f.table:
        return _table(f)
    if f.target is None:
        raise cli.UsageError("--target is required (or --table)")
    if f.config is None:
        raise cli.UsageError("--config is required: a config file such as configs/gpu_moe.py")
    config = cli.config_value()
    request = aot.Request(target=f.target, mesh=_mesh(f.mesh), slices=f.slices, decode=f.decode)
    try:
        result = aot.run(config, request)
    except (aot.AotError, targets.TargetError) as e:
        raise cli.UsageError(str(e)) from None
    print(aot.report(result))
    if f.json:
        os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
        with open(f.json, "w") as out:
            json.dump(result, out, indent=1, sort_keys=True)
        print(f"wrote {f.json}")
    try:
        aot.check_fits(result)
    except aot.AotError as e:
        raise cli.UsageError(str(e)) from None


if __name__ == "__main__":
    cli.run(main, define_flags)
