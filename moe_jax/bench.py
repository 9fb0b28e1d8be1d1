"""`python -m moe_jax.bench`: the benchmark (the command; its code is moe_jax/tools/bench.py)."""

from moe_jax import cli
from moe_jax.tools.bench import define_flags, main

if __name__ == "__main__":
    cli.run(main, define_flags)
