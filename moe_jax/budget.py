"""`python -m moe_jax.budget`: from a dollar budget to a model and its config (the command; its code is
moe_jax/tools/budget.py)."""

import moe_jax.aot  # noqa: F401  first: the compile-only environment of the --write check (JAX on the CPU)
from moe_jax import cli
from moe_jax.tools.budget import define_flags, main

if __name__ == "__main__":
    cli.run(main, define_flags)
