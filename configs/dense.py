"""Seed exp5 architecture with a dense GELU FFN (d_ff 1536) in every layer: the dense arm of the comparison.

    python -m moe_jax.train --config configs/dense.py --workdir runs/dense
"""

from moe_jax import config_lib


def get_config():
    c = config_lib.base_config()
    c.name = "dense"
    c.moe.num_experts = 0
    return c
