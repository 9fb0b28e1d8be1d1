"""`python -m moe_jax.budget`: from a dollar budget to a model and its config (the command; its code is moe_jax/tools/budget.py)."""

from moe_jax import cli
from moe_jax.tools.budget import define_flags, main

if __name__ == "__main__":
    cli.run(main, define_flags)
