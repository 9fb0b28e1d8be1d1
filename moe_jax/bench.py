"""`python -m moe_jax.bench [--mode step|update|decode|newton-schulz|stop-agreement]`: the benchmarks (the command;
its code is the package moe_jax/tools/bench/, one module per mode)."""

from moe_jax import cli
from moe_jax.tools.bench import define_flags, main

if __name__ == "__main__":
    cli.run(main, define_flags)
