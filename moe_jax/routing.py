"""`python -m moe_jax.routing`: routing diagnostics of a trained MoE (the command; its code is moe_jax/tools/routing.py)."""

from moe_jax import cli
from moe_jax.tools.routing import define_flags, main

if __name__ == "__main__":
    cli.run(main, define_flags)
